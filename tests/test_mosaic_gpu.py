"""The Mosaic GPU output kernel (``kernels/ssd_mosaic_gpu.py``) on CPU: values and CUDA lowering.

* Values: the kernel runs in Mosaic GPU's interpreter (``plan.interpret``; the interpreter takes wgmma operands from
  shared memory and has no ``layout_cast``, so the decayed block goes through shared memory there) and is compared
  with a float32 reference written here and with the Triton kernel ``gpu_output.output`` in interpret mode.
  Threshold: relative error ``||a - r|| / ||r|| <= 5e-3`` (bf16 operands and output, float32 accumulation).
* Lowering: ``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))`` (register-A wgmma and the
  ``plgpu.transpose_ref`` state operand included) at the benchmark shape and at small odd ones.
* ``benchmarks/mosaic_bench.py --smoke`` end to end, as a script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas.mosaic_gpu", reason="installed jax has no Pallas Mosaic GPU")

from ssm_jax.kernels import gpu_output, gpu_prologue, ssd_mosaic_gpu  # noqa: E402
from ssm_jax.kernels.config import KernelConfig, make_plan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REL_TOL = 5e-3  # ||a - r|| / ||r|| against the float32 reference and against the Triton kernel


def _interpreter_or_skip() -> None:
    try:
        ssd_mosaic_gpu._interpret_params()
    except ImportError as e:  # pragma: no cover - older jax without the Mosaic GPU interpreter
        pytest.skip(f"installed jax has no Mosaic GPU interpreter: {e}")


def rel(a, r) -> float:
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    return float(np.linalg.norm(a - r) / np.linalg.norm(r))


def make_inputs(b, L, h, p, g, n, Q, seed=0) -> dict:
    """Random kernel inputs (never zeros): dt-like ``w`` in (0.001, 0.1), log-decays ``-exp(A) w``, A in (0, 2)."""
    ks = jax.random.split(jax.random.key(seed), 7)
    w = jax.random.uniform(ks[3], (b, h, L), jnp.float32, 0.001, 0.1)  # (batch, heads, seqlen)
    A = jax.random.uniform(ks[4], (h,), jnp.float32, 0.0, 2.0)
    log_decay = -jnp.exp(A)[None, :, None] * w
    cs = jnp.cumsum(log_decay.reshape(b, h, L // Q, Q), axis=-1).reshape(b, h, L)  # restarts every chunk
    bf16 = lambda k, shape, scale=1.0: (jax.random.normal(k, shape, jnp.float32) * scale).astype(jnp.bfloat16)
    return dict(
        x=bf16(ks[0], (b, L, h, p)),  # (batch, seqlen, heads, headdim)
        B=bf16(ks[1], (b, L, g, n), n**-0.5),  # (batch, seqlen, groups, state)
        C=bf16(ks[2], (b, L, g, n)),
        cs=cs,
        w=w,
        states=bf16(ks[5], (b, h, L // Q, p, n)),  # (batch, heads, chunks, headdim, state)
        D=jax.random.normal(ks[6], (h,), jnp.float32),
    )


def reference(x, B, C, cs, w, states, D, Q):
    """Float32 definition: ``y_t = sum_{s<=t} (C_t.B_s) exp(cs_t - cs_s) w_s x_s + exp(cs_t) C_t.H_c^T + D x_t``."""
    b, L, h, p = x.shape
    k = h // B.shape[2]
    hi = jax.lax.Precision.HIGHEST
    ys = []
    for c in range(L // Q):
        sl = slice(c * Q, (c + 1) * Q)
        heads = []
        for hh in range(h):
            Ct = C[:, sl, hh // k].astype(jnp.float32)  # (b, Q, n)
            Bs = B[:, sl, hh // k].astype(jnp.float32)
            xs = x[:, sl, hh].astype(jnp.float32)  # (b, Q, p)
            cst, ws = cs[:, hh, sl], w[:, hh, sl]  # (b, Q)
            seg = cst[:, :, None] - cst[:, None, :]  # (b, t, s)
            decay = jnp.where(jnp.tril(jnp.ones((Q, Q), bool)), jnp.exp(jnp.minimum(seg, 0.0)), 0.0)
            M = jnp.einsum("btn,bsn->bts", Ct, Bs, precision=hi) * decay * ws[:, None, :]
            y = jnp.einsum("bts,bsp->btp", M, xs, precision=hi)
            y += jnp.exp(cst)[..., None] * jnp.einsum("btn,bpn->btp", Ct, states[:, hh, c].astype(jnp.float32), precision=hi)
            if D is not None:
                y += D[hh] * xs
            heads.append(y)
        ys.append(jnp.stack(heads, axis=2))  # (b, Q, h, p)
    return jnp.concatenate(ys, axis=1)


def _plan(Q, interpret):
    return make_plan(jnp.bfloat16, jnp.bfloat16, Q, "gpu", interpret, KernelConfig())


# (b, L, h, p, g, n), chunk, out dtype, with D: small interpreted cases (seconds each on 2 CPU cores).
VALUE_CASES = [
    ((2, 512, 4, 64, 2, 64), 256, jnp.float32, True),  # 4 row blocks: the 2-slot ring wraps twice
    ((1, 512, 2, 64, 1, 64), 256, jnp.bfloat16, True),  # bf16 output
    ((1, 256, 2, 128, 1, 128), 128, jnp.float32, False),  # p = n = 128, no D
    ((1, 128, 4, 64, 4, 128), 64, jnp.float32, True),  # one head per group, chunk 64
]


@pytest.mark.parametrize("shape,Q,out_dtype,with_D", VALUE_CASES)
def test_matches_reference_and_triton(shape, Q, out_dtype, with_D):
    _interpreter_or_skip()
    b, L, h, p, g, n = shape
    inp = make_inputs(b, L, h, p, g, n, Q)
    D = inp["D"] if with_D else None
    plan = _plan(Q, interpret=True)
    cb = gpu_prologue.chunk_cb(plan, inp["B"], inp["C"], jnp.bfloat16)  # (b, nc, g, Q, Q)
    args = (inp["x"], inp["B"], inp["C"], inp["cs"], inp["w"], inp["states"], None, D, out_dtype, cb)
    y = ssd_mosaic_gpu.output(plan, *args)
    assert y.shape == (b, L, h, p) and y.dtype == out_dtype
    want = reference(inp["x"], inp["B"], inp["C"], inp["cs"], inp["w"], inp["states"], D, Q)
    assert rel(y, want) <= REL_TOL
    assert rel(y, gpu_output.output(plan, *args)) <= REL_TOL


def _lowered_text(shape, Q, out_dtype, with_D) -> str:
    b, L, h, p, g, n = shape
    nc = L // Q
    plan = _plan(Q, interpret=False)
    S = jax.ShapeDtypeStruct
    args = (
        S((b, L, h, p), jnp.bfloat16),
        S((b, L, g, n), jnp.bfloat16),
        S((b, L, g, n), jnp.bfloat16),
        S((b, h, L), jnp.float32),
        S((b, h, L), jnp.float32),
        S((b, h, nc, p, n), jnp.bfloat16),
        S((h,), jnp.float32) if with_D else None,
        S((b, nc, g, Q, Q), jnp.bfloat16),
    )

    def f(x, B, C, cs, w, st, D, cb):
        return ssd_mosaic_gpu.output(plan, x, B, C, cs, w, st, None, D, out_dtype, cb)

    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


LOWER_CASES = [
    ((8, 4096, 32, 64, 1, 128), 256, jnp.bfloat16, True),  # the benchmark shape
    ((3, 192, 6, 128, 3, 64), 64, jnp.float32, False),
]  # small, odd batch/heads/groups


@pytest.mark.parametrize("shape,Q,out_dtype,with_D", LOWER_CASES)
def test_lowers_for_cuda(shape, Q, out_dtype, with_D):
    text = _lowered_text(shape, Q, out_dtype, with_D)
    assert "custom_call @mosaic_gpu" in text


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(doc=True), "doc"),
        (dict(Q=32), "the chunk must be one of"),
        (dict(p=32), "headdim"),
        (dict(n=256), "state size"),
        (dict(out_dtype=jnp.float16), "out_dtype"),
        (dict(g=3), "groups"),
        (dict(x_dtype=jnp.float32), "x must be bfloat16"),
    ],
)
def test_rejects_unsupported(change, match):
    b, L, h, p, g, n, Q = 1, 256, 4, change.get("p", 64), change.get("g", 1), change.get("n", 64), change.get("Q", 64)
    plan = dataclasses.replace(_plan(64, interpret=True), chunk=Q)
    S = jax.ShapeDtypeStruct
    x = S((b, L, h, p), change.get("x_dtype", jnp.bfloat16))
    BC = S((b, L, g, n), jnp.bfloat16)
    doc = S((b, L), jnp.int32) if change.get("doc") else None
    with pytest.raises(ValueError, match=match):
        ssd_mosaic_gpu.output(
            plan,
            x,
            BC,
            BC,
            S((b, h, L), jnp.float32),
            S((b, h, L), jnp.float32),
            S((b, h, L // Q, p, n), jnp.bfloat16),
            doc,
            None,
            change.get("out_dtype", jnp.float32),
            S((b, L // Q, g, Q, Q), jnp.bfloat16),
        )


def test_benchmark_smoke(tmp_path):
    """``benchmarks/mosaic_bench.py --smoke`` as a script (interpret mode, a tiny shape): both kernels run and agree
    with the float32 reference."""
    _interpreter_or_skip()
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "mosaic_bench.py"), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["triton", "mosaic"]
    for r in rows:
        assert "error" not in r, r
        assert r["rel_vs_f32_ref"] <= REL_TOL
        if r["impl"] != "triton":
            assert r["rel_vs_triton"] <= REL_TOL
