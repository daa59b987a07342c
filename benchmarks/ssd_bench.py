"""Benchmark of the SSD scan on one GPU: Pallas kernels vs impl="xla", forward and forward+backward.

    python benchmarks/ssd_bench.py                      # the three issue cases + 1M tokens, default kernels
    python benchmarks/ssd_bench.py --kernels all --tune --cases ""   # per-kernel sweep + best combination
    python benchmarks/ssd_bench.py --cases b8xL4096 --out docs/benchmarks/ssd_h200.json

Shapes (issue 3): x (b, L, 32 heads, 64) bf16, dt fp32 (already softplus'd), A (32,), B/C (b, L, 1 group, 128)
bf16, D (32,), chunk 256; fwd+bwd = gradients of x, dt, A, B, C, D of sum(y * cotangent).

Rows: ``xla`` (pure-jnp chunked SSD), ``pallas`` (``ssm_jax.ssd(impl="pallas")``: D and the bf16 output fused
into the output kernel), ``pallas-fused`` (``ssd_pallas`` called directly with the same fusions; ``fused:NAME``
rows use ``ssd_pallas`` with a configuration override).
``--kernels`` times each GPU kernel alone per configuration in KERNEL_VARIANTS; ``--tune`` then times fwd and
fwd+bwd of the fastest combination against the default configuration in the same run, with the accuracy of both.
fwd+bwd: ``value_and_grad`` of ``sum(y * cotangent)`` (``fwdbwd_*``), and ``jax.vjp`` with the cotangent given
(``vjp_*`` in the JSON: no loss reduction over y, as ``y.backward(dy)`` in PyTorch).
Timing: median over repeats of the wall time of ``iters`` back-to-back calls of the jitted function
(``block_until_ready`` at the end), after a warm-up; on GPU also the device time (kernels busy per call, from a
profiler trace of ``iters`` back-to-back calls: ``timing.device_profile``), which leaves out host dispatch as a
CUDA-graph measurement does. Peak memory: the compiled function's
``memory_analysis()`` (arguments + outputs + temporaries). Floors: model FLOPs at 682 TFLOP/s (bf16 matmul
rate measured on the H200) and model bytes at 4.27 TB/s (copy rate measured there).
Accuracy: relative error (||a - r|| / ||r||) of y and every gradient against impl="xla" on float32 copies of
the same inputs (HIGHEST precision).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


import ssm_jax  # noqa: E402,F401  (registers ssm_jax.kernels when run from a checkout)
from ssm_jax.kernels import ssd_ops  # noqa: E402
from timing import device_profile, time_ms  # noqa: E402
from ssm_jax.ssd import ssd  # noqa: E402

CASES = {"smoke": (1, 512), "b8xL4096": (8, 4096), "b2xL16384": (2, 16384), "b1xL65536": (1, 65536),
         "b1xL1M": (1, 1 << 20)}
H, P, G, N, Q = 32, 64, 1, 128, 256
PEAK_FLOPS = 682e12
PEAK_BW = 4.27e12
# Official mamba_ssm Triton kernel on the same H200 (issue 3): forward, forward+backward (CUDA graph).
OFFICIAL = {"b8xL4096": (0.590, 2.57), "b2xL16384": (0.613, 2.62), "b1xL65536": (1.393, 5.55)}


def model_flops(b, L, bwd=False):
    c = -(-L // Q)
    f = b * c * G * 2 * Q * Q * N + b * c * H * (2 * Q * Q * P + 2 * 2 * Q * P * N)
    return 3 * f if bwd else f


def model_bytes(b, L, bwd=False):
    io = b * L * H * P * 2 * 2 + 2 * b * L * G * N * 2 + b * L * H * 4 + b * H * P * N * 4
    return 3 * io if bwd else io  # bwd: read x, B, C, dt, dy; write dx, dB, dC, ddt (about twice the forward)


def make_inputs(b, L, seed=0, heads=H):
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    x = jax.random.normal(k[0], (b, L, heads, P), jnp.bfloat16)
    dt = jnp.exp(jax.random.uniform(k[1], (b, L, heads), jnp.float32, np.log(1e-3), np.log(1e-1)))
    A = -jnp.exp(jax.random.uniform(k[2], (heads,), jnp.float32, 0.0, np.log(16.0)))
    B = jax.random.normal(k[3], (b, L, G, N), jnp.bfloat16)
    C = jax.random.normal(k[4], (b, L, G, N), jnp.bfloat16)
    D = jax.random.normal(k[5], (heads,), jnp.float32)
    cot = jax.random.normal(k[6], (b, L, heads, P), jnp.bfloat16)
    return x, dt, A, B, C, D, cot


def forward_fn(impl, config=None):
    if impl in ("xla", "pallas"):
        return lambda x, dt, A, B, C, D: ssd(x, dt, A, B, C, D=D, chunk_size=Q, impl=impl)[0]

    def fused(x, dt, A, B, C, D):
        y, _ = ssd_ops.ssd_pallas(x, dt, dt * A, B, C, None, None, chunk_size=Q, D=D, out_dtype=x.dtype,
                                  config=_overrides(config or {}))
        return y

    return fused


def loss_grad_fn(fwd):
    def loss(x, dt, A, B, C, D, cot):
        return jnp.sum(fwd(x, dt, A, B, C, D).astype(jnp.float32) * cot.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def vjp_fn(fwd):
    """``(y, gradients of x, dt, A, B, C, D)`` for a given cotangent of y: forward+backward as a framework's
    ``y.backward(dy)`` measures it, without the loss reduction over y that ``loss_grad_fn`` adds."""
    def f(x, dt, A, B, C, D, cot):
        y, pullback = jax.vjp(fwd, x, dt, A, B, C, D)
        return y, pullback(cot.astype(y.dtype))

    return f


def compile_fn(f, args):
    """Compiles once; returns ``(executable, compile seconds, peak bytes or None)``."""
    t0 = time.perf_counter()
    exe = jax.jit(f).lower(*args).compile()
    secs = time.perf_counter() - t0
    try:
        m = exe.memory_analysis()
        peak = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        peak = None
    return exe, secs, peak


def rel(a, r):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(r, jnp.float32), np.float64)
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def accuracy(b, L, impls, configs=None, seed=1):
    """Relative errors of y and of every gradient against the float32 xla reference."""
    x, dt, A, B, C, D, cot = make_inputs(b, L, seed)
    f32 = lambda v: v.astype(jnp.float32)
    ref_f = jax.jit(loss_grad_fn(forward_fn("xla")))
    ref_y = jax.jit(forward_fn("xla"))(f32(x), dt, A, f32(B), f32(C), D)
    _, ref_g = ref_f(f32(x), dt, A, f32(B), f32(C), D, cot)
    out = {}
    for name in impls:
        cfg = (configs or {}).get(name)
        fwd = forward_fn(name if name in ("xla", "pallas") else "fused", cfg)
        y = jax.jit(fwd)(x, dt, A, B, C, D)
        _, g = jax.jit(loss_grad_fn(fwd))(x, dt, A, B, C, D, cot)
        errs = {"y": rel(y, ref_y)}
        errs.update({k: rel(a, r) for k, a, r in zip(("dx", "ddt", "dA", "dB", "dC", "dD"), g, ref_g)})
        out[name] = errs
    return out


def check_1m(b=1, L=1 << 20, tail=1 << 15):
    """1M tokens: the kernel's last ``tail`` outputs and final state against impl="xla" on the tail started from
    the kernel's state after the first ``L - tail`` tokens (an index overflow would corrupt the tail)."""
    x, dt, A, B, C, D, _ = make_inputs(b, L, seed=3)
    run = lambda *a, h0=None: ssd_ops.ssd_pallas(*a, h0, None, chunk_size=Q)
    y, final = jax.jit(lambda x, dt, B, C: run(x, dt, dt * A, B, C))(x, dt, B, C)
    s = L - tail
    _, mid = jax.jit(lambda x, dt, B, C: run(x, dt, dt * A, B, C))(x[:, :s], dt[:, :s], B[:, :s], C[:, :s])
    yr, fr = ssd(x[:, s:].astype(jnp.float32), dt[:, s:], A, B[:, s:].astype(jnp.float32),
                 C[:, s:].astype(jnp.float32), chunk_size=Q, initial_state=mid, impl="xla")
    return {"y_tail": rel(y[:, s:], yr), "final": rel(final, fr), "finite": bool(jnp.all(jnp.isfinite(y)))}


def check_heads(heads, b=2, L=1000, seed=4):
    """Values and gradients of ``ssd(impl="pallas")`` at a public model's head count (24: 130m, 80: 2.7b; not a
    power of two), a padded length, segments and an initial state, against impl="xla" on float32 copies."""
    x, dt, A, B, C, D, cot = make_inputs(b, L, seed, heads=heads)
    k = jax.random.split(jax.random.PRNGKey(seed + 1), 2)
    h0 = jax.random.normal(k[0], (b, heads, P, N), jnp.float32)
    seg = jnp.cumsum(jax.random.uniform(k[1], (b, L)) < 3e-3, axis=1)

    def grads(impl, f32):
        cast = (lambda v: v.astype(jnp.float32)) if f32 else (lambda v: v)

        def loss(x, dt, A, B, C, h0):
            y, final = ssd(cast(x), dt, A, cast(B), cast(C), D=D, chunk_size=Q, initial_state=h0, segment_ids=seg,
                           impl=impl)
            return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32)) + jnp.sum(final), y

        return jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))(x, dt, A, B, C, h0)

    (_, y), g = grads("pallas", False)
    (_, y_ref), g_ref = grads("xla", True)
    out = {"heads": heads, "y": rel(y, y_ref)}
    out.update({name: rel(a, r) for name, a, r in zip(("dx", "ddt", "dA", "dB", "dC", "dh0"), g, g_ref)})
    return out


def bench_case(name, impls, configs=None, bwd=True, iters=10):
    b, L = CASES[name]
    x, dt, A, B, C, D, cot = make_inputs(b, L)
    rows = []
    for impl in impls:
        cfg = (configs or {}).get(impl)
        fwd = forward_fn(impl if impl in ("xla", "pallas") else "fused", cfg)
        row = {"case": name, "impl": impl, "config": cfg}
        try:
            jf, secs, mem = compile_fn(fwd, (x, dt, A, B, C, D))
            row["compile_s"] = round(secs, 1)
            row["fwd_ms"], row["fwd_min_ms"] = time_ms(jf, (x, dt, A, B, C, D), iters=iters)
            row["fwd_mem_gb"] = (mem or 0) / 1e9
            row["fwd_tflops"] = model_flops(b, L) / row["fwd_ms"] / 1e9
            row["fwd_gbs"] = model_bytes(b, L) / row["fwd_ms"] / 1e6
            if jax.default_backend() == "gpu":
                row["fwd_device_ms"] = device_profile(jf, (x, dt, A, B, C, D), calls=iters)["busy_us"] / 1e3
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(limit=3)
            row["error"] = f"fwd: {type(e).__name__}: {str(e)[:300]}"
        if bwd and "error" not in row:
            try:
                gf, secs, mem = compile_fn(loss_grad_fn(fwd), (x, dt, A, B, C, D, cot))
                row["compile_bwd_s"] = round(secs, 1)
                row["fwdbwd_ms"], row["fwdbwd_min_ms"] = time_ms(gf, (x, dt, A, B, C, D, cot), iters=iters)
                row["fwdbwd_mem_gb"] = (mem or 0) / 1e9
                row["fwdbwd_tflops"] = model_flops(b, L, True) / row["fwdbwd_ms"] / 1e9
                if jax.default_backend() == "gpu":
                    row["fwdbwd_device_ms"] = device_profile(gf, (x, dt, A, B, C, D, cot), calls=iters)["busy_us"] / 1e3
                vf, _, _ = compile_fn(vjp_fn(fwd), (x, dt, A, B, C, D, cot))
                row["vjp_ms"], _ = time_ms(vf, (x, dt, A, B, C, D, cot), iters=iters)
                if jax.default_backend() == "gpu":
                    row["vjp_device_ms"] = device_profile(vf, (x, dt, A, B, C, D, cot), calls=iters)["busy_us"] / 1e3
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(limit=3)
                row["error"] = f"bwd: {type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


PRE = ("out", "cols")  # every reader of the precomputed C B^T
SCAN_VARIANTS = {  # forward and backward state scans (same fields)
    "default": {}, "s2": {"launch": (("scan", 4, 2),)}, "s4": {"launch": (("scan", 4, 4),)},
    "q128": {"scan_block": 128}, "r32": {"state_rows": 32},
}
KERNEL_VARIANTS = {  # per-kernel configurations timed with --kernels (each kernel alone, b8 x L4096)
    "prepare": {"xla": {}},  # the XLA prologue (cumulative log-decays, layouts) that every kernel reads
    "cb": {"f32": {"cb_dtype": "float32"}, "bf16": {}, "w8": {"launch": (("cb", 8, 2),)}},
    "scan_fwd": SCAN_VARIANTS,
    "scan_bwd": SCAN_VARIANTS,
    "out": {"default": {}, "inline-hb2": {"cb_readers": ("cols",), "heads_per_block": 2},
            "s2": {"launch": (("out", 4, 2),)}},
    "cols": {"default": {}, "inline": {"cb_readers": ("out",)}, "hb1": {"cols_heads_per_block": 1},
             "f32cb": {"cb_dtype": "float32"}, "s2": {"launch": (("cols", 4, 2),)}},
    "pairs": {"default": {}, "s2": {"launch": (("pairs", 8, 2),)}, "w4": {"launch": (("pairs", 4, 3),)}},
    "group_rows": {"default": {}, "ns1": {"rows_state_splits": 1}, "s3": {"launch": (("group_rows", 4, 3),)}},
}


def _overrides(over):
    over = dict(over)
    for key in ("state_dtype", "cb_dtype"):
        if isinstance(over.get(key), str):
            over[key] = jnp.dtype(over[key])
    return over


def kernel_times(case="b8xL4096", which=None, iters=10, deadline=None):
    """Times every GPU kernel alone, for each configuration in KERNEL_VARIANTS (inputs passed as arguments,
    not closed over: constants would be embedded in the executable). Stops starting variants after
    ``deadline`` (``time.time()`` seconds)."""
    from ssm_jax.kernels import ssd_gpu

    b, L = CASES[case]
    x, dt, A, B, C, D, cot = make_inputs(b, L)
    xp, w, cs, Bp, Cp, _ = ssd_ops.prepare(x, dt, dt * A, B, C, None, Q, jnp.float32)
    base = ssd_ops.make_config(x.dtype, B.dtype, (b, L, H, P, G, N), Q)
    st, fin = jax.jit(lambda xp, Bp, cs, w: ssd_gpu.state_scan(base, xp, Bp, cs, w, None, None, backward=False)[:2])(
        xp, Bp, cs, w)
    dfinal = jnp.ones_like(fin)
    Gs = jax.jit(lambda cot, Cp, cs, w, dfinal: ssd_gpu.state_scan(base, cot, Cp, cs, w, None, dfinal,
                                                                   backward=True)[0])(cot, Cp, cs, w, dfinal)
    cb32 = jax.jit(lambda Bp, Cp: ssd_gpu.chunk_cb(base, Bp, Cp, jnp.float32))(Bp, Cp)
    cb16 = cb32.astype(jnp.bfloat16)
    dcb = jax.jit(lambda xp, cot, Bp, Cp, cs, w: ssd_gpu.bwd_pairs(base, xp, cot, Bp, Cp, cs, w, None)[0])(
        xp, cot, Bp, Cp, cs, w)
    calls = {  # kernel -> (function of (cfg, *arrays), arrays)
        "prepare": (lambda cfg, x, dt, A, B, C: ssd_ops.prepare(x, dt, dt * A, B, C, None, Q, jnp.float32),
                    (x, dt, A, B, C)),
        "cb": (lambda cfg, Bp, Cp: ssd_gpu.chunk_cb(cfg, Bp, Cp, cfg.cb_dtype or jnp.float32), (Bp, Cp)),
        "scan_fwd": (lambda cfg, xp, Bp, cs, w: ssd_gpu.state_scan(cfg, xp, Bp, cs, w, None, None, backward=False),
                     (xp, Bp, cs, w)),
        "scan_bwd": (lambda cfg, cot, Cp, cs, w, dfinal: ssd_gpu.state_scan(cfg, cot, Cp, cs, w, None, dfinal,
                                                                            backward=True), (cot, Cp, cs, w, dfinal)),
        "out": (lambda cfg, xp, Bp, Cp, cs, w, st, D, cb32, cb16: ssd_gpu.output(
            cfg, xp, Bp, Cp, cs, w, st.astype(cfg.state_dtype or jnp.float32), None, D, jnp.bfloat16,
            (cb16 if cfg.cb_dtype == jnp.bfloat16 else cb32) if "out" in cfg.cb_readers else None),
                (xp, Bp, Cp, cs, w, st, D, cb32, cb16)),
        "cols": (lambda cfg, xp, cot, Bp, Cp, cs, w, Gs, D, cb32, cb16: ssd_gpu.bwd_cols(
            cfg, xp, cot, Bp, Cp, cs, w, Gs.astype(cfg.state_dtype or jnp.float32), None, D,
            (cb16 if cfg.cb_dtype == jnp.bfloat16 else cb32) if "cols" in cfg.cb_readers else None),
                 (xp, cot, Bp, Cp, cs, w, Gs, D, cb32, cb16)),
        "pairs": (lambda cfg, xp, cot, Bp, Cp, cs, w: ssd_gpu.bwd_pairs(cfg, xp, cot, Bp, Cp, cs, w, None),
                  (xp, cot, Bp, Cp, cs, w)),
        "group_rows": (lambda cfg, xp, cot, Bp, Cp, cs, w, st, Gs, dcb: ssd_gpu.bwd_group_rows(
            cfg, xp, cot, Bp, Cp, cs, w, st.astype(cfg.state_dtype or jnp.float32),
            Gs.astype(cfg.state_dtype or jnp.float32), None, dcb), (xp, cot, Bp, Cp, cs, w, st, Gs, dcb)),
    }
    rows = []
    for kern, variants in KERNEL_VARIANTS.items():
        if which and kern not in which:
            continue
        for vname, over in variants.items():
            if deadline is not None and time.time() > deadline:
                print(json.dumps({"skipped": f"{kern}:{vname}", "why": "deadline"}), flush=True)
                continue
            row = {"case": case, "kernel": kern, "variant": vname, "overrides": over}
            try:
                cfg = ssd_ops.make_config(x.dtype, B.dtype, (b, L, H, P, G, N), Q, **_overrides(over))
                fn, arrays = calls[kern]
                f = jax.jit(functools.partial(fn, cfg))
                t0 = time.perf_counter()
                jax.block_until_ready(f(*arrays))
                row["compile_s"] = round(time.perf_counter() - t0, 1)
                row["ms"], row["min_ms"] = time_ms(f, arrays, iters=iters)
                if jax.default_backend() == "gpu":  # the kernel's own time, without the host's dispatch
                    row["device_ms"] = device_profile(f, arrays, calls=iters)["busy_us"] / 1e3
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(limit=2)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _merge(*overrides):
    """One override dict from several (``launch`` tuples concatenated, ``x2_dots`` intersected: each variant
    only removes products from the split-bf16 default; ``cb_readers`` is decided by the caller)."""
    out, launch, x2 = {}, [], None
    for over in overrides:
        for key, val in over.items():
            if key == "launch":
                launch += list(val)
            elif key == "x2_dots":
                x2 = set(val) if x2 is None else x2 & set(val)
            elif key != "cb_readers":
                out[key] = val
    if x2 is not None:
        out["x2_dots"] = tuple(sorted(x2))
    if launch:
        out["launch"] = tuple(launch)
    return out


def _config(over, case="b8xL4096"):
    b, L = CASES[case]
    return ssd_ops.make_config(jnp.bfloat16, jnp.bfloat16, (b, L, H, P, G, N), Q, interpret=False,
                               **_overrides(over))


def tuned_overrides(kernel_rows):
    """The fastest combination of the per-kernel variants timed by :func:`kernel_times`.

    Forward: scan + output (+ the ``C B^T`` kernel when the output reads it); backward: the backward scan + cols +
    pairs + group_rows (+ the ``C B^T`` kernel when cols reads it and the forward did not compute it; states and
    ``C B^T`` are kept from the forward pass). The merged ``cb_readers`` names the picked output / cols variants
    that read ``C B^T``; the two scans share their variant (same fields).
    """
    t = {(r["kernel"], r["variant"]): r for r in kernel_rows if "ms" in r}
    ms = lambda k, v: t[(k, v)].get("device_ms", t[(k, v)]["ms"]) if (k, v) in t else float("inf")  # noqa: E731
    reads_cb = lambda k, v: k in _config(t[(k, v)]["overrides"]).cb_readers  # noqa: E731
    names = lambda k: [v for (kk, v) in t if kk == k]  # noqa: E731
    scan = min(names("scan_fwd"), key=lambda v: ms("scan_fwd", v) + ms("scan_bwd", v), default=None)
    cb_name = lambda k, v: "bf16" if _config(t[(k, v)]["overrides"]).cb_dtype == jnp.bfloat16 else "f32"  # noqa: E731
    out = min(names("out"), key=lambda v: ms("out", v) + (ms("cb", cb_name("out", v)) if reads_cb("out", v) else 0.0),
              default=None)
    cb_saved = out is not None and reads_cb("out", out)  # the forward's C B^T is kept for bwd_cols
    best_bwd, bwd_cost = None, float("inf")
    for cv in names("cols"):
        for pv in names("pairs"):
            for gv in names("group_rows"):
                cost = ms("cols", cv) + ms("pairs", pv) + ms("group_rows", gv)
                cost += ms("cb", cb_name("cols", cv)) if reads_cb("cols", cv) and not cb_saved else 0.0
                if cost < bwd_cost:
                    best_bwd, bwd_cost = (("cols", cv), ("pairs", pv), ("group_rows", gv)), cost
    picks = ([("scan_fwd", scan)] if scan else []) + ([("out", out)] if out else []) + list(best_bwd or ())
    merged = _merge(*(t[pick]["overrides"] for pick in picks))
    merged["cb_readers"] = tuple(k for k, v in picks if k in ("out", "cols") and reads_cb(k, v))
    return merged, {"scan": scan, "out": out, "bwd": [f"{k}:{v}" for k, v in best_bwd or ()]}


def markdown(rows):
    lines = ["| case | impl | fwd ms wall (device) | fwd TFLOP/s | fwd GB/s | fwd+bwd ms wall (device) | fwd+bwd TFLOP/s"
             " | peak mem fwd / fwd+bwd GB | official fwd / fwd+bwd ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        off = OFFICIAL.get(r["case"])
        fmt = lambda k, f="{:.3f}": f.format(r[k]) if k in r else "-"
        both = lambda k: fmt(f"{k}_ms") + (f" ({r[k + '_device_ms']:.3f})" if f"{k}_device_ms" in r else "")
        lines.append(
            f"| {r['case']} | {r['impl']} | {both('fwd')} | {fmt('fwd_tflops', '{:.0f}')} | {fmt('fwd_gbs', '{:.0f}')}"
            f" | {both('fwdbwd')} | {fmt('fwdbwd_tflops', '{:.0f}')} | {fmt('fwd_mem_gb', '{:.2f}')} /"
            f" {fmt('fwdbwd_mem_gb', '{:.2f}')} | {'%.3f / %.2f' % off if off else '-'} |"
            + (f" error: {r['error'][:80]}" if "error" in r else "")
        )
    return "\n".join(lines)


VARIANTS = {  # kernel configurations swept with --variants (on the --variant-cases)
    "default": {},
    "run10-default": {"cols_heads_per_block": 1, "launch": (("pairs", 4, 3),)},  # the defaults of run 10
    "xla-scalars": {"scalars_kernel": False},
    "split": {"state_variant": "split", "state_rows": 8},  # the few-programs default of run 20
    "fused-scan": {"state_variant": "fused"},  # one scan over the whole sequence even with few programs
    "seg128": {"state_variant": "segments", "scan_programs": 128},
    "seg512": {"state_variant": "segments", "scan_programs": 512},
    "seg-xla-join": {"state_variant": "segments", "join_in_output": False},
    "triton-out": {"output_kernel": "triton", "join_in_output": True},  # Triton's output kernel (Hopper: Mosaic's)
    "mosaic-join": {"join_in_output": True},  # the "segments" join inside the Mosaic output kernel
    "seg1024": {"state_variant": "segments", "scan_programs": 1024},
    "hb8": {"heads_per_block": 8},
    "hb2": {"heads_per_block": 2},
    "warps8": {"num_warps": 8},
    "stages3": {"num_stages": 3},
    "bt32": {"block_t": 32},
    "bf16-all": {"f32_dots": ()},
    "tf32-out": {"f32_dots": ("dx_intra", "dcb", "out_intra")},
    "bf16st": {"state_dtype": "bfloat16"},
    "bf16st-sub64": {"state_dtype": "bfloat16", "scan_block": 64},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="b8xL4096,b2xL16384,b1xL65536,b1xL1M")
    ap.add_argument("--impls", default="xla,pallas,pallas-fused")
    ap.add_argument("--variants", default="", help="comma list of VARIANTS names to sweep on --variant-cases")
    ap.add_argument("--variant-cases", default="b8xL4096", help="comma list of cases the --variants run on")
    ap.add_argument("--variants-bwd", action="store_true", help="also time fwd+bwd of each variant")
    ap.add_argument("--accuracy", action="store_true", help="relative errors vs the float32 reference")
    ap.add_argument("--accuracy-impls", default="pallas,pallas-fused")
    ap.add_argument("--accuracy-variants", default="", help="VARIANTS names also checked with --accuracy")
    ap.add_argument("--check-1m", action="store_true")
    ap.add_argument("--check-heads", default="", help="comma list of head counts for check_heads (e.g. 24,80)")
    ap.add_argument("--kernels", default="", help="time each kernel alone: 'all' or a comma list of KERNEL_VARIANTS")
    ap.add_argument("--tune", action="store_true",
                    help="after --kernels: time fwd and fwd+bwd of the fastest combination of kernel variants against "
                         "the default configuration on b8xL4096 (also with saved states) and check its accuracy")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="stop starting kernel variants after this many s")
    ap.add_argument("--smoke", action="store_true", help="first a small correctness check of the kernels")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--xla-cases", default="all", help="cases that also time impl='xla' (comma list or 'all')")
    ap.add_argument("--public-cases", default="all",
                    help="cases that also time ssd(impl='pallas') (comma list or 'all')")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "ssd_h200.json"))
    args = ap.parse_args(argv)

    dev = jax.devices()[0]
    meta = {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
            "command": "python benchmarks/ssd_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(meta), flush=True)
    result = {"meta": meta, "rows": [], "variants": [], "accuracy": {}, "check_1m": None}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    impls = [s for s in args.impls.split(",") if s]
    if args.smoke:
        try:
            result["smoke"] = accuracy(1, 1024, ["pallas-fused"])
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["smoke"] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        print(json.dumps({"smoke": result["smoke"]}), flush=True)
        save()
    if args.kernels:
        deadline = time.time() + args.deadline_s if args.deadline_s else None
        result["kernels"] = kernel_times(which=[k for k in args.kernels.split(",") if k != "all"], iters=args.iters,
                                         deadline=deadline)
        save()
    if args.tune:
        tuned, picked = tuned_overrides(result.get("kernels", []))
        result["tuned"] = {"overrides": tuned, "picked": picked}
        print(json.dumps({"tuned": result["tuned"]}, default=str), flush=True)
        cfgs = {"fused:default": {}, "fused:tuned": tuned, "fused:tuned+saved": dict(tuned, save_states=True)}
        if "bstate" not in tuned.get("x2_dots", ("bstate",)):  # also the accurate state-gradient product
            x2 = tuple(sorted(set(tuned["x2_dots"]) | {"bstate"}))
            cfgs.update({"fused:tuned-x2bstate": dict(tuned, x2_dots=x2),
                         "fused:tuned-x2bstate+saved": dict(tuned, x2_dots=x2, save_states=True)})
        result["tuned"]["rows"] = bench_case("b8xL4096", list(cfgs), cfgs, bwd=True, iters=args.iters)
        save()
        try:
            result["tuned"]["accuracy"] = accuracy(2, 4096, [c for c in cfgs if "+saved" not in c], cfgs)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["tuned"]["accuracy"] = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
        print(json.dumps({"tuned_accuracy": result["tuned"]["accuracy"]}), flush=True)
        save()
    for case in [c for c in args.cases.split(",") if c]:
        big = case == "b1xL1M"
        wanted = lambda spec: spec in ("all", "") or case in spec.split(",")  # noqa: B023
        case_impls = [i for i in impls
                      if (i != "xla" or wanted(args.xla_cases)) and (i != "pallas" or wanted(args.public_cases))]
        result["rows"] += bench_case(case, [i for i in case_impls if not (big and i == "xla")], bwd=not big,
                                     iters=3 if big else args.iters)
        save()
    if args.accuracy:
        avars = [v for v in args.accuracy_variants.split(",") if v]
        names = [i for i in args.accuracy_impls.split(",") if i] + [f"fused:{v}" for v in avars]
        cfgs = {f"fused:{v}": VARIANTS[v] for v in avars}
        try:
            result["accuracy"] = accuracy(2, 4096, [n for n in names if n != "xla"], cfgs)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["accuracy"] = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
        print(json.dumps({"accuracy": result["accuracy"]}), flush=True)
        save()
    if args.check_1m:
        try:
            result["check_1m"] = check_1m()
        except Exception as e:  # noqa: BLE001
            result["check_1m"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps({"check_1m": result["check_1m"]}), flush=True)
    for heads in [int(v) for v in args.check_heads.split(",") if v]:
        try:
            row = check_heads(heads)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = {"heads": heads, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        result.setdefault("check_heads", []).append(row)
        print(json.dumps({"check_heads": row}), flush=True)
        save()
    if args.variants:
        names = [v for v in args.variants.split(",") if v]
        cfgs = {f"fused:{v}": VARIANTS[v] for v in names}
        for case in [c for c in args.variant_cases.split(",") if c]:
            result["variants"] += bench_case(case, list(cfgs), cfgs, bwd=args.variants_bwd, iters=args.iters)
            save()
    save()
    print(markdown(result["variants"] + result["rows"]))


if __name__ == "__main__":
    main()
