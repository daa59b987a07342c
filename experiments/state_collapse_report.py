"""The state-collapse study's committed data, figures and tables (docs/RESULTS.md), from the GPU run's outputs.

    python experiments/state_collapse.py gather --root runs/state_collapse --out docs/results/state_collapse
    python experiments/state_collapse.py report --results docs/results/state_collapse

``gather`` copies the raw outputs each number comes from (per run: training metrics, the fixed-bucket
per-position losses of every evaluation as compressed npz, the evaluations' JSON with their large
per-head records compressed) and the daemon's status. ``report`` recomputes everything RESULTS.md quotes
from that raw data: every collapse verdict is :func:`ssm_jax.diagnostics.collapse_verdict` applied again to
the committed fixed-bucket losses, every window loss their mean. It writes ``summary.json``, the figures,
and the tables between ``<!-- table:NAME -->`` markers of RESULTS.md; tests/test_results.py calls the same
functions on the committed data, so a hand-edited number fails CI.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ssm_jax import capacity, diagnostics
from ssm_jax.model import Mamba2Config
from ssm_jax.train_config import model_config_from

WINDOW_MULTIPLES = (1, 8, 32, 64)  # loss windows (k T/2, k T] quoted per mitigation
RUN_NAME = re.compile(r"^(?P<size>[a-z0-9]+)_T(?P<train_len>\d+)(?:_(?P<tag>[a-z]+))?$")  # 47m_T256, 47m_T256_long
TRAIN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "proj", "state_collapse", "train.py")


def model_config(size: str) -> Mamba2Config:
    """The model of a study size, from the study's training config."""
    spec = importlib.util.spec_from_file_location("state_collapse_train_config", TRAIN_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return model_config_from(module.get_config(f"{size},1024").model)


def state_size(size: str, with_conv: bool = False) -> int:
    """N_S: layers x heads x headdim x d_state; the paper's count adds the conv state,
    layers x (d_conv - 1) x conv channels."""
    cfg = model_config(size)
    conv = cfg.n_layer * (cfg.d_conv - 1) * cfg.conv_dim
    return cfg.state_size + conv if with_conv else cfg.state_size


def paper_t_forget(n_s: int) -> float:
    """The paper's linear fit (:func:`ssm_jax.capacity.paper_t_forget`), in tokens."""
    return float(capacity.paper_t_forget(n_s / 1e6)) * capacity.TOKENS_PER_K


# --------------------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------------------

RAW_FILES = ("loss_vs_position.json", "loss_vs_position_fine.npz", "states.json", "index.json")
# Per-position state-norm traces (layers x heads x positions): kept for the final checkpoint's evaluation,
# dropped from the earlier checkpoints' (whose per-head retention and norm growth the history table reads)
STATE_TRACES = ("norm", "max_abs", "conv_norm")


def _copy(src: str, dst: str) -> None:
    """Copies ``src``; JSON files over 200 KB are stored gzip-compressed (``.json.gz``)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if src.endswith(".json") and os.path.getsize(src) > 200_000:
        with open(src, "rb") as f, gzip.open(dst + ".gz", "wb", compresslevel=9) as g:
            shutil.copyfileobj(f, g)
    else:
        shutil.copyfile(src, dst)


def _copy_without_traces(src: str, dst: str) -> None:
    """A states.json without its per-position traces (:data:`STATE_TRACES`), which it names instead."""
    from ssm_jax.io import write_json

    states = read_json(src)
    for key in STATE_TRACES:
        states.pop(key, None)
    write_json(dst, {**states, "traces_dropped": list(STATE_TRACES)})


def _merged_status(new: str, old: str) -> Dict[str, Any]:
    """The daemon's ``status.json`` at ``new`` merged into the one already gathered at ``old`` (the study spans
    GPU sessions, one daemon each): every session's jobs, the later session's entry where both ran one; the
    notes of both (the learning-rate check of the session that ran it)."""
    status = read_json(new)
    if not os.path.isfile(old):
        return status
    merged = read_json(old)
    sessions = merged.pop("sessions", [{"elapsed_s": merged.pop("elapsed_s", None)}])
    merged.pop("done", None)
    sessions.append({"elapsed_s": status.pop("elapsed_s", None), "done": status.pop("done", False)})
    jobs = {**merged.pop("jobs", {}), **status.pop("jobs")}
    return {**merged, **status, "jobs": jobs, "sessions": sessions}


def gather(root: str, out: str, corpus: Optional[str] = None, corpus_file: str = "corpus_manifest.json") -> List[str]:
    """Copies the raw outputs of every run under ``root`` into ``out`` (see the module docstring), and the
    manifest of the study's ``corpus`` (package, version, sha256, filters, token counts, held-out groups)
    as ``corpus_file`` (another name for a session whose runs read another subset). Gathering a later
    session's root adds to what is there."""
    copied = []
    if corpus:
        _copy(os.path.join(corpus, "manifest.json"), os.path.join(out, corpus_file))
        copied.append(corpus_file)
    status = _merged_status(os.path.join(root, "status.json"), os.path.join(out, "status.json"))
    from ssm_jax.io import write_json

    write_json(os.path.join(out, "status.json"), status)
    copied.append("status.json")
    for lr_dir in sorted(glob.glob(os.path.join(root, "lr_check", "lr*"))):
        rel = os.path.relpath(os.path.join(lr_dir, "metrics.jsonl"), root)
        if os.path.isfile(os.path.join(root, rel)):
            _copy(os.path.join(root, rel), os.path.join(out, rel))
            copied.append(rel)
    for run_dir in sorted(glob.glob(os.path.join(root, "*_T*"))):
        if not RUN_NAME.match(os.path.basename(run_dir)):
            continue
        for dirpath, _, filenames in os.walk(run_dir):
            if "checkpoints" in dirpath:
                continue
            for f in filenames:
                if f in RAW_FILES or (f == "metrics.jsonl" and dirpath == run_dir):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)
                    if f == "states.json" and os.path.basename(os.path.dirname(dirpath)) == "eval_history":
                        _copy_without_traces(os.path.join(root, rel), os.path.join(out, rel))
                    else:
                        _copy(os.path.join(root, rel), os.path.join(out, rel))
                    copied.append(rel)
    return copied


# --------------------------------------------------------------------------------------------------
# reading the raw data
# --------------------------------------------------------------------------------------------------


def read_json(path: str) -> Any:
    """``path`` or, where it was stored compressed, ``path.gz``."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    with gzip.open(path + ".gz", "rt") as f:
        return json.load(f)


def _exists(path: str) -> bool:
    return os.path.isfile(path) or os.path.isfile(path + ".gz")


def read_metrics(path: str) -> Dict[str, List[Dict[str, Any]]]:
    """``{"train": [...], "validation": [...]}`` records of a metrics.jsonl."""
    out: Dict[str, List[Dict[str, Any]]] = {"train": [], "validation": []}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a stop
            out.setdefault(rec.get("split", "train"), []).append(rec)
    return out


def curves_of(eval_dir: str) -> Dict[str, Dict[str, Any]]:
    """``{"<source>/<mitigation>": curve}`` of one evaluation directory: the fixed-bucket loss averaged over
    prompts, the verdict recomputed from it, and the window losses."""
    lv = read_json(os.path.join(eval_dir, "loss_vs_position.json"))
    fine = np.load(os.path.join(eval_dir, "loss_vs_position_fine.npz"))
    width, train_len, length = int(fine["fine_width"]), int(lv["train_len"]), int(lv["length"])
    out = {}
    for source, s in lv["sources"].items():
        unigram = s.get("unigram_loss", lv["unigram_loss"])
        unigram = unigram[source] if isinstance(unigram, dict) else unigram
        for name in s["curves"]:
            per_prompt = np.asarray(fine[f"{source}__{name}"], np.float64)  # (prompts, buckets)
            mean = per_prompt.mean(axis=0)  # (buckets,)
            verdict = diagnostics.collapse_verdict(
                mean, train_len, width=width, factor=float(lv["collapse_factor"]), unigram_loss=float(unigram)
            ).to_json()
            ends = width * np.arange(1, mean.size + 1)  # last position of each bucket
            windows = {}
            for k in WINDOW_MULTIPLES:
                hi = k * train_len
                if hi > length:
                    continue
                sel = (ends > max(hi // 2, width)) & (ends <= hi)
                windows[f"{k}x"] = float(mean[sel].mean()) if sel.any() else None
            out[f"{source}/{name}"] = {
                "verdict": verdict,
                "windows": windows,
                "unigram_loss": float(unigram),
                "bucket_end": ends,
                "loss": mean,
                "num_prompts": int(per_prompt.shape[0]),
            }
    return out


def final_curves(run_dir: str) -> Dict[str, Dict[str, Any]]:
    """The latest checkpoint's curves: unmitigated (``eval_final``) and, where they ran, the mitigations
    (``eval_mitigations``, the same prompts)."""
    curves = curves_of(os.path.join(run_dir, "eval_final"))
    mitigations = os.path.join(run_dir, "eval_mitigations")
    if _exists(os.path.join(mitigations, "loss_vs_position.json")):
        curves.update(curves_of(mitigations))
    return curves


def evaluated_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """``[(step, evaluation directory)]`` of a run in step order: the earlier checkpoints (``eval_history``)
    and the last (``eval_final``); an evaluation stopped before it wrote anything is left out."""
    dirs = [
        d
        for d in glob.glob(os.path.join(run_dir, "eval_history", "step_*")) + [os.path.join(run_dir, "eval_final")]
        if _exists(os.path.join(d, "loss_vs_position.json"))
    ]
    return sorted((int(read_json(os.path.join(d, "loss_vs_position.json"))["model"]["step"]), d) for d in dirs)


def _retention(states: Mapping[str, Any]) -> Dict[str, Any]:
    out = {"max_sustained_norm_growth": float(states["max_sustained_norm_growth"]), "conv_norm_growth": float(states["conv_norm_growth"])}
    for key, r in states["retention"].items():
        if r is not None:
            ret = np.asarray(r["retention"], np.float64)  # (layers, heads)
            out[f"retention_{key}"] = {
                "max": float(ret.max()),
                "heads_above_0.5": int((ret > 0.5).sum()),
                "heads": int(ret.size),
                "median": float(np.median(ret)),
            }
    return out


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


def _lean(curve: Mapping[str, Any]) -> Dict[str, Any]:
    return {
        "collapsed": curve["verdict"]["collapsed"],
        "reference": curve["verdict"]["reference"],
        "max_ratio": curve["verdict"]["max_ratio"],
        "first_position": curve["verdict"]["first_position"],
        "first_position_above_unigram": curve["verdict"]["first_position_above_unigram"],
        "unigram_loss": curve["unigram_loss"],
        "windows": curve["windows"],
        "num_prompts": curve["num_prompts"],
    }


def summarize_run(run_dir: str, status: Mapping[str, Any]) -> Dict[str, Any]:
    """Everything RESULTS.md says about one run, from its raw data."""
    name = os.path.basename(run_dir.rstrip("/"))
    m = RUN_NAME.match(name)
    size, train_len = m["size"], int(m["train_len"])
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    last_train = metrics["train"][-1] if metrics["train"] else {}
    job = status["jobs"].get(f"train_{name}", {})
    run: Dict[str, Any] = {
        "name": name,
        "size": size,
        "train_len": train_len,
        "state_size": state_size(size),
        "state_size_with_conv": state_size(size, with_conv=True),
        "paper_t_forget": paper_t_forget(state_size(size, with_conv=True)),
        "steps": int(last_train.get("step", 0)),
        "tokens": int(last_train.get("tokens_seen", 0) or 0),
        "train_seconds": None if job.get("ended_s") is None else round(job["ended_s"] - job["started_s"], 1),
        "stopped_at_deadline": bool(job.get("stopped_at_deadline")),
        "validation": [{"step": r["step"], "loss": r["loss"]} for r in metrics["validation"]],
        "train_loss": [{"step": r["step"], "loss": r["loss"]} for r in metrics["train"] if "loss" in r],
    }
    final = os.path.join(run_dir, "eval_final")
    if _exists(os.path.join(final, "loss_vs_position.json")):
        run["final"] = {k: _lean(c) for k, c in final_curves(run_dir).items()}
        run["final_step"] = read_json(os.path.join(final, "loss_vs_position.json"))["model"].get("step")
    if _exists(os.path.join(final, "states.json")):
        run["final_states"] = _retention(read_json(os.path.join(final, "states.json")))
    extra = os.path.join(run_dir, "eval_extra")
    if _exists(os.path.join(extra, "loss_vs_position.json")):
        run["extra"] = {k: _lean(c) for k, c in curves_of(extra).items()}
    steps = []
    for step, d in evaluated_checkpoints(run_dir):
        entry = {"step": int(step), "documents/none": _lean(curves_of(d)["documents/none"])}
        if _exists(os.path.join(d, "states.json")):
            entry["states"] = _retention(read_json(os.path.join(d, "states.json")))
        steps.append(entry)
    run["history"] = steps
    return run


def summarize(results: str) -> Dict[str, Any]:
    """summary.json's content: every run, the learning-rate check and the T_forget brackets."""
    status = read_json(os.path.join(results, "status.json"))
    runs = [summarize_run(d, status) for d in sorted(glob.glob(os.path.join(results, "*_T*"))) if RUN_NAME.match(os.path.basename(d))]
    brackets = {}
    for size in sorted({r["size"] for r in runs}):
        judged = sorted((r["train_len"], r["final"]["documents/none"]["collapsed"]) for r in runs if r["size"] == size and "final" in r)
        collapsed = [t for t, c in judged if c]
        fine = [t for t, c in judged if not c]
        brackets[size] = {
            "state_size": state_size(size),
            "state_size_with_conv": state_size(size, with_conv=True),
            "paper_t_forget": paper_t_forget(state_size(size, with_conv=True)),
            "longest_collapsed": max(collapsed) if collapsed else None,
            "shortest_not_collapsed": min(fine) if fine else None,
        }
    return {
        "runs": runs,
        "lr_check": status.get("lr_check"),
        "t_forget": brackets,
        "daemon_elapsed_s": [x["elapsed_s"] for x in status.get("sessions", [status])],
    }


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{float(x):.{digits}f}"


def report_tables(summary: Mapping[str, Any]) -> Dict[str, str]:
    """The markdown tables of RESULTS.md, keyed by marker name (``sc_``: this study; the byte-level study of
    the appendix has its own, from experiments/collapse_study.py)."""
    runs = summary["runs"]
    t = {}
    lines = [
        "| run | N_S (SSM) | T_train | steps | tokens | GPU wall s | final val loss | loss @ T_train | "
        "reference | max ratio after T_train | collapsed | first position above unigram |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r.get("final", {}).get("documents/none")
        val = r["validation"][-1]["loss"] if r["validation"] else None
        lines.append(
            f"| {r['name']} | {r['state_size'] / 1e6:.2f}M | {r['train_len']:,} | {r['steps']:,} | "
            f"{r['tokens'] / 1e6:.1f}M | {_f(r['train_seconds'], 0)} | {_f(val)} | "
            f"{_f(c and c['windows'].get('1x'))} | {_f(c and c['reference'])} | {_f(c and c['max_ratio'], 2)} | "
            f"{_f(c and c['collapsed'])} | {_f(c and c['first_position_above_unigram'])} |"
        )
    t["sc_runs"] = "\n".join(lines)

    lines = [
        "| run | mitigation | "
        + " | ".join(f"loss ({k // 2 if k > 1 else 0}T, {k}T]".replace("(0T", "(0") for k in WINDOW_MULTIPLES[1:])
        + " | max ratio | collapsed |",
        "|---|---|" + "---|" * (len(WINDOW_MULTIPLES) - 1) + "---|---|",
    ]
    for r in runs:
        for key, c in r.get("final", {}).items():
            lines.append(
                f"| {r['name']} | {key.split('/')[1]} | "
                + " | ".join(_f(c["windows"].get(f"{k}x")) for k in WINDOW_MULTIPLES[1:])
                + f" | {_f(c['max_ratio'], 2)} | {_f(c['collapsed'])} |"
            )
    t["sc_mitigations"] = "\n".join(lines)

    lines = [
        "| run | step | max ratio | collapsed | loss (T/2, T] | loss (32T, 64T] | max retention @ T | "
        "max retention @ 16T | heads > 0.5 @ T | sustained norm growth |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for h in r["history"]:
            c, s = h["documents/none"], h.get("states", {})
            r1, r16 = s.get("retention_1x", {}), s.get("retention_16x", {})
            lines.append(
                f"| {r['name']} | {h['step']:,} | {_f(c['max_ratio'], 2)} | {_f(c['collapsed'])} | "
                f"{_f(c['windows'].get('1x'))} | {_f(c['windows'].get('64x'))} | {_f(r1.get('max'), 4)} | "
                f"{_f(r16.get('max'), 4)} | {_f(r1.get('heads_above_0.5'))} | "
                f"{_f(s.get('max_sustained_norm_growth'), 2)} |"
            )
    t["sc_history"] = "\n".join(lines)

    lines = [
        "| run | source | unigram loss | loss (T/2, T] | loss (32T, 64T] | max ratio | collapsed | first position above unigram |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for key, c in r.get("extra", {}).items():
            lines.append(
                f"| {r['name']} | {key.split('/')[0]} | {_f(c['unigram_loss'])} | {_f(c['windows'].get('1x'))} | "
                f"{_f(c['windows'].get('64x'))} | {_f(c['max_ratio'], 2)} | {_f(c['collapsed'])} | "
                f"{_f(c['first_position_above_unigram'])} |"
            )
    t["sc_sources"] = "\n".join(lines)

    lines = [
        "| size | N_S (SSM) | N_S (with conv) | paper's fit: T_forget | per state element | "
        "longest T_train that collapsed | shortest T_train that did not | per state element |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, b in summary["t_forget"].items():
        n_s, ours = b["state_size_with_conv"], b["shortest_not_collapsed"]
        lines.append(
            f"| {size} | {b['state_size'] / 1e6:.2f}M | {n_s / 1e6:.2f}M | {b['paper_t_forget']:,.0f} | "
            f"{b['paper_t_forget'] / n_s:.5f} | {_f(b['longest_collapsed'])} | {_f(ours)} | "
            f"{'-' if ours is None else f'{ours / n_s:.5f}'} |"
        )
    t["sc_t_forget"] = "\n".join(lines)
    return t


def write_tables(markdown: str, tables: Mapping[str, str]) -> str:
    """``markdown`` with each ``<!-- table:NAME -->`` block replaced by ``tables[NAME]``."""
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(markdown):
            raise ValueError(f"RESULTS.md has no <!-- table:{name} --> block")
        markdown = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), markdown)
    return markdown


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------


def plot(results: str, out: str) -> List[str]:
    """Per run with mitigations: loss vs position for each (``<run>_mitigations.png``); all runs' unmitigated
    curves (``runs.png``); the collapse measures over training (``history.png``); every head's first-token
    retention at T_train at each evaluated checkpoint (``retention_heads.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    run_dirs = [d for d in sorted(glob.glob(os.path.join(results, "*_T*"))) if RUN_NAME.match(os.path.basename(d))]
    fig_all, ax_all = plt.subplots(figsize=(8, 4.5))
    for d in run_dirs:
        name = os.path.basename(d)
        final = os.path.join(d, "eval_final")
        if not _exists(os.path.join(final, "loss_vs_position.json")):
            continue
        curves = final_curves(d)
        train_len = int(RUN_NAME.match(name)["train_len"])
        c = curves["documents/none"]
        ax_all.plot(c["bucket_end"], c["loss"], label=f"{name} (T_train {train_len:,})", linewidth=1.1)
        if len(curves) == 1:
            continue  # no mitigation ran
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, c in curves.items():
            ax.plot(c["bucket_end"], c["loss"], label=key.split("/")[1], linewidth=1.1)
        ref = curves["documents/none"]["verdict"]["reference"]
        ax.axhline(2 * ref, color="k", linestyle=":", linewidth=1, label="2x reference (collapse)")
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{name}: held-out Linux directories, loss vs position by mitigation")
        ax.legend(fontsize=8)
        written.append(_save(fig, os.path.join(out, f"{name}_mitigations.png")))
    ax_all.set_xscale("log")
    ax_all.set_xlabel("position (tokens)")
    ax_all.set_ylabel("loss (nats/token)")
    ax_all.set_title("held-out Linux directories, no mitigation")
    ax_all.legend(fontsize=8)
    written.append(_save(fig_all, os.path.join(out, "runs.png")))

    summary = summarize(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in summary["runs"]:
        axes[2].plot([v["step"] for v in r["validation"]], [v["loss"] for v in r["validation"]], "o-", label=r["name"])
        steps = [h["step"] for h in r["history"]]
        if steps:
            axes[0].plot(steps, [h["documents/none"]["max_ratio"] for h in r["history"]], "o-", label=r["name"])
            axes[1].plot(steps, [h.get("states", {}).get("retention_1x", {}).get("max", np.nan) for h in r["history"]], "o-", label=r["name"])
    axes[0].axhline(2.0, color="k", linestyle=":", linewidth=1)
    for ax, title in zip(
        axes, ("max loss ratio after T_train (collapse above 2)", "max first-token retention at T_train", "validation loss (nats/token)")
    ):
        ax.set_xlabel("optimizer step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    written.append(_save(fig, os.path.join(out, "history.png")))

    # Every head's first-token retention at T_train, checkpoint by checkpoint (the raw per-head values).
    tracked = []
    for d in run_dirs:
        rows = [
            (step, np.asarray(read_json(os.path.join(e, "states.json"))["retention"]["1x"]["retention"]))
            for step, e in evaluated_checkpoints(d)
            if _exists(os.path.join(e, "states.json"))
        ]  # (layers, heads)
        if len(rows) > 1:
            tracked.append((os.path.basename(d), rows))
    if tracked:
        fig, axes = plt.subplots(len(tracked), 1, figsize=(11, 2.2 + 1.6 * len(tracked)), squeeze=False)
        for ax, (name, rows) in zip(axes[:, 0], tracked):
            layers, heads = rows[0][1].shape
            grid = np.stack([r.ravel() for _, r in rows])  # (checkpoints, layers x heads)
            image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_yticks(range(len(rows)), [f"{step:,}" for step, _ in rows], fontsize=7)
            ax.set_xticks(np.arange(0, layers * heads, heads), [str(i) for i in range(layers)], fontsize=7)
            ax.set_xlabel("layer (heads within it left to right)", fontsize=8)
            ax.set_ylabel("optimizer step", fontsize=8)
            ax.set_title(f"{name}: first-token retention at T_train, every head", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
        written.append(_save(fig, os.path.join(out, "retention_heads.png")))
    return written


def _save(fig: Any, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(results: str, markdown: str) -> Dict[str, Any]:
    """Writes ``summary.json`` and the figures into ``results`` and the tables into ``markdown``."""
    from ssm_jax.io import write_json

    summary = summarize(results)
    write_json(os.path.join(results, "summary.json"), summary)
    plot(results, results)
    with open(markdown, encoding="utf-8") as f:
        text = write_tables(f.read(), report_tables(summary))  # raises before anything is written
    with open(markdown, "w", encoding="utf-8") as f:
        f.write(text)
    return summary
