"""Running an evaluation: the configured modes over one or several checkpoints of a model.

:func:`evaluate` is what ``eval.py`` calls. It validates the config, then for each checkpoint step
loads the model (:func:`ssm_jax.loading.load_model`), prepares it once (:func:`ssm_jax.evaluators.base.prepare`)
and runs the evaluators of ``config.modes`` in the order of :data:`ssm_jax.evaluators.config.MODES`
(capacity last: it reads the loss and passkey outputs). Layout of ``config.output_dir``:

* one step (the default, ``config.steps="-1"``): the files of every evaluator, ``config.json`` and
  ``summary.md`` (written last: its presence marks a finished evaluation);
* several steps (``config.steps="1000,2000,-1"``): one such directory per step, ``step_<n>/``, and
  ``index.json`` (the steps, their directories and their key numbers) with a ``summary.md`` comparing
  them, to show whether collapse appears as training goes on.
"""

from __future__ import annotations

import copy
import importlib
import os
import time
from typing import Any, Dict, List, Mapping, Optional

from absl import logging

from ssm_jax import loading
from ssm_jax.evaluators import summary as summary_lib
from ssm_jax.evaluators.base import prepare
from ssm_jax.evaluators.config import MODES, parse_list, parse_steps, validate_config, validate_for_model
from ssm_jax.evaluators.streams import resolve_data
from ssm_jax.io import write_json, write_text

__all__ = ["evaluator", "evaluate", "evaluate_checkpoint"]


def evaluator(mode: str) -> Any:
    """The evaluator module of ``mode`` (one of :data:`MODES`), imported on first use."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    return importlib.import_module(f"ssm_jax.evaluators.{mode}")


def evaluate_checkpoint(config: Any, output_dir: str, step: Optional[int]) -> Dict[str, Any]:
    """Runs every mode of ``config`` on checkpoint ``step`` (None: not a work directory) into ``output_dir``;
    returns ``{"output_dir", "model", <mode>: result, "files", "summary"}``."""
    t_start = time.perf_counter()
    config = copy.deepcopy(config)
    config.output_dir = output_dir
    config.steps = str(-1 if step is None else step)
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "config.json"), config.to_dict())
    modes = [m for m in MODES if m in parse_list(config.modes)]
    model = None
    if any(evaluator(m).NEEDS_MODEL for m in modes):
        loaded = loading.load_model(
            config.checkpoint,
            step=-1 if step is None else step,
            tokenizer=config.tokenizer,
            train_len=int(config.train_len),
            dtype=config.dtype,
            random_model=config.random_model.to_dict(),
            seed=int(config.seed),
        )
        data = resolve_data(config.data, loaded.data)
        validate_for_model(config, loaded.train_len, data, loaded.tokenizer)
        model = prepare(loaded, data, config)
        logging.info("model %s: %s", config.checkpoint, loaded.describe())
    results: Dict[str, Any] = {"output_dir": output_dir, "model": None if model is None else model.describe()}
    files, sections = ["config.json"], []
    for mode in modes:
        module = evaluator(mode)
        results[mode] = module.run(model, config)
        files += results[mode]["files"]
        sections.append(module.summarize(results[mode]))
    results["files"] = files + ["summary.md"]
    results["summary"] = summary_lib.compose(results["model"], sections, results["files"], time.perf_counter() - t_start)
    write_text(os.path.join(output_dir, "summary.md"), results["summary"])
    return results


def headline(results: Mapping[str, Any]) -> Dict[str, Any]:
    """The key numbers of one checkpoint's evaluation, for the index of several: each loss curve's verdict
    and the states' growth and largest first-token retention."""
    out: Dict[str, Any] = {}
    for source, s in results.get("loss_vs_position", {}).get("sources", {}).items():
        for name, c in s["curves"].items():
            v = c["collapse"]
            out[f"{source}/{name}"] = {k: v[k] for k in ("collapsed", "max_ratio", "first_position", "first_position_above_unigram")}
    st = results.get("states")
    if st:
        out["states"] = {
            "max_sustained_norm_growth": st["max_sustained_norm_growth"],
            **{f"max_retention_{k}": None if r is None else float(r["retention"].max()) for k, r in st["retention"].items()},
        }
    return out


def _index_summary(checkpoint: str, index: List[Dict[str, Any]]) -> str:
    lines = [
        f"# Evaluation of {len(index)} checkpoints of `{checkpoint}`",
        "",
        "| step | curve | collapsed | max ratio | first collapse position | first position above unigram |",
        "|---|---|---|---|---|---|",
    ]
    fmt = summary_lib.fmt
    for entry in index:
        for name, h in entry["headline"].items():
            if name != "states":
                lines.append(
                    f"| {entry['step']:,} | {name} | {fmt(h['collapsed'])} | {fmt(h['max_ratio'], 2)} | "
                    f"{fmt(h['first_position'])} | {fmt(h['first_position_above_unigram'])} |"
                )
    lines.append("")
    lines += [f"- step {e['step']:,}: states {e['headline']['states']}" for e in index if "states" in e["headline"]]
    lines += ["Each step's own summary: " + ", ".join(f"{e['output_dir']}/summary.md" for e in index), ""]
    return "\n".join(lines)


def evaluate(config: Any) -> Dict[str, Any]:
    """Validates ``config`` (see ``configs/eval/default.py``) and runs it over its checkpoint steps; returns
    the results (one step) or ``{"output_dir", "index", "steps": {step: results}, "summary"}``."""
    validate_config(config)
    modes = parse_list(config.modes)
    needs_model = any(evaluator(m).NEEDS_MODEL for m in modes)
    in_checkpoint = needs_model and config.checkpoint != "random"
    root = config.output_dir or (os.path.join(config.checkpoint, "eval") if in_checkpoint else "eval_output")
    steps: List[Optional[int]] = [None]
    if needs_model and loading.checkpoint_kind(config.checkpoint) == "workdir":
        steps = sorted({loading.resolve_step(config.checkpoint, s) for s in parse_steps(config.steps)})
    if len(steps) == 1:
        return evaluate_checkpoint(config, root, steps[0])
    by_step, index = {}, []
    for step in steps:
        by_step[step] = evaluate_checkpoint(config, os.path.join(root, f"step_{step}"), step)
        index.append({"step": step, "output_dir": f"step_{step}", "headline": headline(by_step[step])})
    write_json(os.path.join(root, "index.json"), {"checkpoint": config.checkpoint, "steps": steps, "runs": index})
    summary = _index_summary(config.checkpoint, index)
    write_text(os.path.join(root, "summary.md"), summary)
    return {"output_dir": root, "index": index, "steps": by_step, "summary": summary}
