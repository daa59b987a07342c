"""The measured figures of README.md and docs/benchmarks.md, generated from the JSON under docs/benchmarks/.

Every block between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in those two files is the output of
``TABLES[NAME]()`` below, which reads only JSON written by the benchmark scripts:

    python docs/benchmark_tables.py            # rewrite the blocks from the JSON
    python docs/benchmark_tables.py --check    # exit 1 if a block differs from what the JSON gives

``tests/test_benchmark_docs.py`` runs the check in CI and also looks for measured figures typed outside the
blocks. The official mamba_ssm figures are the one input that is not ours: :data:`ANCHORS`, the anchor
measurements of the official kernels on the same machine type, quoted as reference values.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from typing import Callable, Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_DIR = os.path.join(ROOT, "docs", "benchmarks")
DOCS = ("README.md", os.path.join("docs", "benchmarks.md"))
CASES = ("b8xL4096", "b2xL16384", "b1xL65536")

# The official mamba_ssm Triton kernels (torch 2.11, triton 3.6) on an H200 of the same workplace, and that
# machine's measured floors: the anchor measurements the kernels were built against, not re-run by our scripts.
ANCHORS = {
    "fwd_ms": {"b8xL4096": 0.590, "b2xL16384": 0.613, "b1xL65536": 1.393},
    "fwdbwd_graph_ms": {"b8xL4096": 2.57, "b2xL16384": 2.62, "b1xL65536": 5.55},  # CUDA graph
    "matmul_tflops": 682.0,  # measured bf16 matmul rate
}
TARGET_SPEEDUP = 1.5  # the kernels' target: 1.5x the official anchors
STREAM_GOAL_S = 30.0  # the streaming goal: 1M tokens in under 30 s per mitigation


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    with open(os.path.join(JSON_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def source(name: str) -> str:
    """``"`docs/benchmarks/NAME` (DEVICE, jax V)"`` and, when the JSON records it, the command that wrote it."""
    data = load(name)
    meta = data.get("meta", data)
    text = f"`docs/benchmarks/{name}` ({meta['device']}, jax {meta['jax']})"
    if "command" in meta:
        command = re.sub(r"--out \S+", f"--out docs/benchmarks/{name}", meta["command"])
        text += f", written by:\n\n    {command}"
    return text


# ------------------------------------------------------------------------------------------------ SSD


def ssd_rows() -> Dict[tuple, dict]:
    return {(r["case"], r["impl"]): r for r in load("ssd_h200.json")["rows"]}


def _wall_device(row: dict, key: str) -> str:
    return f"{row[key + '_ms']:.3f} ({row[key + '_device_ms']:.3f})" if key + "_ms" in row else "-"


def ssd() -> str:
    rows = []
    for r in load("ssd_h200.json")["rows"]:
        bold = (lambda s: f"**{s}**") if r["impl"] == "pallas" else (lambda s: s)
        fwd = f"{bold(format(r['fwd_ms'], '.3f'))} ({r['fwd_device_ms']:.3f})"
        fwdbwd = f"{bold(format(r['fwdbwd_ms'], '.3f'))} ({r['fwdbwd_device_ms']:.3f})" if "fwdbwd_ms" in r else "-"
        mem = f"{r['fwd_mem_gb']:.2f} / " + (f"{r['fwdbwd_mem_gb']:.2f}" if "fwdbwd_mem_gb" in r else "-")
        rows.append(
            [
                r["case"],
                r["impl"],
                fwd,
                f"{r['fwd_tflops']:.0f}",
                f"{r['fwd_gbs']:.0f}",
                fwdbwd,
                _wall_device(r, "vjp"),
                f"{r['fwdbwd_tflops']:.0f}" if "fwdbwd_tflops" in r else "-",
                mem,
            ]
        )
    return table(
        [
            "case",
            "impl",
            "fwd ms wall (device)",
            "fwd TFLOP/s",
            "fwd GB/s",
            "fwd+bwd ms wall (device)",
            "vjp ms wall (device)",
            "fwd+bwd TFLOP/s",
            "peak mem fwd / fwd+bwd (GB)",
        ],
        rows,
    )


def ssd_source() -> str:
    row = ssd_rows()[("b8xL4096", "pallas")]
    gflop = row["fwd_tflops"] * row["fwd_ms"]  # TFLOP/s x ms = GFLOP
    return (
        f"Measured side by side in one run: {source('ssd_h200.json')}\n\n"
        f"TFLOP/s and GB/s are the model's FLOPs ({gflop:.1f} GFLOP forward at b8xL4096, 3x for fwd+bwd) and "
        f"bytes (inputs read once, outputs written once) over the wall time. At the anchor machine's measured "
        f"bf16 matmul rate ({ANCHORS['matmul_tflops']:.0f} TFLOP/s) these FLOPs take "
        f"{gflop / ANCHORS['matmul_tflops']:.2f} ms forward and {3 * gflop / ANCHORS['matmul_tflops']:.2f} ms "
        f"fwd+bwd at b8xL4096."
    )


def ssd_accuracy() -> str:
    data = load("ssd_h200.json")
    acc, heads = data["accuracy"]["pallas"], {h["heads"]: h for h in data["check_heads"]}
    names = ["y", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0"]
    rows = [[n, f"{acc[n]:.2e}" if n in acc else "-"] + [f"{heads[h][n]:.2e}" if n in heads[h] else "-" for h in sorted(heads)] for n in names]
    one_m = data["check_1m"]
    return (
        table(["relative error", "b2 x L4096, 32 heads, vs impl=xla"] + [f"{h} heads, b2 x 1000, through ssd()" for h in sorted(heads)], rows)
        + f'\n\n1M tokens: the last outputs and the final state agree with impl="xla" restarted from the '
        f"kernel's state to {one_m['y_tail']:.1e} / {one_m['final']:.1e}; "
        + ("all outputs finite." if one_m["finite"] else "NOT all outputs finite.")
    )


def ssd_targets() -> str:
    rows, acc = ssd_rows(), load("ssd_h200.json")["accuracy"]["pallas"]
    lines = []
    for label, key, anchor in (("forward", "fwd_ms", "fwd_ms"), ("forward+backward (CUDA graph anchor)", "fwdbwd_ms", "fwdbwd_graph_ms")):
        cells = []
        for case in CASES:
            ours, official = rows[(case, "pallas")][key], ANCHORS[anchor][case]
            limit = official / TARGET_SPEEDUP
            verdict = "**met**" if ours <= limit else "**not met**"
            digits = 3 if anchor == "fwd_ms" else 2  # as the anchors were quoted
            cells.append(f"{verdict}: {ours:.3f} vs <= {limit:.3f} ms ({official / ours:.2f}x the official {official:.{digits}f} ms)")
        lines.append([f"{label} <= official / {TARGET_SPEEDUP}"] + cells)
    worst = max(v for k, v in acc.items())
    lines.append(["relative error <= 3e-3, y and every gradient", f"{'met' if worst <= 3e-3 else 'not met'}: max {worst:.2e}", "", ""])
    ratio = rows[("b1xL1M", "pallas")]["fwd_ms"] / rows[("b1xL65536", "pallas")]["fwd_ms"]
    lines.append(
        [
            "1M tokens forward within 20x of b1 x L65536",
            "",
            "",
            f"{'met' if ratio <= 20 else 'not met'}: {rows[('b1xL1M', 'pallas')]['fwd_ms']:.2f} ms = {ratio:.1f}x",
        ]
    )
    return f"Against the kernels' targets ({TARGET_SPEEDUP}x the official anchors in every case; wall clock):\n\n" + table(
        ["target"] + list(CASES), lines
    )


def ssd_variants() -> str:
    rows, variants = ssd_rows(), {(v["case"], v["impl"]): v for v in load("ssd_h200.json")["variants"]}
    out = [["default: Mosaic output kernel, the runs' join by XLA before it"] + [_wall_device(rows[(c, "pallas")], "fwd") for c in CASES]]
    for impl, what in (
        ("fused:triton-out", "Triton output kernel, the join inside it"),
        ("fused:mosaic-join", "Mosaic output kernel, the join inside it"),
    ):
        out.append([f"`{impl.split(':')[1]}`: {what}"] + [_wall_device(variants[(c, impl)], "fwd") for c in CASES])
    return table(["forward, ms wall (device)"] + list(CASES), out)


def mosaic() -> str:
    by = {(r["case"], r["impl"]): r for r in load("mosaic_h200.json")["rows"]}
    out = []
    for case in CASES:
        triton = by[(case, "triton")]
        for impl in ("mosaic:r64_s2", "mosaic:r64_s2_smem_a"):
            r = by[(case, impl)]
            ratio = triton["device_us"] / r["device_us"]
            out.append(
                [
                    case,
                    impl.split(":")[1],
                    f"{r['device_us']:.1f}",
                    f"{triton['device_us']:.1f}",
                    f"{ratio:.2f}x ({'faster' if ratio > 1 else 'slower'})",
                    f"{r['maxrel_vs_triton']:.1e}",
                ]
            )
    return table(["case", "Mosaic variant", "Mosaic us (device)", "Triton us (device)", "Triton / Mosaic", "max rel. difference"], out)


def profile() -> str:
    profiles = load("profile_h200.json")["profiles"]
    fwd, both = profiles["pallas fwd"]["kernels"], profiles["pallas fwd+bwd"]["kernels"]

    def cell(kernels: List[dict], i: int) -> List[str]:
        return [f"`{kernels[i]['name']}`", f"{kernels[i]['us_per_call']:.1f}"] if i < len(kernels) else ["", ""]

    rows = [cell(fwd, i) + cell(both, i) for i in range(max(len(fwd), len(both)))]
    return table(["forward kernel", "us", "forward+backward kernel", "us"], rows)


# ------------------------------------------------------------------------------------------------ training


def train_8k() -> str:
    data = load("train_throughput_h200_8k_side_by_side.json")
    rows = [
        [
            r["impl"],
            str(r["seq_len"]),
            str(r["batch"]),
            f"{r['tokens_per_s']:,.0f}",
            f"{r['step_ms']:.1f}",
            f"{r['model_tflops_per_s']:.1f}",
            f"{r['mfu']:.1%}",
            f"{r['peak_memory_gb']:.1f}",
        ]
        for r in data["rows"]
    ]
    by = {r["impl"]: r for r in data["rows"]}
    speedup = by["pallas"]["tokens_per_s"] / by["xla"]["tokens_per_s"]
    memory = 1 - by["pallas"]["peak_memory_gb"] / by["xla"]["peak_memory_gb"]
    return (
        table(["impl", "seq len", "batch", "tokens/s", "step ms", "model TFLOP/s", "MFU", "peak mem GB"], rows)
        + f"\n\nWith the kernels the step is {speedup:.2f}x faster and uses {memory:.0%} less memory. "
        f"{source('train_throughput_h200_8k_side_by_side.json')}"
    )


# ------------------------------------------------------------------------------------------------ streaming


def _stream_rows(data: dict) -> List[List[str]]:
    rows = []
    for r in data["results"]:
        name = r["mitigation"] + (f" ({data['window']})" if r["mitigation"] == "sliding_window" else "")
        seconds = f"{r['seconds']:.2f}"
        if r["extrapolated"]:
            seconds += f" (extrapolated from {r['tokens_streamed']:,} tokens in {r['measured_s']:.1f} s)"
        rows.append([name, seconds, f"{r['tokens_per_s']:,.0f}", f"{r['compile_s']:.1f}"])
    return rows


def stream_1m() -> str:
    data = load("stream_1m_h200.json")
    return table(["mitigation", f"seconds for {data['tokens']:,} tokens", "tokens/s", "compile s"], _stream_rows(data))


def stream_state_norm() -> str:
    data = load("stream_1m_state_norm_h200_stepwise.json")
    return table(
        ["mitigation", f"seconds for {data['tokens']:,} tokens", "tokens/s", "compile s"],
        [[f"{row[0]} (stepwise kernel)"] + row[1:] for row in _stream_rows(data)],
    )


def stream_goal() -> str:
    scan = {r["mitigation"]: r for r in load("stream_1m_h200.json")["results"]}
    kernel = load("stream_1m_state_norm_h200_stepwise.json")["results"][0]
    best = {**scan, "state_norm": kernel}
    met = [name for name, r in best.items() if r["seconds"] < STREAM_GOAL_S]
    missed = [name for name in best if name not in met]
    label = {n: f"{n} ({best[n]['seconds']:.1f} s{', stepwise kernel, extrapolated' if n == 'state_norm' else ''})" for n in best}
    return (
        f"Goal: 1M tokens in under {STREAM_GOAL_S:.0f} s per mitigation. Met by "
        + ", ".join(label[n] for n in met)
        + (f"; not met by {', '.join(missed)}." if missed else ".")
    )


def stepwise() -> str:
    data = load("stepwise_h200.json")
    sizes = data["sizes"]
    rows = []
    for r in data["results"]:
        if r["impl"] == "recurrent":
            rows.append(['`lax.scan` (impl="recurrent")', f"{r['seconds'] * 1e3:.1f}", "", ""])
        else:
            rows.append(
                [
                    f"stepwise kernel, {r['time_block']}-step blocks, {r['num_warps']} warps",
                    f"{r['seconds'] * 1e3:.1f}",
                    f"{r['us_per_step']:.2f}",
                    f"{r['projected_1m_s']:.0f}",
                ]
            )
    layers, calls = 24, (1 << 20) // sizes["l"]
    run = load("stream_1m_state_norm_h200_stepwise.json")["results"][0]
    stream = run["seconds"]
    return (
        table(
            [
                f"one layer call: {sizes['l']} tokens, {sizes['h']} heads of {sizes['p']} x {sizes['n']}",
                "ms",
                "us per step",
                f"x {layers} layers x {calls} calls = s per 1M tokens",
            ],
            rows,
        )
        + f"\n\nStreaming 1M tokens with state_norm makes {layers * calls} such layer calls; its measured rate "
        f"({stream:.1f} s per 1M tokens{', extrapolated' if run['extrapolated'] else ''}) leaves at most {stream / (layers * calls) * 1e3:.1f} ms "
        f"per call, the rest of the model included."
    )


def streaming_memory() -> str:
    data = load("streaming_memory_h200.json")
    rows = [[f"{r['tokens']:,}", f"{r['seconds']:.2f}", f"{r['device_peak_bytes'] / 2**20:.1f}"] for r in data["results"]]
    return (
        table(["tokens", "seconds (incl. compile)", "peak device memory (MiB)"], rows)
        + f"\n\nPeak memory ratio for 4x the tokens: {data['peak_ratio_4x_tokens']:.3f}."
    )


def gpu_suite() -> str:
    """The latest recorded run of the GPU test suite (``benchmarks/gpu_suite.py``): when, where, the counts and
    each test's outcome, with the assertion of any that failed."""
    data = load("gpu_suite_h200.json")
    c = data["counts"]
    rows = []
    for t in data["tests"]:
        note = t.get("message", "").splitlines()[0] if t["outcome"] != "passed" else ""
        rows.append([f"`{t['name'].split('::', 1)[1]}`", t["outcome"], f"{t['seconds']:.1f}", note.replace("|", "/")])
    return (
        f"Run on {data['date']} at commit `{data['commit']}` on an {data['device']} (compute capability "
        f"{data['compute_capability']}, jax {data['jax']}, flax {data['flax']}): {c['passed']} passed, {c['failed']} failed, "
        f"{c['error']} errors, {c['skipped']} skipped.\n\n" + table(["test", "outcome", "s", "failure"], rows)
    )


# ------------------------------------------------------------------------------------------------ README


def readme() -> str:
    rows = ssd_rows()
    b8, b2, b1 = (rows[(c, "pallas")] for c in CASES)
    xla8 = rows[("b8xL4096", "xla")]
    anchors = ANCHORS["fwd_ms"]
    mosaic_by = {(r["case"], r["impl"]): r for r in load("mosaic_h200.json")["rows"]}
    ratios = {c: mosaic_by[(c, "triton")]["device_us"] / mosaic_by[(c, "mosaic:r64_s2")]["device_us"] for c in CASES}
    slower = [c for c in CASES if ratios[c] < 1]
    train = {r["impl"]: r for r in load("train_throughput_h200_8k_side_by_side.json")["rows"]}
    stream = {r["mitigation"]: r for r in load("stream_1m_h200.json")["results"]}
    kernel = load("stream_1m_state_norm_h200_stepwise.json")["results"][0]
    memory = load("streaming_memory_h200.json")["results"]
    out = [
        [
            "SSD forward, b8 x L4096, 32x64 heads, N 128, bf16",
            f'`ssd(impl="pallas")` {b8["fwd_ms"]:.3f} ms, pure JAX {xla8["fwd_ms"]:.2f} ms (official Triton anchor {anchors["b8xL4096"]:.3f} ms)',
        ],
        [
            "SSD forward+backward, same",
            f"Pallas {b8['fwdbwd_ms']:.2f} ms, pure JAX {xla8['fwdbwd_ms']:.1f} ms "
            f"(official anchor, CUDA graph, {ANCHORS['fwdbwd_graph_ms']['b8xL4096']:.2f} ms)",
        ],
        [
            "SSD forward, b2 x L16384 / b1 x L65536",
            f"Pallas {b2['fwd_ms']:.3f} / {b1['fwd_ms']:.3f} ms (official anchor {anchors['b2xL16384']:.3f} / {anchors['b1xL65536']:.3f} ms)",
        ],
        ["SSD forward, 1M tokens, batch 1", f"Pallas {rows[('b1xL1M', 'pallas')]['fwd_ms']:.1f} ms"],
        [
            "forward output kernel alone, Triton / Mosaic device time, " + " / ".join(CASES),
            " / ".join(f"{ratios[c]:.2f}x" for c in CASES)
            + (f" (Mosaic, the Hopper default, is slower alone at {' and '.join(slower)})" if slower else ""),
        ],
        [
            "130m training step, 8K x 4 tokens",
            f"Pallas {train['pallas']['tokens_per_s'] / 1e3:.0f}K tokens/s, XLA path "
            f"{train['xla']['tokens_per_s'] / 1e3:.0f}K tokens/s (an early kernel revision; the current kernels await "
            f"a re-run)",
        ],
        [
            "streaming 1M tokens through 130m (float32)",
            f"{stream['none']['seconds']:.1f} s (forget_more {stream['forget_more']['seconds']:.1f} s, sliding window "
            f"({load('stream_1m_h200.json')['window']}) {stream['sliding_window']['seconds']:.1f} s, state_norm "
            f"{kernel['seconds']:.1f} s extrapolated; older code, awaits a re-run)",
        ],
        [
            f"streaming memory, {memory[0]['tokens'] // 1024}K vs {memory[1]['tokens'] // 1024}K tokens",
            f"{memory[0]['device_peak_bytes'] / 2**20:.0f} MiB vs {memory[1]['device_peak_bytes'] / 2**20:.0f} MiB peak",
        ],
    ]
    return table(["what", "result"], out)


TABLES: Dict[str, Callable[[], str]] = {
    "readme_benchmarks": readme,
    "ssd": ssd,
    "ssd_source": ssd_source,
    "ssd_accuracy": ssd_accuracy,
    "ssd_targets": ssd_targets,
    "ssd_variants": ssd_variants,
    "mosaic": mosaic,
    "profile": profile,
    "train_8k": train_8k,
    "stream_1m": stream_1m,
    "stream_state_norm": stream_state_norm,
    "stream_goal": stream_goal,
    "stepwise": stepwise,
    "streaming_memory": streaming_memory,
    "gpu_suite": gpu_suite,
}
BLOCK = re.compile(r"<!-- table:(\w+) -->\n(.*?)<!-- /table:\1 -->", re.S)


def blocks(text: str) -> Dict[str, str]:
    """``{name: content}`` of the marked blocks of a page."""
    return {m.group(1): m.group(2).removesuffix("\n") for m in BLOCK.finditer(text)}


def regenerate(text: str) -> str:
    """``text`` with every marked block replaced by its generated content (unknown names raise KeyError)."""
    return BLOCK.sub(lambda m: f"<!-- table:{m.group(1)} -->\n{TABLES[m.group(1)]()}\n<!-- /table:{m.group(1)} -->", text)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ from the JSON")
    args = parser.parse_args(argv)
    stale = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = regenerate(text)
        if new != text:
            stale.append(doc)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    verb = "differ from the JSON" if args.check else "rewritten"
    print(f"{', '.join(stale)}: {verb}" if stale else "every block matches the JSON")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
