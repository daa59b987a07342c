"""GPU launcher, per-chunk prologue: what every later kernel reads, computed once.

* :func:`chunk_scalars` -- ``dt`` and the in-chunk inclusive cumulative sums of the log-decays, transposed to the
  ``(b, h, L)`` layout of the kernels, in one kernel (XLA needs two fusions for the transposes and the cumulative
  sum); its backward pass (transposes and a reversed in-chunk cumulative sum) stays in XLA.
* :func:`chunk_cb` -- ``C_t . B_s`` of every position pair of a chunk, once per (group, chunk) for every head of
  the group (read by the forward output kernel and the backward ``bwd_cols``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import gpu_launch
from . import ssd_common as cm
from .config import Plan


def _chunk_scalars_kernel(dt_ref, la_ref, w_ref, cs_ref):
    w_ref[...] = dt_ref[...].T  # (Q, HB) -> (HB, Q)
    cs_ref[...] = jnp.cumsum(la_ref[...], axis=0).T


def _chunk_scalars_call(plan: Plan, dt_in, log_a):
    b, L, h = dt_in.shape
    Q = plan.chunk
    HB = h & -h  # the largest power of two dividing h (Triton block dims are powers of two)
    while HB > 32:
        HB //= 2
    spec_in = pl.BlockSpec((None, Q, HB), lambda hb, c, bb: (bb, c, hb))
    spec_out = pl.BlockSpec((None, HB, Q), lambda hb, c, bb: (bb, hb, c))
    out = jax.ShapeDtypeStruct((b, h, L), dt_in.dtype)
    return gpu_launch.call(
        _chunk_scalars_kernel,
        plan,
        plan.config.prologue,
        grid=(h // HB, L // Q, b),
        in_specs=[spec_in, spec_in],
        out_specs=[spec_out, spec_out],
        out_shape=[out, out],
        name="ssd_chunk_scalars",
    )(dt_in, log_a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunk_scalars(plan: Plan, dt_in, log_a):
    """``(w, cs)``, both ``(b, h, L)``: ``w = dt_in`` and ``cs`` the in-chunk inclusive cumulative sum of ``log_a``,
    from ``(b, L, h)`` inputs (``L`` a multiple of the chunk)."""
    return _chunk_scalars_call(plan, dt_in, log_a)


def _chunk_scalars_fwd(plan: Plan, dt_in, log_a):
    return _chunk_scalars_call(plan, dt_in, log_a), None


def _chunk_scalars_bwd(plan: Plan, _, cts):
    dw, dcs = cts  # (b, h, L)
    b, h, L = dcs.shape
    per_chunk = dcs.reshape(b, h, L // plan.chunk, plan.chunk)
    dla = jnp.flip(jnp.cumsum(jnp.flip(per_chunk, -1), -1), -1).reshape(b, h, L)
    return jnp.swapaxes(dw, 1, 2), jnp.swapaxes(dla, 1, 2)


chunk_scalars.defvjp(_chunk_scalars_fwd, _chunk_scalars_bwd)


def _chunk_cb_kernel(C_ref, B_ref, cb_ref, *, dots):
    cb_ref[...] = cm.mm(C_ref[...], B_ref[...], cm.NT, dots.cb).astype(cb_ref.dtype)


def chunk_cb(plan: Plan, B, C, dtype):
    """``C_t . B_s`` of every position pair of a chunk, ``(b, c, g, Q, Q)`` in ``dtype``, from ``B, C (b, L, g, n)``.

    One program per (group, row block of ``BT`` rows, chunk, batch) writes the ``(BT, Q)`` panel of its rows (the
    part above the diagonal is masked by every consumer, but written: finite values). With ``G`` groups and ``h``
    heads this is ``h / G`` times less work than each head program computing its own ``C B^T``.
    """
    b, L, g, n = B.shape
    Q, BT = plan.chunk, plan.config.block_t
    nb, nc = Q // BT, L // Q
    kernel = functools.partial(_chunk_cb_kernel, dots=plan.dots)
    return gpu_launch.call(
        kernel,
        plan,
        plan.config.prologue,
        grid=(g, nb, nc, b),
        in_specs=[
            pl.BlockSpec((None, BT, None, n), lambda gg, i, c, bb: (bb, c * nb + i, gg, 0)),
            pl.BlockSpec((None, Q, None, n), lambda gg, i, c, bb: (bb, c, gg, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, None, BT, Q), lambda gg, i, c, bb: (bb, c, gg, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nc, g, Q, Q), dtype),
        name="ssd_chunk_cb",
    )(C, B)
