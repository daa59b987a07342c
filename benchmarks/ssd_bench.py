"""Benchmark of the SSD scan on one GPU: Pallas kernels vs impl="xla", forward and forward+backward.

    python benchmarks/ssd_bench.py                      # the three benchmark cases + 1M tokens, default kernels
    python benchmarks/ssd_bench.py --cases b8xL4096 --out docs/benchmarks/ssd_h200.json
    python benchmarks/ssd_bench.py --cases "" --configs '{"triton-out": {"output_kernel": "triton"}}' \
        --config-cases b8xL4096,b2xL16384     # whole calls with other KernelConfig values

Shapes: x (b, L, 32 heads, 64) bf16, dt fp32 (already softplus'd), A (32,), B/C (b, L, 1 group, 128) bf16, D (32,),
chunk 256; fwd+bwd = gradients of x, dt, A, B, C, D of sum(y * cotangent). ``--small`` shrinks heads, headdim and
state (2, 16, 16) and the lengths for a check on CPU (kernels in interpret mode).

Rows: ``xla`` (pure-jnp chunked SSD), ``pallas`` (``ssm_jax.ssd(impl="pallas")``: D and the bf16 output fused
into the output kernel), ``pallas-fused`` (``ssd_pallas`` called directly with the same fusions; ``config:NAME``
rows use ``ssd_pallas`` with the ``--configs`` entry NAME, a dict of ``KernelConfig`` fields, ``Launch`` values as
``[num_warps, num_stages]``).
fwd+bwd: ``value_and_grad`` of ``sum(y * cotangent)`` (``fwdbwd_*``), and ``jax.vjp`` with the cotangent given
(``vjp_*`` in the JSON: no loss reduction over y, as ``y.backward(dy)`` in PyTorch).
Timing: median over repeats of the wall time of ``iters`` back-to-back calls of the jitted function
(``block_until_ready`` at the end), after a warm-up; on GPU also the device time (kernels busy per call, from a
profiler trace of ``iters`` back-to-back calls: ``ssm_jax.profiling.device_profile``), which leaves out host
dispatch as a CUDA-graph measurement does. Peak memory: the compiled function's ``memory_analysis()`` (arguments +
outputs + temporaries). Floors: model FLOPs at 682 TFLOP/s (bf16 matmul rate measured on the H200) and model bytes
at 4.27 TB/s (copy rate measured there).
Accuracy: relative error (||a - r|| / ||r||) of y and every gradient against impl="xla" on float32 copies of
the same inputs (HIGHEST precision).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import ssm_jax  # noqa: E402,F401  (registers ssm_jax.kernels when run from a checkout)
from ssm_jax.kernels import ssd_ops  # noqa: E402
from ssm_jax.kernels.config import KernelConfig, Launch  # noqa: E402
from ssm_jax.profiling import device_profile, time_ms  # noqa: E402
from ssm_jax.ssd import ssd  # noqa: E402

CASES = {"smoke": (1, 512), "b8xL4096": (8, 4096), "b2xL16384": (2, 16384), "b1xL65536": (1, 65536), "b1xL1M": (1, 1 << 20)}
PEAK_FLOPS = 682e12
PEAK_BW = 4.27e12
# The official mamba_ssm Triton kernel on the same H200: forward, forward+backward (CUDA graph).
OFFICIAL = {"b8xL4096": (0.590, 2.57), "b2xL16384": (0.613, 2.62), "b1xL65536": (1.393, 5.55)}


class Shape(NamedTuple):
    """Sizes of every case: heads, headdim, groups, state, chunk."""

    H: int = 32
    P: int = 64
    G: int = 1
    N: int = 128
    Q: int = 256


FULL, SMALL = Shape(), Shape(H=2, P=16, N=16)


def model_flops(s: Shape, b, L, bwd=False):
    c = -(-L // s.Q)
    f = b * c * s.G * 2 * s.Q * s.Q * s.N + b * c * s.H * (2 * s.Q * s.Q * s.P + 2 * 2 * s.Q * s.P * s.N)
    return 3 * f if bwd else f


def model_bytes(s: Shape, b, L, bwd=False):
    io = b * L * s.H * s.P * 2 * 2 + 2 * b * L * s.G * s.N * 2 + b * L * s.H * 4 + b * s.H * s.P * s.N * 4
    return 3 * io if bwd else io  # bwd: read x, B, C, dt, dy; write dx, dB, dC, ddt (about twice the forward)


def make_inputs(s: Shape, b, L, seed=0, heads=None):
    heads = heads or s.H
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    x = jax.random.normal(k[0], (b, L, heads, s.P), jnp.bfloat16)  # (batch, seqlen, heads, headdim)
    dt = jnp.exp(jax.random.uniform(k[1], (b, L, heads), jnp.float32, np.log(1e-3), np.log(1e-1)))
    A = -jnp.exp(jax.random.uniform(k[2], (heads,), jnp.float32, 0.0, np.log(16.0)))
    B = jax.random.normal(k[3], (b, L, s.G, s.N), jnp.bfloat16)  # (batch, seqlen, groups, state)
    C = jax.random.normal(k[4], (b, L, s.G, s.N), jnp.bfloat16)
    D = jax.random.normal(k[5], (heads,), jnp.float32)
    cot = jax.random.normal(k[6], (b, L, heads, s.P), jnp.bfloat16)
    return x, dt, A, B, C, D, cot


def kernel_config(fields: dict) -> KernelConfig:
    """A ``KernelConfig`` from JSON fields (``Launch`` values as ``[num_warps, num_stages]``)."""
    launches = {f.name for f in dataclasses.fields(KernelConfig) if f.type in ("Launch", Launch)}
    return KernelConfig(**{k: Launch(*v) if k in launches else v for k, v in fields.items()})


def forward_fn(impl, s: Shape, config=None):
    """``(x, dt, A, B, C, D) -> y``: ``ssd(impl=...)`` for "xla" and "pallas", else ``ssd_pallas`` with ``config``."""
    if impl in ("xla", "pallas"):
        return lambda x, dt, A, B, C, D: ssd(x, dt, A, B, C, D=D, chunk_size=s.Q, impl=impl)[0]

    def fused(x, dt, A, B, C, D):
        y, _ = ssd_ops.ssd_pallas(x, dt, dt * A, B, C, None, None, chunk_size=s.Q, D=D, out_dtype=x.dtype, config=kernel_config(config or {}))
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


def accuracy(s: Shape, b, L, impls, configs=None, seed=1):
    """Relative errors of y and of every gradient against the float32 xla reference."""
    x, dt, A, B, C, D, cot = make_inputs(s, b, L, seed)
    f32 = lambda v: v.astype(jnp.float32)
    ref_f = jax.jit(loss_grad_fn(forward_fn("xla", s)))
    ref_y = jax.jit(forward_fn("xla", s))(f32(x), dt, A, f32(B), f32(C), D)
    _, ref_g = ref_f(f32(x), dt, A, f32(B), f32(C), D, cot)
    out = {}
    for name in impls:
        fwd = forward_fn(name, s, (configs or {}).get(name))
        y = jax.jit(fwd)(x, dt, A, B, C, D)
        _, g = jax.jit(loss_grad_fn(fwd))(x, dt, A, B, C, D, cot)
        errs = {"y": rel(y, ref_y)}
        errs.update({k: rel(a, r) for k, a, r in zip(("dx", "ddt", "dA", "dB", "dC", "dD"), g, ref_g)})
        out[name] = errs
    return out


def check_1m(s: Shape, b=1, L=1 << 20, tail=1 << 15):
    """1M tokens: the kernel's last ``tail`` outputs and final state against impl="xla" on the tail started from
    the kernel's state after the first ``L - tail`` tokens (an index overflow would corrupt the tail)."""
    x, dt, A, B, C, D, _ = make_inputs(s, b, L, seed=3)
    run = lambda *a, h0=None: ssd_ops.ssd_pallas(*a, h0, None, chunk_size=s.Q)
    y, final = jax.jit(lambda x, dt, B, C: run(x, dt, dt * A, B, C))(x, dt, B, C)
    k = L - tail
    _, mid = jax.jit(lambda x, dt, B, C: run(x, dt, dt * A, B, C))(x[:, :k], dt[:, :k], B[:, :k], C[:, :k])
    yr, fr = ssd(
        x[:, k:].astype(jnp.float32),
        dt[:, k:],
        A,
        B[:, k:].astype(jnp.float32),
        C[:, k:].astype(jnp.float32),
        chunk_size=s.Q,
        initial_state=mid,
        impl="xla",
    )
    return {"y_tail": rel(y[:, k:], yr), "final": rel(final, fr), "finite": bool(jnp.all(jnp.isfinite(y)))}


def check_heads(s: Shape, heads, b=2, L=1000, seed=4):
    """Values and gradients of ``ssd(impl="pallas")`` at a public model's head count (24: 130m, 80: 2.7b; not a
    power of two), a padded length, segments and an initial state, against impl="xla" on float32 copies."""
    x, dt, A, B, C, D, cot = make_inputs(s, b, L, seed, heads=heads)
    k = jax.random.split(jax.random.PRNGKey(seed + 1), 2)
    h0 = jax.random.normal(k[0], (b, heads, s.P, s.N), jnp.float32)
    seg = jnp.cumsum(jax.random.uniform(k[1], (b, L)) < 3e-3, axis=1)

    def grads(impl, f32):
        cast = (lambda v: v.astype(jnp.float32)) if f32 else (lambda v: v)

        def loss(x, dt, A, B, C, h0):
            y, final = ssd(cast(x), dt, A, cast(B), cast(C), D=D, chunk_size=s.Q, initial_state=h0, segment_ids=seg, impl=impl)
            return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32)) + jnp.sum(final), y

        return jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))(x, dt, A, B, C, h0)

    (_, y), g = grads("pallas", False)
    (_, y_ref), g_ref = grads("xla", True)
    out = {"heads": heads, "y": rel(y, y_ref)}
    out.update({name: rel(a, r) for name, a, r in zip(("dx", "ddt", "dA", "dB", "dC", "dh0"), g, g_ref)})
    return out


def bench_case(s: Shape, name, b, L, impls, configs=None, bwd=True, iters=10, repeats=5):
    x, dt, A, B, C, D, cot = make_inputs(s, b, L)
    gpu = jax.default_backend() == "gpu"
    timed = lambda f, a: time_ms(f, a, iters=iters, repeats=repeats, warmup=min(2, repeats))  # noqa: E731
    rows = []
    for impl in impls:
        cfg = (configs or {}).get(impl)
        fwd = forward_fn(impl, s, cfg)
        row = {"case": name, "impl": impl, "config": cfg}
        try:
            jf, secs, mem = compile_fn(fwd, (x, dt, A, B, C, D))
            row["compile_s"] = round(secs, 1)
            row["fwd_ms"], row["fwd_min_ms"] = timed(jf, (x, dt, A, B, C, D))
            row["fwd_mem_gb"] = (mem or 0) / 1e9
            row["fwd_tflops"] = model_flops(s, b, L) / row["fwd_ms"] / 1e9
            row["fwd_gbs"] = model_bytes(s, b, L) / row["fwd_ms"] / 1e6
            if gpu:
                row["fwd_device_ms"] = device_profile(jf, (x, dt, A, B, C, D), calls=iters)["busy_us"] / 1e3
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(limit=3)
            row["error"] = f"fwd: {type(e).__name__}: {str(e)[:300]}"
        if bwd and "error" not in row:
            try:
                gf, secs, mem = compile_fn(loss_grad_fn(fwd), (x, dt, A, B, C, D, cot))
                row["compile_bwd_s"] = round(secs, 1)
                row["fwdbwd_ms"], row["fwdbwd_min_ms"] = timed(gf, (x, dt, A, B, C, D, cot))
                row["fwdbwd_mem_gb"] = (mem or 0) / 1e9
                row["fwdbwd_tflops"] = model_flops(s, b, L, True) / row["fwdbwd_ms"] / 1e9
                if gpu:
                    row["fwdbwd_device_ms"] = device_profile(gf, (x, dt, A, B, C, D, cot), calls=iters)["busy_us"] / 1e3
                vf, _, _ = compile_fn(vjp_fn(fwd), (x, dt, A, B, C, D, cot))
                row["vjp_ms"], _ = timed(vf, (x, dt, A, B, C, D, cot))
                if gpu:
                    row["vjp_device_ms"] = device_profile(vf, (x, dt, A, B, C, D, cot), calls=iters)["busy_us"] / 1e3
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(limit=3)
                row["error"] = f"bwd: {type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows):
    lines = [
        "| case | impl | fwd ms wall (device) | fwd TFLOP/s | fwd GB/s | fwd+bwd ms wall (device) | fwd+bwd TFLOP/s"
        " | peak mem fwd / fwd+bwd GB | official fwd / fwd+bwd ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        off = OFFICIAL.get(r["case"])
        fmt = lambda k, f="{:.3f}": f.format(r[k]) if k in r else "-"
        both = lambda k: fmt(f"{k}_ms") + (f" ({r[k + '_device_ms']:.3f})" if f"{k}_device_ms" in r else "")
        lines.append(
            f"| {r['case']} | {r['impl']} | {both('fwd')} | {fmt('fwd_tflops', '{:.0f}')} | {fmt('fwd_gbs', '{:.0f}')}"
            f" | {both('fwdbwd')} | {fmt('fwdbwd_tflops', '{:.0f}')} | {fmt('fwd_mem_gb', '{:.2f}')} /"
            f" {fmt('fwdbwd_mem_gb', '{:.2f}')} | {'%.3f / %.2f' % off if off else '-'} |" + (f" error: {r['error'][:80]}" if "error" in r else "")
        )
    return "\n".join(lines)


def _guarded(what, fn):
    """``fn()``, or ``{"error": ...}`` if it raises (one failing check must not lose the others)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{what}: {type(e).__name__}: {str(e)[:1000]}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="b8xL4096,b2xL16384,b1xL65536,b1xL1M")
    ap.add_argument("--impls", default="xla,pallas,pallas-fused")
    ap.add_argument("--configs", default="", help='JSON {"name": {KernelConfig field: value}}: timed as "config:name" rows on --config-cases')
    ap.add_argument("--config-cases", default="b8xL4096", help="comma list of cases the --configs run on")
    ap.add_argument("--configs-bwd", action="store_true", help="also time fwd+bwd of each --configs entry")
    ap.add_argument("--accuracy", action="store_true", help="relative errors vs the float32 reference")
    ap.add_argument("--accuracy-impls", default="pallas,pallas-fused")
    ap.add_argument("--check-1m", action="store_true")
    ap.add_argument("--check-heads", default="", help="comma list of head counts for check_heads (e.g. 24,80)")
    ap.add_argument("--smoke", action="store_true", help="first a small correctness check of the kernels")
    ap.add_argument("--small", action="store_true", help="heads, headdim, state 2, 16, 16, short --check-heads lengths, one timing repeat (CPU)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--xla-cases", default="all", help="cases that also time impl='xla' (comma list or 'all')")
    ap.add_argument("--public-cases", default="all", help="cases that also time ssd(impl='pallas') (comma list or 'all')")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "ssd_h200.json"))
    args = ap.parse_args(argv)
    s = SMALL if args.small else FULL
    check_len = (1, 150) if args.small else (2, 1000)  # batch, length of --check-heads
    repeats = 1 if args.small else 5
    configs = {f"config:{k}": v for k, v in json.loads(args.configs).items()} if args.configs else {}

    dev = jax.devices()[0]
    meta = {
        "device": getattr(dev, "device_kind", str(dev)),
        "jax": jax.__version__,
        "shape": s._asdict(),
        "command": "python benchmarks/ssd_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(meta), flush=True)
    result = {"meta": meta, "rows": [], "variants": [], "accuracy": {}, "check_1m": None}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    impls = [i for i in args.impls.split(",") if i]
    if args.smoke:
        result["smoke"] = _guarded("smoke", lambda: accuracy(s, 1, 1024, ["pallas-fused"]))
        print(json.dumps({"smoke": result["smoke"]}), flush=True)
        save()
    for case in [c for c in args.cases.split(",") if c]:
        big = case == "b1xL1M"
        wanted = lambda spec: spec in ("all", "") or case in spec.split(",")  # noqa: B023
        case_impls = [i for i in impls if (i != "xla" or wanted(args.xla_cases)) and (i != "pallas" or wanted(args.public_cases))]
        b, L = CASES[case]
        result["rows"] += bench_case(
            s, case, b, L, [i for i in case_impls if not (big and i == "xla")], bwd=not big, iters=3 if big else args.iters, repeats=repeats
        )
        save()
    if args.accuracy:
        names = [i for i in args.accuracy_impls.split(",") if i and i != "xla"] + list(configs)
        result["accuracy"] = _guarded("accuracy", lambda: accuracy(s, 2, 4096, names, configs))
        print(json.dumps({"accuracy": result["accuracy"]}), flush=True)
        save()
    if args.check_1m:
        result["check_1m"] = _guarded("check_1m", lambda: check_1m(s))
        print(json.dumps({"check_1m": result["check_1m"]}), flush=True)
    for heads in [int(v) for v in args.check_heads.split(",") if v]:
        row = _guarded("check_heads", lambda: check_heads(s, heads, *check_len))  # noqa: B023
        result.setdefault("check_heads", []).append({"heads": heads, **row})
        print(json.dumps({"check_heads": row}), flush=True)
        save()
    for case in [c for c in args.config_cases.split(",") if c] if configs else []:
        b, L = CASES[case]
        result["variants"] += bench_case(s, case, b, L, list(configs), configs, bwd=args.configs_bwd, iters=args.iters, repeats=repeats)
        save()
    save()
    print(markdown(result["variants"] + result["rows"]))
    return result


if __name__ == "__main__":
    main()
