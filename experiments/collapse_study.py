"""The state-collapse study behind docs/RESULTS.md: train, evaluate, gather, plot.

    # 1. train every (size, T_train) and evaluate it (GPU; runs in parallel on one device):
    python experiments/collapse_study.py run --sizes s,m,l --train_lens 128,512,2048 --root runs/collapse
    # 2. one JSON with every number RESULTS.md quotes (eval outputs + training summaries + capacity fit):
    python experiments/collapse_study.py gather --root runs/collapse --out docs/results/collapse_study.json
    # 3. the figures of RESULTS.md from that JSON alone:
    python experiments/collapse_study.py plot --results docs/results/collapse_study.json --out docs/results

``run`` starts, per (size, T_train), ``train.py --config=configs/collapse_study.py:<size>`` and then
``eval.py --config=configs/eval/collapse_study.py`` on its work directory, ``--parallel`` jobs at a time
(small models leave a GPU mostly idle, so several share it), and stops launching new jobs once
``--deadline_s`` would be exceeded. Each job's log is ``<root>/<size>_T<T>/job.log``. Running the same
command again skips the jobs already evaluated and resumes the others from their last checkpoint. On one
H200, 9 jobs at once ran out of memory in two evaluations; 6 fit (s and l with ``grad_accum_steps=2``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TOKENS_PER_STEP = 65536
LENGTH_MULTIPLES = (1, 8, 32, 64)  # loss reported over (k T/2, k T] for these k (T = T_train)
# Every run streams the same held-out prompts (same split, seed and prompt count), so one absolute window
# compares training lengths on identical text: 64x of T_train 128, 8x of 512, 2x of 2048.
SAME_POSITIONS = (4096, 8192)
MAX_RECORDS = 128  # state-norm records kept per run in the gathered JSON (evenly spaced, first and last kept)


def run_name(size: str, train_len: int) -> str:
    return f"{size}_T{train_len}"


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


def job_command(size: str, train_len: int, root: str, *, steps: int, extra_train: Sequence[str] = ()) -> str:
    """The shell command of one job: train, then evaluate (the eval reads the training config)."""
    workdir = os.path.join(root, run_name(size, train_len))
    batch = max(1, TOKENS_PER_STEP // train_len)
    chunk = min(256, train_len)
    train = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"--config={ROOT}/configs/collapse_study.py:{size}",
        f"--workdir={workdir}",
        f"--config.data.seq_len={train_len}",
        f"--config.train.batch_size={batch}",
        f"--config.model.chunk_size={chunk}",
        f"--config.train.num_steps={steps}",
        f"--config.checkpoint.every_steps={steps}",
        f"--config.optim.warmup_steps={max(1, steps // 10)}",
        *extra_train,
    ]
    evaluate = [sys.executable, os.path.join(ROOT, "eval.py"), f"--config={ROOT}/configs/eval/collapse_study.py", f"--config.checkpoint={workdir}"]
    return f"{shlex.join(train)} && {shlex.join(evaluate)}"


def run_jobs(
    sizes: Sequence[str], train_lens: Sequence[int], root: str, *, parallel: int, deadline_s: float, steps: int, extra_train: Sequence[str] = ()
) -> Dict[str, Any]:
    """Runs the jobs, ``parallel`` at a time; returns ``{name: {"rc", "seconds"}}`` (rc None: not started or
    killed at the deadline)."""
    os.makedirs(root, exist_ok=True)
    # Sizes are listed smallest first; the largest size and longest T_train (the slowest jobs) start first.
    grid = [(s, t) for s in reversed(sizes) for t in sorted(train_lens, reverse=True)]
    status: Dict[str, Any] = {run_name(s, t): {"rc": None, "seconds": None} for s, t in grid}
    # A job whose evaluation finished (summary.md is written last) is skipped; an unfinished one starts again
    # and train.py resumes from its latest checkpoint.
    todo = []
    for size, train_len in grid:
        if os.path.isfile(os.path.join(root, run_name(size, train_len), "eval", "summary.md")):
            status[run_name(size, train_len)] = {"rc": 0, "seconds": 0.0, "skipped": "already evaluated"}
        else:
            todo.append((size, train_len))
    start = time.time()
    running: Dict[str, Any] = {}
    while todo or running:
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is not None:
                status[name] = {"rc": proc.returncode, "seconds": time.time() - t0}
                log.close()
                del running[name]
                print(f"[{time.time() - start:6.0f}s] {name}: rc={proc.returncode} in {status[name]['seconds']:.0f}s", flush=True)
        while todo and len(running) < parallel and time.time() - start < deadline_s:
            size, train_len = todo.pop(0)
            name = run_name(size, train_len)
            os.makedirs(os.path.join(root, name), exist_ok=True)
            log = open(os.path.join(root, name, "job.log"), "w")
            cmd = job_command(size, train_len, root, steps=steps, extra_train=extra_train)
            # Its own process group, so that a kill at the deadline reaches train.py / eval.py, not only the shell.
            proc = subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            running[name] = (proc, time.time(), log)
            print(f"[{time.time() - start:6.0f}s] start {name}", flush=True)
        if time.time() - start >= deadline_s:
            todo.clear()
            for name, (proc, t0, log) in running.items():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                log.close()
                print(f"[{time.time() - start:6.0f}s] {name}: killed at the deadline", flush=True)
            running.clear()
        time.sleep(2)
    return status


# --------------------------------------------------------------------------------------------------
# gather
# --------------------------------------------------------------------------------------------------


def _train_summary(workdir: str) -> Dict[str, Any]:
    """The summary train.py prints at the end (its ``done: {...}`` line in the job's log; {} if absent)."""
    summary: Dict[str, Any] = {}
    log = os.path.join(workdir, "job.log")
    if os.path.isfile(log):
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("done: "):
                    summary = json.loads(line[len("done: ") :])
    return summary


def window_losses(fine: np.ndarray, width: int, train_len: int) -> Dict[str, float]:
    """Mean loss over the positions ``(k T/2, k T]`` for ``k`` in :data:`LENGTH_MULTIPLES` (``T`` = T_train),
    from the fixed-width buckets of the collapse rule (``fine (prompts, buckets)``, bucket ``j`` = positions
    ``[1 + j width, 1 + (j + 1) width)``). Windows of many buckets average out the per-position noise that
    makes a single interpolated point unreliable."""
    per_bucket = fine.mean(axis=0)  # (buckets,)
    out = {}
    for k in LENGTH_MULTIPLES:
        lo, hi = k * train_len // 2, k * train_len  # positions lo+1 .. hi
        first, last = lo // width, hi // width  # buckets [first, last)
        if last > per_bucket.size:
            raise ValueError(f"the evaluation ({per_bucket.size * width} positions) does not reach {k}x T_train")
        out[f"{k}x"] = float(per_bucket[first:last].mean())
    return out


def absolute_window_loss(fine: np.ndarray, width: int, lo: int, hi: int) -> float:
    """Mean loss over positions ``lo+1 .. hi`` from fixed-width buckets (``lo`` and ``hi`` multiples of width)."""
    if lo % width or hi % width or hi // width > fine.shape[1]:
        raise ValueError(f"window ({lo}, {hi}] does not align with buckets of {width} ({fine.shape[1]} buckets)")
    return float(fine.mean(axis=0)[lo // width : hi // width].mean())


def summarize_curve(curve: Mapping[str, Any], fine: np.ndarray, width: int, train_len: int) -> Dict[str, Any]:
    """Window losses at 1x / 8x / 32x / 64x T_train, their ratios to the 1x window, the paper's verdict."""
    at = window_losses(fine, width, train_len)
    col = curve.get("collapse") or {}
    return {
        "window_loss": at,
        "same_positions_loss": (
            absolute_window_loss(fine, width, *SAME_POSITIONS) if SAME_POSITIONS[1] <= fine.shape[1] * width else None
        ),  # None: too short
        "ratio_to_train_len": {k: v / at["1x"] for k, v in at.items()},
        "collapsed_paper_rule": col.get("collapsed"),
        "paper_rule_max_ratio": col.get("max_ratio"),
        "paper_rule_threshold": col.get("threshold"),
        "first_collapse_position": col.get("first_position"),
        "positions": [float(p) for p in curve["positions"]],
        "loss": [float(v) for v in curve["loss"]],
    }


def summarize_states(states_file: str, train_len: int) -> Dict[str, Any]:
    """The state-norm diagnostics of one run (eval mode "states"), growth recomputed from the raw norms with
    :func:`ssm_jax.diagnostics.state_norm_growth`; at most :data:`MAX_RECORDS` records are kept."""
    from ssm_jax.diagnostics import state_norm_growth

    with open(states_file) as f:
        st = json.load(f)
    norm = np.asarray(st["norm"], np.float64)  # (records, layers, heads)
    positions = np.asarray(st["positions"])
    growth = state_norm_growth(norm, positions, train_len)
    sustained = growth["sustained"]
    layer, head = (int(i) for i in np.unravel_index(int(np.argmax(sustained)), sustained.shape))
    keep = np.unique(np.linspace(0, norm.shape[0] - 1, min(norm.shape[0], MAX_RECORDS)).round().astype(int))
    return {
        "positions": positions[keep].tolist(),
        "max_peak_growth": float(growth["peak"].max()),
        "max_sustained_growth": float(sustained.max()),
        "p95_sustained_growth": float(np.percentile(sustained, 95)),
        "frac_heads_sustained_growth_above_2": float((sustained > 2).mean()),
        "most_grown_head": [layer, head],
        "most_grown_head_norm": norm[keep, layer, head].tolist(),
        "layer_median_norm": np.median(norm[keep], axis=2).T.tolist(),  # (layers, records)
        "sustained_growth": sustained.tolist(),  # (layers, heads)
        "peak_growth": growth["peak"].tolist(),
        "conv_norm_growth": st["conv_norm_growth"],
    }


def gather(root: str) -> Dict[str, Any]:
    """Everything RESULTS.md quotes, from the work directories under ``root``."""
    from ssm_jax import capacity as capacity_lib

    runs: List[Dict[str, Any]] = []
    for workdir in sorted(glob.glob(os.path.join(root, "*_T*"))):
        eval_dir = os.path.join(workdir, "eval")
        loss_file = os.path.join(eval_dir, "loss_vs_position.json")
        if not os.path.isfile(loss_file):
            continue
        with open(loss_file) as f:
            lv = json.load(f)
        fine = np.load(os.path.join(eval_dir, "loss_vs_position_fine.npz"))
        width = int(fine["fine_width"])
        model = lv["model"]
        train_len = int(lv["train_len"])
        run: Dict[str, Any] = {
            "name": os.path.basename(workdir),
            "size": os.path.basename(workdir).split("_T")[0],
            "train_len": train_len,
            "state_size": int(model["state_size"]),
            "params": int(model["params"]),
            "n_layer": model["n_layer"],
            "nheads": model["nheads"],
            "headdim": model["headdim"],
            "d_state": model["d_state"],
            "eval_length": int(lv["length"]),
            "num_prompts": int(lv["num_prompts"]),
            "train": _train_summary(workdir),
            "mitigations": lv.get("mitigations"),
            "curves": {
                source: {name: summarize_curve(c, fine[f"{source}__{name}"], width, train_len) for name, c in s["curves"].items()}
                for source, s in lv["sources"].items()
            },
        }
        states_file = os.path.join(eval_dir, "states.json")
        if os.path.isfile(states_file):
            run["states"] = summarize_states(states_file, train_len)
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f"no evaluated runs (<root>/*_T*/eval/loss_vs_position.json) under {root!r}")
    study = capacity_lib.capacity_study(
        [
            {
                "name": r["name"],
                "state_size": r["state_size"],
                "train_len": r["train_len"],
                "collapsed": r["curves"]["documents"]["none"]["collapsed_paper_rule"],
            }
            for r in runs
        ]
    )
    return {
        "runs": runs,
        "capacity": study,
        "tokens_per_step": TOKENS_PER_STEP,
        "length_multiples": list(LENGTH_MULTIPLES),
        "same_positions": list(SAME_POSITIONS),
        "excess_at_same_positions": excess_at_same_positions(runs),
    }


def excess_at_same_positions(runs: Sequence[Mapping[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Per run and mitigation: its loss over :data:`SAME_POSITIONS` minus that of the run of the same size with
    the longest training length and no mitigation (the same text, read by a model that trained on longer
    contexts): how much a short training length costs there, and how much a mitigation wins back."""
    out: Dict[str, Dict[str, float]] = {}
    for r in runs:
        peers = [p for p in runs if p["size"] == r["size"]]
        ref = max(peers, key=lambda p: p["train_len"])
        base = ref["curves"]["documents"]["none"]["same_positions_loss"]
        out[r["name"]] = {
            "reference_run": ref["name"],
            **{
                name: (None if base is None or c["same_positions_loss"] is None else c["same_positions_loss"] - base)
                for name, c in r["curves"]["documents"].items()
            },
        }
    return out


# --------------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------------


def plot(results: Mapping[str, Any], out_dir: str) -> List[str]:
    """The figures of RESULTS.md: collapse curves per size, mitigations per run, state norms, capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssm_jax import plots

    os.makedirs(out_dir, exist_ok=True)
    runs = results["runs"]
    sizes = sorted({r["size"] for r in runs}, key=lambda s: min(r["state_size"] for r in runs if r["size"] == s))
    paths = []
    for source in ("documents", "newlines"):
        fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False, sharey=True)
        for ax, size in zip(axes[0], sizes):
            group = sorted((r for r in runs if r["size"] == size and source in r["curves"]), key=lambda r: r["train_len"])
            for r in group:
                c = r["curves"][source]["none"]
                (line,) = ax.plot(c["positions"], c["loss"], label=f"T_train={r['train_len']}")
                ax.axvline(r["train_len"], color=line.get_color(), ls=":", lw=1)
            if group:
                ax.set_title(f"{size}: N_S={group[0]['state_size'] / 1e6:.2f}M, no mitigation")
            ax.set_xscale("log")
            ax.set_xlabel("position (tokens)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel(f"loss (nats/byte), {source}")
        paths.append(plots.save_figure(fig, os.path.join(out_dir, f"collapse_{source}.png")))
    for r in runs:
        curves = r["curves"]["documents"]
        if len(curves) < 2:
            continue
        paths.append(
            plots.plot_loss_vs_position(
                {name: {"positions": c["positions"], "loss": c["loss"]} for name, c in curves.items()},
                os.path.join(out_dir, f"mitigations_{r['name']}.png"),
                train_len=r["train_len"],
                title=f"{r['name']} (N_S={r['state_size'] / 1e6:.2f}M): documents, every mitigation",
            )
        )
    with_states = [r for r in runs if "states" in r]
    if with_states:
        fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            for r in sorted((r for r in with_states if r["size"] == size), key=lambda r: r["train_len"]):
                st = r["states"]
                (line,) = ax.plot(
                    st["positions"],
                    st["most_grown_head_norm"],
                    lw=1,
                    label=f"T_train={r['train_len']} (L{st['most_grown_head'][0]}H{st['most_grown_head'][1]})",
                )
                ax.axvline(r["train_len"], color=line.get_color(), ls=":", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{size}: state norm, head of largest sustained growth")
            ax.set_xlabel("position (tokens)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        paths.append(plots.save_figure(fig, os.path.join(out_dir, "state_norms.png")))
    excess = results.get("excess_at_same_positions") or {}
    names = [r["name"] for r in _ordered_runs(results) if excess.get(r["name"], {}).get("none") is not None]
    if names:
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4))
        width = 0.8 / len(MITIGATION_ORDER)
        for i, name in enumerate(MITIGATION_ORDER):
            values = [excess[n].get(name) for n in names]
            ax.bar(
                np.arange(len(names)) + (i - (len(MITIGATION_ORDER) - 1) / 2) * width, [np.nan if v is None else v for v in values], width, label=name
            )
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(names)), names)
        lo, hi = results["same_positions"]
        ax.set_ylabel(f"loss over positions {lo + 1}-{hi}\nminus the size's longest-T_train run (nats/byte)")
        ax.set_title("cost of a short training length on the same text, and what each mitigation wins back")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        paths.append(plots.save_figure(fig, os.path.join(out_dir, "same_positions.png")))
    cap = results["capacity"]
    paths.append(plots.plot_capacity(cap["points"], cap["fits"], os.path.join(out_dir, "capacity.png")))
    return paths


# --------------------------------------------------------------------------------------------------
# report: the tables of RESULTS.md, generated from the gathered JSON (tests/test_results.py checks that the
# committed RESULTS.md holds exactly these tables)
# --------------------------------------------------------------------------------------------------

MITIGATION_ORDER = ("none", "forget_more", "dt_scale", "state_norm", "sliding_window")


def _ordered_runs(results: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    return sorted(results["runs"], key=lambda r: (r["state_size"], r["train_len"]))


def report_tables(results: Mapping[str, Any]) -> Dict[str, str]:
    """``{"runs": ..., "mitigations": ..., "same_positions": ...}`` markdown tables."""
    ln2 = np.log(2.0)
    rows = [
        "| run | N_S | params | T_train | train loss | validation (bits/byte) | loss (T/2, T] | (4T, 8T] | "
        "(16T, 32T] | (32T, 64T] | paper rule: max ratio | collapsed | sustained norm growth | peak norm growth | "
        "train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _ordered_runs(results):
        c = r["curves"]["documents"]["none"]
        w = c["window_loss"]
        st = r.get("states")
        rows.append(
            f"| {r['name']} | {r['state_size']:,} | {r['params'] / 1e6:.1f}M | {r['train_len']} | "
            f"{r['train']['train_loss']:.3f} | {r['train']['validation']['loss'] / ln2:.3f} | {w['1x']:.3f} | "
            f"{w['8x']:.3f} | {w['32x']:.3f} | {w['64x']:.3f} | {c['paper_rule_max_ratio']:.2f} | "
            f"{'yes' if c['collapsed_paper_rule'] else 'no'} | "
            f"{'-' if st is None else format(st['max_sustained_growth'], '.2f') + 'x'} | "
            f"{'-' if st is None else format(st['max_peak_growth'], '.1f') + 'x'} | "
            f"{r['train']['wall_time_s']:.0f} |"
        )
    mit = ["| run | mitigation | loss (T/2, T] | (4T, 8T] | (16T, 32T] | (32T, 64T] | 64x / 1x | collapsed |", "|---|---|---|---|---|---|---|---|"]
    for r in _ordered_runs(results):
        if r["train_len"] != min(p["train_len"] for p in results["runs"]):
            continue
        for name in MITIGATION_ORDER:
            c = r["curves"]["documents"].get(name)
            if c is None:
                continue
            w = c["window_loss"]
            mit.append(
                f"| {r['name']} | {name} | {w['1x']:.3f} | {w['8x']:.3f} | {w['32x']:.3f} | {w['64x']:.3f} | "
                f"{c['ratio_to_train_len']['64x']:.3f} | {'yes' if c['collapsed_paper_rule'] else 'no'} |"
            )
    lo, hi = results["same_positions"]
    same = ["| run | reference | " + " | ".join(MITIGATION_ORDER) + " |", "|---|---|" + "---|" * len(MITIGATION_ORDER)]
    for r in _ordered_runs(results):
        e = results["excess_at_same_positions"][r["name"]]
        same.append(
            f"| {r['name']} | {e['reference_run']} | "
            + " | ".join("-" if e.get(name) is None else f"{e[name]:+.3f}" for name in MITIGATION_ORDER)
            + " |"
        )
    return {
        "runs": "\n".join(rows),
        "mitigations": "\n".join(mit),
        "same_positions": "\n".join(same),
        "same_positions_window": f"positions {lo + 1}-{hi}",
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate every (size, T_train)")
    r.add_argument("--sizes", default="s,m,l")
    r.add_argument("--train_lens", default="128,512,2048")
    r.add_argument("--root", default="runs/collapse")
    r.add_argument("--parallel", type=int, default=9)
    r.add_argument("--deadline_s", type=float, default=480.0, help="launch no job after this many seconds; kill what still runs then")
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--train_arg", action="append", default=[], help="extra train.py flag (repeatable)")
    g = sub.add_parser("gather", help="collect the evaluated runs into one JSON")
    g.add_argument("--root", default="runs/collapse")
    g.add_argument("--out", default="docs/results/collapse_study.json")
    t = sub.add_parser("report", help="print RESULTS.md's tables from the gathered JSON")
    t.add_argument("--results", default="docs/results/collapse_study.json")
    f = sub.add_parser("plot", help="draw RESULTS.md's figures from the gathered JSON")
    f.add_argument("--results", default="docs/results/collapse_study.json")
    f.add_argument("--out", default="docs/results")
    args = p.parse_args(argv)
    if args.command == "run":
        status = run_jobs(
            args.sizes.split(","),
            [int(t) for t in args.train_lens.split(",")],
            args.root,
            parallel=args.parallel,
            deadline_s=args.deadline_s,
            steps=args.steps,
            extra_train=args.train_arg,
        )
        with open(os.path.join(args.root, "jobs.json"), "w") as fh:
            json.dump(status, fh, indent=1)
        print(json.dumps(status, indent=1))
    elif args.command == "gather":
        from ssm_jax.io import write_json

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, gather(args.root))
        print(f"wrote {args.out}")
    else:
        with open(args.results) as fh:
            results = json.load(fh)
        if args.command == "report":
            for name, table in report_tables(results).items():
                print(f"{name}:\n{table}\n")
        else:
            for path in plot(results, args.out):
                print(f"wrote {path}")


if __name__ == "__main__":
    main()
