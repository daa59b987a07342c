"""The kernel benchmark's helpers (benchmarks/ssd_bench.py, benchmarks/timing.py).

The per-kernel sweeps in docs/kernel_notes.md come from ``--kernels ... --tune``: these tests check on CPU (kernels
in interpret mode, tiny sizes) that every kernel of the sweep runs with the arguments the sweep builds, that the
merge of per-kernel variants keeps each variant's fields, intersects the split-bf16 products and charges the
``C B^T`` kernel where it is needed, that the profiler-trace reader behind the device times sums the right
events, and that the table's other measurements (fwd+bwd through ``jax.vjp``, ``--check-heads``) run.
"""

import gzip
import json
import os
import sys

import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import ssd_bench  # noqa: E402
import timing  # noqa: E402
from ssm_jax.kernels import ssd_ops  # noqa: E402


def _row(kernel, variant, ms, overrides):
    return {"kernel": kernel, "variant": variant, "ms": ms, "overrides": overrides}


def test_merge_keeps_fields_concatenates_launch_and_intersects_split_products():
    merged = ssd_bench._merge(
        {"x2_dots": ("dcb",), "launch": (("scan", 4, 3),)},
        {"heads_per_block": 2, "cb_readers": ("out",)},
        {"x2_dots": ("bstate", "dcb"), "launch": (("pairs", 8, 3),)},
    )
    assert merged == {"x2_dots": ("dcb",), "heads_per_block": 2, "launch": (("scan", 4, 3), ("pairs", 8, 3))}


def test_launch_overrides_replace_only_the_kernels_they_name():
    cfg = ssd_ops.make_config(jnp.bfloat16, jnp.bfloat16, (1, 512, 4, 64, 1, 128), 256, interpret=False,
                              launch=(("pairs", 8, 2),))
    assert cfg.launch_for("pairs") == (8, 2)
    assert cfg.launch_for("out") == (4, 1)  # the default of a kernel not named keeps its entry


def test_tuned_overrides_picks_the_fastest_combination():
    rows = [
        _row("cb", "bf16", 0.04, {}), _row("cb", "f32", 0.05, {"cb_dtype": "float32"}),
        _row("scan_fwd", "default", 0.12, {}), _row("scan_fwd", "s2", 0.10, {"launch": (("scan", 4, 2),)}),
        _row("scan_bwd", "default", 0.15, {}), _row("scan_bwd", "s2", 0.20, {"launch": (("scan", 4, 2),)}),
        # reading C B^T costs the C B^T kernel: 0.30 + 0.04 beats the inline 0.36
        _row("out", "default", 0.30, {}), _row("out", "inline", 0.36, {"cb_readers": ("cols",)}),
        # the forward's C B^T is kept, so reading it in bwd_cols costs nothing more
        _row("cols", "default", 0.44, {}), _row("cols", "inline", 0.43 + 0.02, {"cb_readers": ("out",)}),
        _row("cols", "hb2", 0.40, {"cols_heads_per_block": 2}),
        _row("pairs", "default", 0.36, {}), _row("pairs", "w8", 0.35, {"launch": (("pairs", 8, 3),)}),
        _row("group_rows", "default", 0.28, {}), _row("group_rows", "ns1", 0.5, {"rows_state_splits": 1}),
        {"kernel": "pairs", "variant": "broken", "error": "compile error", "overrides": {}},
    ]
    tuned, picked = ssd_bench.tuned_overrides(rows)
    assert picked == {"scan": "default", "out": "default", "bwd": ["cols:hb2", "pairs:w8", "group_rows:default"]}
    assert tuned == {"cols_heads_per_block": 2, "launch": (("pairs", 8, 3),), "cb_readers": ("out", "cols")}
    cfg = ssd_bench._config(tuned)  # a valid configuration
    assert cfg.cols_heads_per_block == 2 and cfg.launch_for("pairs") == (8, 3) and cfg.launch_for("cols") == (4, 1)


def test_kernel_sweep_runs_every_kernel_in_interpret_mode(monkeypatch):
    keep = {"prepare": "xla", "cb": "bf16", "scan_fwd": "s2", "scan_bwd": "s2", "out": "inline-hb2", "cols": "default",
            "pairs": "default", "group_rows": "default"}
    monkeypatch.setattr(ssd_bench, "KERNEL_VARIANTS", {k: {v: ssd_bench.KERNEL_VARIANTS[k][v]} for k, v in keep.items()})
    one_call = ssd_bench.time_ms
    monkeypatch.setattr(ssd_bench, "time_ms", lambda f, a, iters: one_call(f, a, iters=1, repeats=1, warmup=0))
    rows = ssd_bench.kernel_times(case="smoke", iters=1)
    assert [(r["kernel"], r["variant"]) for r in rows] == list(keep.items())
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0
    _, picked = ssd_bench.tuned_overrides(rows)
    assert picked["scan"] == "s2" and picked["out"] == "inline-hb2" and picked["bwd"] == ["cols:default", "pairs:default", "group_rows:default"]


@pytest.mark.parametrize("bad", [{"cb_readers": ("rows",)}, {"state_variant": "fast"}])
def test_bad_kernel_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ssd_ops.make_config(jnp.bfloat16, jnp.bfloat16, (1, 512, 4, 64, 1, 128), 256, **bad)


def _write_trace(directory, events):
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 1, "tid": 3, "name": "thread_name", "args": {"name": "python"}},
    ]
    path = os.path.join(directory, "plugins", "profile", "run")
    os.makedirs(path)
    with gzip.open(os.path.join(path, "perfetto_trace.json.gz"), "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_device_profile_sums_stream_kernels_per_call(tmp_path):
    """The trace reader keeps kernels on device stream threads only (not the derived "XLA Ops" line, not host
    events), sums them per name and call, and splits calls at idle gaps: two calls of kernels a (10 + 12 us),
    b (5 us) with a 3 us launch gap inside each call."""
    def x(pid, tid, ts, dur, name):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}

    events = []
    for start in (0.0, 1000.0):
        events += [x(7, 1, start, 10.0, "a"), x(7, 1, start + 13.0, 5.0, "b"), x(7, 1, start + 18.0, 12.0, "a"),
                   x(7, 2, start, 30.0, "a"), x(1, 3, start, 50.0, "PjitFunction")]
    _write_trace(str(tmp_path), events)
    got = timing.summarize(timing.device_events(str(tmp_path)), calls=2, split_gap_us=200.0)
    assert got["calls_seen"] == 2
    assert got["span_us"] == pytest.approx(30.0) and got["busy_us"] == pytest.approx(27.0)
    assert got["gaps_us"] == pytest.approx(3.0)
    per_kernel = {k["name"]: (k["us_per_call"], k["launches_per_call"]) for k in got["kernels"]}
    assert per_kernel == {"a": (22.0, 2.0), "b": (5.0, 1.0)}
    # back to back (no split): one span over both calls
    assert timing.summarize(timing.device_events(str(tmp_path)), calls=2, split_gap_us=float("inf"))["calls_seen"] == 1


def test_device_profile_without_device_events_is_a_clear_error(tmp_path):
    _write_trace(str(tmp_path), [{"ph": "X", "pid": 1, "tid": 3, "ts": 0.0, "dur": 5.0, "name": "host"}])
    with pytest.raises(RuntimeError, match="no kernel events on a device stream thread"):
        timing.device_events(str(tmp_path))


def test_check_heads_runs_at_a_head_count_that_is_not_a_power_of_two(monkeypatch):
    """``--check-heads`` (values and gradients at the public models' head counts) on CPU: 3 heads, small head and
    state sizes, a padded length; bf16 inputs against the float32 reference, so errors of bf16 size."""
    monkeypatch.setattr(ssd_bench, "P", 16)
    monkeypatch.setattr(ssd_bench, "N", 16)
    got = ssd_bench.check_heads(3, b=1, L=150)
    assert set(got) == {"heads", "y", "dx", "ddt", "dA", "dB", "dC", "dh0"}
    for name, err in got.items():
        if name != "heads":
            assert 0 < err < 1e-2, (name, err)


def test_bench_case_times_forward_loss_gradient_and_vjp(monkeypatch):
    """One case through bench_case on CPU (xla impl, one call per timing): every timed field is present."""
    monkeypatch.setattr(ssd_bench, "time_ms", lambda f, a, iters: (1.0, 1.0) if f(*a) is not None else None)
    (row,) = ssd_bench.bench_case("smoke", ["xla"], iters=1)
    assert "error" not in row, row
    assert {"fwd_ms", "fwdbwd_ms", "vjp_ms", "fwd_mem_gb", "fwdbwd_mem_gb"} <= set(row)


def test_vjp_fn_matches_value_and_grad():
    x, dt, A, B, C, D, cot = ssd_bench.make_inputs(1, 256, heads=2)
    fwd = ssd_bench.forward_fn("xla")
    y, grads = ssd_bench.vjp_fn(fwd)(x, dt, A, B, C, D, cot)
    _, want = ssd_bench.loss_grad_fn(fwd)(x, dt, A, B, C, D, cot)
    assert y.shape == x.shape
    for g, w in zip(grads, want):
        g, w = jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)
        assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < 1e-2
