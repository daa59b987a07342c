"""SSD forward output kernel: Mosaic GPU (``kernels/ssd_mosaic_gpu.py``, wgmma + TMA) vs Triton (``gpu_output``).

Both run on the same inputs of the benchmark shapes (x ``(b, L, 32, 64)`` bf16, B/C ``(b, L, 1, 128)`` bf16, chunk
256, D fused, bf16 output) as the library's forward runs them: ``C B^T`` from the real ``gpu_prologue.chunk_cb``
kernel, random bf16 entering states (complete: with runs of chunks XLA joins them before the Mosaic kernel),
dt-like ``w`` in (0.001, 0.1) and log-decays ``-exp(A) dt`` with A in (0, 2).

    python benchmarks/mosaic_bench.py --cases b8xL4096,b2xL16384,b1xL65536 --iters 20 --out mosaic_h200.json
    python benchmarks/mosaic_bench.py --smoke --out /tmp/smoke.json     # CPU, interpret mode, tiny shape

Per case and kernel (``triton``, ``mosaic``): compile seconds, wall ms (``ssm_jax.profiling.time_ms``: median and
min of back-to-back calls), device us (``ssm_jax.profiling.device_profile``: kernel busy time per call, GPU only),
the relative differences of the Mosaic output to the Triton one (``||a - t|| / ||t||`` and ``max |a - t| / max
|t|``) and, on the smallest case, of both to an XLA float32 reference. Each kernel runs in its own try/except: a
failure records its error text in the JSON and the other still runs; the JSON is rewritten after every case.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ssm_jax.io import write_json  # noqa: E402  (importing ssm_jax registers ssm_jax.kernels from a checkout)
from ssm_jax.kernels import gpu_output, gpu_prologue, ssd_mosaic_gpu  # noqa: E402
from ssm_jax.kernels.config import KernelConfig, make_plan  # noqa: E402
from ssm_jax.profiling import device_profile, time_ms  # noqa: E402

CASES = {"b8xL4096": (8, 4096), "b2xL16384": (2, 16384), "b1xL65536": (1, 65536)}  # batch, length
H, P, G, N, Q = 32, 64, 1, 128, 256
SMOKE = dict(b=1, L=256, h=2, p=64, g=1, n=64, Q=128)  # interpret mode on CPU: seconds; 2 row blocks
PEAK_BW = 4.27e12  # bytes/s, copy rate measured on the H200 (ssd_bench.py)
ERROR_CHARS = 3000


def make_inputs(b: int, L: int, h: int, p: int, g: int, n: int, Q: int, seed: int = 0) -> dict:
    """Random bf16 inputs of the output kernel in the GPU launcher's layouts (``cb`` is added by the caller)."""
    k = jax.random.split(jax.random.key(seed), 7)
    w = jax.random.uniform(k[3], (b, h, L), jnp.float32, 0.001, 0.1)  # (batch, heads, seqlen) dt
    A = jax.random.uniform(k[4], (h,), jnp.float32, 0.0, 2.0)
    log_decay = -jnp.exp(A)[None, :, None] * w  # (batch, heads, seqlen)
    cs = jnp.cumsum(log_decay.reshape(b, h, L // Q, Q), axis=-1).reshape(b, h, L)  # in-chunk inclusive cumsum
    return dict(
        x=jax.random.normal(k[0], (b, L, h, p), jnp.float32).astype(jnp.bfloat16),  # (batch, seqlen, heads, headdim)
        B=(jax.random.normal(k[1], (b, L, g, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16),  # (b, L, g, n)
        C=jax.random.normal(k[2], (b, L, g, n), jnp.float32).astype(jnp.bfloat16),  # (batch, seqlen, groups, state)
        cs=cs,
        w=w,
        states=jax.random.normal(k[5], (b, h, L // Q, p, n), jnp.float32).astype(jnp.bfloat16),  # (b, h, nc, p, n)
        D=jax.random.normal(k[6], (h,), jnp.float32),
    )


def xla_reference(x, B, C, cs, w, states, D, Q: int) -> jax.Array:
    """``y`` in float32 (HIGHEST precision) from the float32 values of the inputs: the definition, per chunk."""
    b, L, h, p = x.shape
    g = B.shape[2]
    nc = L // Q
    f32 = lambda a: a.astype(jnp.float32)
    heads = jnp.arange(h) // (h // g)
    Cq = f32(C).reshape(b, nc, Q, g, -1)[:, :, :, heads]  # (b, nc, Q, h, n)
    Bq = f32(B).reshape(b, nc, Q, g, -1)[:, :, :, heads]
    xq = f32(x).reshape(b, nc, Q, h, p)
    csq = cs.reshape(b, h, nc, Q).transpose(0, 2, 1, 3)  # (b, nc, h, Q)
    wq = w.reshape(b, h, nc, Q).transpose(0, 2, 1, 3)
    hi = jax.lax.Precision.HIGHEST
    causal = jnp.tril(jnp.ones((Q, Q), bool))
    decay = jnp.exp(jnp.where(causal, csq[..., :, None] - csq[..., None, :], -jnp.inf))  # (b, nc, h, Q, Q)
    M = jnp.einsum("bcthn,bcshn->bchts", Cq, Bq, precision=hi) * decay * wq[..., None, :]
    y = jnp.einsum("bchts,bcshp->bcthp", M, xq, precision=hi)
    off = jnp.einsum("bcthn,bhcpn->bcthp", Cq, f32(states), precision=hi)
    y = y + jnp.exp(csq).transpose(0, 1, 3, 2)[..., None] * off + D[:, None] * xq
    return y.reshape(b, L, h, p)


def rel_norm(a: jax.Array, r: jax.Array) -> float:
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    return float(np.linalg.norm(a - r) / np.linalg.norm(r))


def rel_max(a: jax.Array, r: jax.Array) -> float:
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    return float(np.max(np.abs(a - r)) / np.max(np.abs(r)))


def data_bytes(b: int, L: int, h: int, p: int, g: int, n: int, Q: int, out_bytes: int) -> int:
    """Bytes the output kernel must move: x, y, C, the per-position scalars, states and ``C B^T``."""
    nc = L // Q
    return b * L * h * p * (2 + out_bytes) + b * L * g * n * 2 + 2 * b * h * L * 4 + b * h * nc * p * n * 2 + b * nc * g * Q * Q * 2


def implementations(plan, out_dtype) -> Dict[str, Callable]:
    """Jitted ``(x, B, C, cs, w, states, D, cb) -> y`` per kernel."""
    return {
        "triton": jax.jit(lambda x, B, C, cs, w, st, D, cb: gpu_output.output(plan, x, B, C, cs, w, st, None, D, out_dtype, cb)),
        "mosaic": jax.jit(lambda x, B, C, cs, w, st, D, cb: ssd_mosaic_gpu.output(plan, x, B, C, cs, w, st, None, D, out_dtype, cb)),
    }


def _error(e: BaseException) -> dict:
    """``error`` (the exception's type and message) and ``traceback`` (its tail), both truncated."""
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return {"error": f"{type(e).__name__}: {e}"[:ERROR_CHARS], "traceback": text[-ERROR_CHARS:]}


def run_impl(fn: Callable, args: tuple, iters: int, profile: bool) -> tuple:
    """``(row, y)``: compile time, wall and device times of one implementation (``y`` None if it failed)."""
    row: dict = {}
    try:
        t0 = time.perf_counter()
        y = jax.block_until_ready(fn(*args))
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["wall_ms"], row["wall_min_ms"] = time_ms(fn, args, iters=iters, repeats=3 if profile else 1, warmup=1)
    except Exception as e:  # noqa: BLE001 - recorded, the other implementations still run
        row.update(_error(e))
        return row, None
    if profile:
        try:
            prof = device_profile(fn, args, calls=iters)
            row["device_us"] = prof["busy_us"]
            row["kernels"] = prof["kernels"][:4]
        except Exception as e:  # noqa: BLE001
            row["profile_error"] = _error(e)["error"]
    return row, y


def run_case(name: str, shape: dict, plan, out_dtype, iters: int, profile: bool, with_reference: bool) -> List[dict]:
    """Both kernels on one case's inputs; accuracy against Triton (and the XLA reference)."""
    inp = make_inputs(**shape)
    cb = jax.jit(lambda B, C: gpu_prologue.chunk_cb(plan, B, C, jnp.bfloat16))(inp["B"], inp["C"])
    args = (inp["x"], inp["B"], inp["C"], inp["cs"], inp["w"], inp["states"], inp["D"], cb)
    ref = None
    if with_reference:
        ref = jax.jit(functools.partial(xla_reference, Q=shape["Q"]))(*args[:7])
    floor_ms = data_bytes(**shape, out_bytes=jnp.dtype(out_dtype).itemsize) / PEAK_BW * 1e3
    rows, outputs = [], {}
    for impl, fn in implementations(plan, out_dtype).items():
        row, y = run_impl(fn, args, iters, profile)
        row = {"case": name, "impl": impl, "data_floor_ms": floor_ms, **row}
        if y is not None:
            outputs[impl] = y
            if "triton" in outputs and impl != "triton":
                row["rel_vs_triton"] = rel_norm(y, outputs["triton"])
                row["maxrel_vs_triton"] = rel_max(y, outputs["triton"])
            if ref is not None:
                row["rel_vs_f32_ref"] = rel_norm(y, ref)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    def num(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    status = "ok" if "error" not in row else "FAILED: " + " ".join(row["error"].split())[:160]
    return (
        f"| {row['case']} | {row['impl']} | {num('wall_ms', '.3f')} | {num('device_us', '.1f')} | "
        f"{num('data_floor_ms', '.3f')} | {num('rel_vs_triton', '.2e')} | {num('maxrel_vs_triton', '.2e')} | "
        f"{num('rel_vs_f32_ref', '.2e')} | {status} |"
    )


HEADER = (
    "| case | impl | wall ms | device us | floor ms | rel vs triton | max rel vs triton | rel vs f32 | status |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="b8xL4096,b2xL16384,b1xL65536", help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--smoke", action="store_true", help=f"CPU interpret mode at a tiny shape {SMOKE} (one call per timing, no profile)")
    ap.add_argument("--out", default="", help="JSON path")
    args = ap.parse_args(argv)
    out_dtype = jnp.dtype(args.out_dtype)
    if args.smoke:
        cases = {"smoke": SMOKE}
        iters, profile = 1, False
    else:
        cases = {c: dict(b=CASES[c][0], L=CASES[c][1], h=H, p=P, g=G, n=N, Q=Q) for c in args.cases.split(",") if c}
        iters, profile = args.iters, jax.default_backend() == "gpu"
    smallest = min(cases, key=lambda c: cases[c]["b"] * cases[c]["L"])
    result = {
        "meta": {
            "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "command": "python benchmarks/mosaic_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "out_dtype": str(out_dtype),
            "iters": iters,
            "reference_case": smallest,
        },
        "rows": [],
    }
    print(HEADER, flush=True)
    for name, shape in cases.items():
        plan = make_plan(jnp.bfloat16, jnp.bfloat16, shape["Q"], "gpu", args.smoke, KernelConfig())
        try:
            result["rows"] += run_case(name, shape, plan, out_dtype, iters, profile, name == smallest)
        except Exception as e:  # noqa: BLE001 - inputs or reference failed: the other cases still run
            result["rows"].append({"case": name, "impl": "inputs", **_error(e)})
            print(format_row(result["rows"][-1]), flush=True)
        if args.out:
            write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
