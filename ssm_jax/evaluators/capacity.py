"""Evaluator ``capacity``: the state-capacity study over earlier evaluations (no model of its own).

Each directory of ``config.capacity.runs`` (globs allowed; default: this evaluation's own output) holds
the ``loss_vs_position.json`` and/or ``passkey.json`` of one trained model. Its collapse verdict (source
``config.capacity.source``, mitigation ``config.capacity.mitigation``) and passkey accuracies feed
:func:`ssm_jax.capacity.capacity_study`: T_forget and T_recall per state size, their fitted laws and the
paper's. Writes ``capacity.json`` and ``capacity.png``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ssm_jax import capacity as capacity_lib
from ssm_jax.evaluators.base import EvalModel
from ssm_jax.evaluators.config import expand_runs
from ssm_jax.evaluators.summary import fmt
from ssm_jax.io import write_json

NEEDS_MODEL = False


def load_run(path: str, *, mitigation: str = "none", source: str = "documents") -> Dict[str, Any]:
    """One run for :func:`ssm_jax.capacity.capacity_study` from an evaluation output directory (or the path
    of a file in it): ``{"name", "state_size", "train_len", "collapsed"?, "length"?, "passkey_accuracy"?}``."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    run: Dict[str, Any] = {"name": directory}
    loss_file = os.path.join(directory, "loss_vs_position.json")
    pk_file = os.path.join(directory, "passkey.json")
    if not (os.path.isfile(loss_file) or os.path.isfile(pk_file)):
        raise FileNotFoundError(f"{directory!r} holds neither loss_vs_position.json nor passkey.json")
    for file in (loss_file, pk_file):
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model", {})
        run.setdefault("state_size", model.get("state_size"))
        run.setdefault("train_len", model.get("train_len"))
        if file == loss_file:
            curve = data["sources"].get(source, {}).get("curves", {}).get(mitigation)
            if curve is None or curve.get("collapse") is None:
                raise ValueError(
                    f"{loss_file}: no collapse verdict for config.capacity.source={source!r}, "
                    f"config.capacity.mitigation={mitigation!r}; it has sources "
                    f"{sorted(data['sources'])}"
                )
            run["collapsed"] = bool(curve["collapse"]["collapsed"])
            run["length"] = data["length"]
        else:
            res = data["results"].get(mitigation)
            if res is None:
                raise ValueError(f"{pk_file}: no passkey results for config.capacity.mitigation={mitigation!r}; it has {sorted(data['results'])}")
            run["passkey_accuracy"] = {int(k): float(v) for k, v in zip(data["context_lengths"], res["accuracy_by_length"]) if v is not None}
    if run.get("state_size") is None or run.get("train_len") is None:
        raise ValueError(f"{directory}: the JSON files lack model.state_size / model.train_len")
    return run


def study(runs: Sequence[str], *, mitigation: str = "none", source: str = "documents") -> Dict[str, Any]:
    """The state-capacity study over evaluation output directories (globs allowed)."""
    paths = expand_runs(runs)
    if not paths:
        raise ValueError(
            "config.capacity.runs='': lists no evaluation directories; accepted: output directories of earlier evaluations or globs of them"
        )
    loaded = [load_run(p, mitigation=mitigation, source=source) for p in paths]
    result = capacity_lib.capacity_study(loaded)
    result.update(runs=loaded, mitigation=mitigation, source=source)
    return result


def run(model: Optional[EvalModel], config: Any) -> Dict[str, Any]:
    """The study of ``config.capacity`` (its runs, or this evaluation's output directory when it lists
    none); writes ``capacity.json`` and ``capacity.png``."""
    from ssm_jax import plots

    cc, out_dir = config.capacity, config.output_dir
    result = study(cc.runs or out_dir, mitigation=cc.mitigation, source=cc.source)
    plots.plot_capacity(result["points"], result["fits"], os.path.join(out_dir, "capacity.png"))
    result["files"] = ["capacity.json", "capacity.png"]
    write_json(os.path.join(out_dir, "capacity.json"), result)
    return result


def summarize(result: Mapping[str, Any]) -> List[str]:
    """Capacities per state size, our fits and the paper's."""
    lines = ["## State capacity", "", "| N_S (M) | T_train tried | T_forget (K) | T_recall (K) |", "|---|---|---|---|"]
    for p in result["points"]:
        lines.append(
            f"| {p['n_s_millions']:.4f} | {p['train_lens']} | {fmt(p.get('t_forget_k'))} "
            f"({p.get('t_forget_bound', '-')}) | {fmt(p.get('t_recall_k'))} |"
        )
    f, r = result["fits"]["forget"], result["fits"]["recall"]
    lines += [
        "",
        "Fits (N_S in millions, T in K tokens):",
        f"- T_forget = {f['a']:.3f} N_S + {f['b']:.3f} (rmse {f['rmse']:.3f})" if f else "- T_forget: not fitted",
        f"- T_recall = {r['a']:.3f} ({r['b']:.3f}^N_S - 1) + {r['c']:.3f} (rmse {r['rmse']:.3f})" if r else "- T_recall: not fitted",
        "- paper: T_forget = 5.172 N_S - 4.469; T_recall = 4.756 (1.365^N_S - 1) - 0.742",
    ]
    return lines + [f"- note: {n}" for n in result["notes"]] + [""]
