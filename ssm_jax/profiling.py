"""Timing of jitted JAX calls: wall clock, and device time per kernel from a profiler trace (the benchmarks use it).

* :func:`time_ms` -- wall clock of back-to-back calls;
* :func:`device_profile` -- the device's own time per call, read from a JAX profiler (Perfetto) trace: per kernel,
  busy time and the idle gaps between kernels (:func:`device_events` reads the trace, :func:`summarize` sums it).

Wall clock includes host work (dispatch, the profiler's own overhead when tracing) wherever the host is slower than
the device; device time does not, which is what a CUDA-graph measurement of another library compares with.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
import time
from typing import Callable, Sequence, Tuple

import jax
import numpy as np


def time_ms(f: Callable, args: Sequence, *, iters: int = 10, repeats: int = 5, warmup: int = 2) -> Tuple[float, float]:
    """Median and minimum milliseconds per call of ``f(*args)`` over ``repeats`` timings of ``iters`` calls each,
    after ``warmup`` calls (compilation); every timing waits for the device to finish."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / iters)
    return float(np.median(per_call)) * 1e3, float(np.min(per_call)) * 1e3


def device_events(trace_dir: str) -> list:
    """``(start_us, dur_us, name)`` of every complete event on a device stream thread of the trace."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    proc = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in proc.items() if "/device:" in name and "CPU" not in name}
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        if not thread.get((e["pid"], e.get("tid")), "").lower().startswith("stream"):
            continue  # the derived "XLA Ops" / "XLA Modules" lines repeat the stream's kernels
        out.append((float(e["ts"]), float(e["dur"]), e["name"]))
    if not out:
        raise RuntimeError(
            f"no kernel events on a device stream thread in {path}; processes {sorted(proc.values())}, threads {sorted(set(thread.values()))[:40]}"
        )
    return sorted(out)


def summarize(events: list, calls: int, split_gap_us: float) -> dict:
    """Per-kernel time per call, busy time, span and gaps; calls are separated by idle gaps > ``split_gap_us``."""
    per_name = collections.defaultdict(float)
    count = collections.Counter()
    for _, dur, name in events:
        per_name[name] += dur
        count[name] += 1
    spans, cur = [], None
    for ts, dur, _ in events:
        if cur is None or ts - cur[1] > split_gap_us:
            cur = [ts, ts + dur, 0.0]
            spans.append(cur)
        cur[1] = max(cur[1], ts + dur)
        cur[2] += dur
    span_us = sum(s[1] - s[0] for s in spans) / max(1, len(spans))
    busy_us = sum(s[2] for s in spans) / max(1, len(spans))
    kernels = sorted(
        ({"name": n, "us_per_call": per_name[n] / calls, "launches_per_call": count[n] / calls} for n in per_name), key=lambda r: -r["us_per_call"]
    )
    return {"calls_seen": len(spans), "span_us": span_us, "busy_us": busy_us, "gaps_us": span_us - busy_us, "kernels": kernels}


def device_profile(fn: Callable, args: Sequence, calls: int = 10, split_gap_us: float = 200.0, back_to_back: bool = True) -> dict:
    """Profiles ``calls`` calls, each waited for, or (``back_to_back``) all dispatched before waiting, as the
    wall-clock benchmarks time them: then the span is the whole run's divided by ``calls`` and the host time
    to dispatch them is reported too."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(calls):
                out = fn(*args) if back_to_back else jax.block_until_ready(fn(*args))
            dispatch_s = time.perf_counter() - t0
            jax.block_until_ready(out)
            wall_s = time.perf_counter() - t0
        summary = summarize(device_events(tmp), calls, float("inf") if back_to_back else split_gap_us)
    if back_to_back:
        summary.update(
            span_us=summary["span_us"] / calls,
            busy_us=summary["busy_us"] / calls,
            gaps_us=summary["gaps_us"] / calls,
            host_dispatch_us=dispatch_s / calls * 1e6,
        )
    summary["wall_us"] = wall_s / calls * 1e6
    return summary
