"""GPU suite (``pytest -m gpu``; skipped without a GPU): the kernels as shipped, through ``ssm_jax.ssd`` only.

* ``ssd(impl="pallas")`` with the Hopper defaults: bf16 inputs without document ids take the Mosaic GPU output
  kernel (wgmma with its A operand in registers) after the state scan, which for fewer than 256 (batch, head)
  programs is the "segments" scan whose runs are joined by XLA; document ids (``segment_ids``) take the Triton
  output kernel. The lowering is checked to contain the Mosaic kernel where it should.
* ``ssd(impl="stepwise")``: the exact per-step recurrence in one kernel, with and without ``state_norm``.

Values are compared with the float64 definition (``tests/reference.py``) on the inputs as the kernel sees them
(rounded to bf16), gradients of every input with the float32 pure-JAX paths (``impl="xla"``, HIGHEST precision;
``impl="recurrent"`` when ``state_norm`` clips inside chunks), at odd lengths, with resets and initial states.
Threshold: relative error ``||a - r|| / ||r||`` <= 5e-3 with bf16 inputs and outputs (bf16 rounding alone is about
2e-3 here), 1e-4 for the float32 stepwise kernel. Written for an H200 with jax 0.11.2.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import random_segment_ids, random_ssd_inputs, ssd_reference
from ssm_jax import mitigations as M
from ssm_jax import ssd

pytestmark = pytest.mark.gpu

BF16_TOL = 5e-3
F32_TOL = 1e-4


def rel(a, r) -> float:
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


@pytest.fixture(autouse=True)
def hopper():
    """The shipped defaults are Hopper's (compute capability 9.x)."""
    capability = getattr(jax.devices()[0], "compute_capability", "")
    if not str(capability).startswith("9"):
        pytest.skip(f"needs a Hopper GPU (compute capability 9.x), got {jax.devices()[0].device_kind!r}")


def problem(batch, seqlen, heads, headdim, groups, state, *, dtype, init: bool, resets: bool, seed: int = 0):
    """``(kernel arguments, the same values in float64, segment ids or None)``; x, B, C in ``dtype``."""
    rng = np.random.default_rng(seed)
    raw = random_ssd_inputs(rng, batch=batch, seqlen=seqlen, heads=heads, headdim=headdim, groups=groups, state=state)
    if not init:
        raw.pop("initial_state")
    args = {k: jnp.asarray(v, dtype if k in ("x", "B", "C") else jnp.float32) for k, v in raw.items()}
    exact = {k: np.asarray(v, np.float64) for k, v in args.items()}  # what the kernel sees, exactly
    seg = jnp.asarray(random_segment_ids(rng, batch, seqlen)) if resets else None
    return args, exact, seg


def grads(
    args: Dict[str, jax.Array], cot: jax.Array, seg, *, impl: str, chunk: int, mitigation=None, as_float32: bool = False
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """``y`` and the gradients of ``sum(y * cot)`` with respect to every array argument."""
    if as_float32:
        args = {k: v.astype(jnp.float32) for k, v in args.items()}

    def loss(a):
        y, _ = ssd(
            a["x"],
            a["dt"],
            a["A"],
            a["B"],
            a["C"],
            D=a.get("D"),
            initial_state=a.get("initial_state"),
            segment_ids=seg,
            chunk_size=chunk,
            mitigation=mitigation,
            impl=impl,
        )
        return jnp.sum(y.astype(jnp.float32) * cot), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return y, g


def pallas_forward(seg, chunk: int):
    """The jitted public call: ``args -> (y, final_state)`` with ``impl="pallas"``."""

    def forward(a):
        return ssd(
            a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], initial_state=a.get("initial_state"), segment_ids=seg, chunk_size=chunk, impl="pallas"
        )

    return jax.jit(forward)


# (batch, seqlen, heads, headdim, groups, state, chunk, initial state, resets)
PALLAS_CASES = [
    (2, 1000, 8, 64, 1, 128, 256, True, False),  # odd length, 16 programs: segments scan, Mosaic, XLA join
    (1, 3001, 4, 64, 2, 64, 64, True, False),  # 47 chunks in runs, two groups
    (2, 2053, 32, 64, 1, 128, 256, False, False),  # 64 programs, a partial last chunk
    (8, 512, 32, 128, 1, 64, 128, True, False),  # 256 programs: the plain fused scan
    (2, 777, 8, 64, 1, 128, 256, True, True),  # resets: the Triton output kernel
]


@pytest.mark.parametrize(
    "case",
    PALLAS_CASES,
    ids=[f"b{c[0]}xL{c[1]}h{c[2]}p{c[3]}g{c[4]}n{c[5]}Q{c[6]}{'_init' if c[7] else ''}{'_resets' if c[8] else ''}" for c in PALLAS_CASES],
)
def test_pallas_default_matches_float64_values_and_float32_gradients(case):
    b, L, h, p, g, n, Q, init, resets = case
    args, exact, seg = problem(b, L, h, p, g, n, dtype=jnp.bfloat16, init=init, resets=resets)
    forward = pallas_forward(seg, Q)
    text = forward.lower(args).as_text()
    assert ("custom_call @mosaic_gpu" in text) == (not resets), (
        "the Hopper default output kernel is Mosaic GPU without document ids, Triton with them"
    )
    cot = jnp.asarray(np.random.default_rng(1).standard_normal((b, L, h, p)), jnp.float32)
    y, g_kernel = grads(args, cot, seg, impl="pallas", chunk=Q)
    assert y.dtype == jnp.bfloat16 and y.shape == (b, L, h, p)
    want_y, want_state = ssd_reference(**exact, segment_ids=None if seg is None else np.asarray(seg))
    assert rel(y, want_y) <= BF16_TOL
    _, final = forward(args)
    assert final.dtype == jnp.float32 and rel(final, want_state) <= BF16_TOL
    _, g_ref = grads(args, cot, seg, impl="xla", chunk=Q, as_float32=True)
    for name in g_ref:
        assert np.all(np.isfinite(np.asarray(g_kernel[name], np.float32))), name
        assert rel(g_kernel[name], g_ref[name]) <= BF16_TOL, (name, rel(g_kernel[name], g_ref[name]))


# (batch, seqlen, heads, headdim, groups, state, dtype, initial state, resets, per-head bound or None)
STEPWISE_CASES = [
    (2, 301, 4, 64, 1, 128, jnp.float32, True, True, (0.5, 1e3, 0.5, 1e3)),
    (1, 1000, 8, 64, 2, 64, jnp.float32, False, False, None),
    (2, 257, 24, 64, 1, 128, jnp.bfloat16, True, False, 1.0),  # the 130m heads, one bound for all
]


@pytest.mark.parametrize(
    "case",
    STEPWISE_CASES,
    ids=[
        f"b{c[0]}xL{c[1]}h{c[2]}_{jnp.dtype(c[6]).name}{'_init' if c[7] else ''}{'_resets' if c[8] else ''}{'_clip' if c[9] is not None else ''}"
        for c in STEPWISE_CASES
    ],
)
def test_stepwise_matches_float64_values_and_float32_gradients(case):
    b, L, h, p, g, n, dtype, init, resets, bound = case
    args, exact, seg = problem(b, L, h, p, g, n, dtype=dtype, init=init, resets=resets, seed=2)
    max_norm: Optional[np.ndarray] = None if bound is None else np.asarray(bound, np.float64)
    mitigation = None if bound is None else M.state_norm(jnp.asarray(bound, jnp.float32))
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    cot = jnp.asarray(np.random.default_rng(3).standard_normal((b, L, h, p)), jnp.float32)
    y, g_kernel = grads(args, cot, seg, impl="stepwise", chunk=64, mitigation=mitigation)
    want_y, _ = ssd_reference(**exact, segment_ids=None if seg is None else np.asarray(seg), max_norm=max_norm)
    assert y.dtype == dtype and rel(y, want_y) <= tol
    # The kernel runs the forward pass; the recurrence (float32) is the reference of every gradient.
    _, g_ref = grads(args, cot, seg, impl="recurrent", chunk=64, mitigation=mitigation, as_float32=True)
    for name in g_ref:
        assert rel(g_kernel[name], g_ref[name]) <= tol, (name, rel(g_kernel[name], g_ref[name]))
