"""The kernel benchmark's per-kernel sweep and its choice of the fastest combination (benchmarks/ssd_bench.py).

The GPU figures in docs/benchmarks.md come from ``--kernels all --tune``: these tests check on CPU (kernels in
interpret mode, tiny sizes) that every kernel of the sweep runs with the arguments the sweep builds, and that
the merge of per-kernel variants keeps each variant's fields, intersects the split-bf16 products and charges
the ``C B^T`` kernel where it is needed.
"""

import os
import sys

import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import ssd_bench  # noqa: E402
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
    keep = {"cb": "bf16", "scan_fwd": "default", "scan_bwd": "default", "out": "inline-hb2", "cols": "default",
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
    assert picked["out"] == "inline-hb2" and picked["bwd"] == ["cols:default", "pairs:default", "group_rows:default"]


@pytest.mark.parametrize("bad", [{"cb_readers": ("rows",)}, {"state_variant": "fast"}])
def test_bad_kernel_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ssd_ops.make_config(jnp.bfloat16, jnp.bfloat16, (1, 512, 4, 64, 1, 128), 256, **bad)
