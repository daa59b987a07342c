"""GPU launcher, state normalisation: the state pass with ``state_norm``'s clip at chunk boundaries.

The clip ``H <- H * min(1, max_norm / ||H||_F)`` (per head, on the state leaving each chunk) is not linear, so the
state scan's tricks (the state as a matrix-product accumulator, runs of chunks joined afterwards) do not apply.
Instead:

* :func:`chunk_states` computes every chunk's local state in parallel (forward ``(x o w o d)^T B``, backward
  ``(dy o e)^T C``), one program per (head, chunk, batch), in row steps of ``KernelConfig.scan_block``;
* a small sequential kernel per (head, batch) passes them over the chunks: forward ``H' = clip(g H + S)``, storing
  the entering states and the clip scales; backward, in reverse, the clip's backward (``ssd_common.clip_backward``,
  including the gradient with respect to ``max_norm``) then ``G' = g G + S``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import gpu_launch
from . import ssd_common as cm
from .config import Plan
from .gpu_scan import chunk_decays, rows_state


def _chunk_states_kernel(X_ref, M_ref, cs_ref, *refs, Q, sub, backward, has_doc, dots, acc):
    it = iter(refs)
    w_ref = None if backward else next(it)
    doc_ref = next(it) if has_doc else None
    S_ref = next(it)
    cs_last = cs_ref[Q - 1]
    doc_last = doc_ref[Q - 1] if has_doc else None

    def part(r0):
        return rows_state(X_ref, M_ref, cs_ref, w_ref, doc_ref, r0, sub, cs_last, doc_last, backward, dots)

    # Row steps in a loop (loads pipelined) rather than the whole chunk's operands at once.
    S = part(0) if sub >= Q else lax.fori_loop(1, Q // sub, lambda r, S: S + part(r * sub), part(0))
    S_ref[...] = S.astype(S_ref.dtype)


def chunk_states(plan: Plan, X, M, cs, w, doc, *, backward: bool):
    """Local chunk states ``(b, h, c, p, n)`` in ``plan.acc``, all chunks in parallel (see :func:`state_pass`)."""
    b, L, h, p = X.shape
    g, n = M.shape[2], M.shape[3]
    k = h // g
    Q = plan.chunk
    nc = L // Q
    ins = [X, M, cs]
    in_specs = [
        pl.BlockSpec((None, Q, None, p), lambda hh, c, bb: (bb, c, hh, 0)),
        pl.BlockSpec((None, Q, None, n), lambda hh, c, bb: (bb, c, cm.idiv(hh, k), 0)),
        pl.BlockSpec((None, None, Q), lambda hh, c, bb: (bb, hh, c)),
    ]
    if not backward:
        ins.append(w)
        in_specs.append(pl.BlockSpec((None, None, Q), lambda hh, c, bb: (bb, hh, c)))
    if doc is not None:
        ins.append(doc)
        in_specs.append(pl.BlockSpec((None, Q), lambda hh, c, bb: (bb, c)))
    kernel = functools.partial(
        _chunk_states_kernel, Q=Q, sub=min(plan.config.scan_block, Q), backward=backward, has_doc=doc is not None, dots=plan.dots, acc=plan.acc
    )
    return gpu_launch.call(
        kernel,
        plan,
        plan.config.scan,
        grid=(h, nc, b),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, p, n), lambda hh, c, bb: (bb, hh, c, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, nc, p, n), plan.acc),
        name="ssd_chunk_states",
    )(*ins)


def _norm_pass_kernel(*refs, nc, backward, has_init, acc):
    it = iter(refs)
    S_ref, g_ref = next(it), next(it)  # local states (nc, p, n), chunk decays (nc,)
    init_ref = next(it) if has_init else None
    mn_ref = next(it)
    scale_in_ref, hout_ref = (next(it), next(it)) if backward else (None, None)
    states_ref, final_ref, aux_ref = next(it), next(it), next(it)

    def forward(k, carry):
        states_ref[k] = carry.astype(states_ref.dtype)
        new = g_ref[k].astype(acc) * carry + S_ref[k].astype(acc)
        scale = cm.clip_scale(new, mn_ref[...])
        aux_ref[k] = jnp.sum(scale)
        return new * scale

    def reverse(k, carry):
        c = nc - 1 - k
        carry, dm = cm.clip_backward(carry, scale_in_ref[c], hout_ref[c].astype(acc))
        aux_ref[c] = jnp.sum(dm)
        states_ref[c] = carry.astype(states_ref.dtype)
        return g_ref[c].astype(acc) * carry + S_ref[c].astype(acc)

    carry0 = init_ref[...].astype(acc) if has_init else jnp.zeros(final_ref.shape, acc)
    final_ref[...] = lax.fori_loop(0, nc, reverse if backward else forward, carry0).astype(final_ref.dtype)


def state_pass(plan: Plan, X, M, cs, w, doc, init, max_norm, *, backward: bool, scales=None, hout=None):
    """The state pass with the state_norm clip.

    Forward: ``X = x``, ``M = B``, ``init`` the initial state or None, ``max_norm (h,)``; returns the states
    entering each chunk ``(b, h, c, p, n)`` (``plan.acc``), the final state and the clip scales ``(b, h, c)``.
    Backward: ``X = dy``, ``M = C``, ``init = dfinal``, ``scales`` the forward's clip scales and ``hout (b, h, c, p,
    n)`` the (clipped) states leaving each chunk; returns the gradients of the states leaving each chunk (after the
    clip's backward), the gradient of the initial state and the max_norm gradient parts ``(b, h, c)``.
    """
    b, L, h, p = X.shape
    n = M.shape[3]
    nc = L // plan.chunk
    acc = plan.acc
    has_init = init is not None
    ins = [chunk_states(plan, X, M, cs, w, doc, backward=backward), chunk_decays(cs, doc, plan.chunk)]
    chunks = pl.BlockSpec((None, None, nc, p, n), lambda hh, bb: (bb, hh, 0, 0, 0))
    per_chunk = pl.BlockSpec((None, None, nc), lambda hh, bb: (bb, hh, 0))
    state = pl.BlockSpec((None, None, p, n), lambda hh, bb: (bb, hh, 0, 0))
    in_specs = [chunks, per_chunk]
    if has_init:
        ins.append(init)
        in_specs.append(state)
    ins.append(max_norm.astype(acc))
    in_specs.append(pl.BlockSpec((None,), lambda hh, bb: (hh,)))
    if backward:
        ins += [scales, hout]
        in_specs += [per_chunk, chunks]
    out_shape = [jax.ShapeDtypeStruct((b, h, nc, p, n), acc), jax.ShapeDtypeStruct((b, h, p, n), acc), jax.ShapeDtypeStruct((b, h, nc), acc)]
    kernel = functools.partial(_norm_pass_kernel, nc=nc, backward=backward, has_init=has_init, acc=acc)
    return gpu_launch.call(
        kernel,
        plan,
        plan.config.scan,
        grid=(h, b),
        in_specs=in_specs,
        out_specs=[chunks, state, per_chunk],
        out_shape=out_shape,
        name="ssd_state_norm_pass_bwd" if backward else "ssd_state_norm_pass",
    )(*ins)
