"""GPU launcher, forward output (Triton): ``y`` of every chunk from the state entering it.

One program per (head, row block of ``block_t`` rows, chunk, batch); the head axis of every block has size one.
Per row block ``t``: the diagonal block first, with the exact masked exponentials (its loads are issued before the
state term and the loop), then the state term ``e_t C_t H^T`` and the blocks below the diagonal as
``CB (x o b o w)``, both scaled by ``a_t`` once at the end (``ssd_common.split_decay``), plus ``D x``. ``C B^T``
comes from ``gpu_prologue.chunk_cb``. On Hopper the Mosaic GPU kernel (``ssd_mosaic_gpu``) replaces this one
where it supports the call.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import gpu_launch
from . import ssd_common as cm
from .config import Plan
from .gpu_launch import col, row
from .gpu_scan import Join


def _output_kernel(*refs, BT, has_doc, has_D, has_join, dots, acc):
    it = iter(refs)
    x_ref, C_ref, cb_ref, cs_ref, w_ref, st_ref = (next(it) for _ in range(6))
    ent_ref, dec_ref = (next(it), next(it)) if has_join else (None, None)
    doc_ref = next(it) if has_doc else None
    D_ref = next(it) if has_D else None
    y_ref = next(it)

    def state():  # the state entering the chunk (a run-local state + decay * its run's entering state)
        if not has_join:
            return st_ref[0]
        return st_ref[0].astype(acc) + dec_ref[0, pl.program_id(2)] * ent_ref[0]

    i = pl.program_id(1)  # row block
    t0 = i * BT
    Ci = C_ref[pl.ds(t0, BT), :]
    doc_t = col(doc_ref[pl.ds(t0, BT)]) if has_doc else None
    cs_t = col(cs_ref[0, pl.ds(t0, BT)])
    x_t = x_ref[pl.ds(t0, BT), 0, :]  # the row block's own inputs (diagonal block, D x)
    # Source blocks before the row block: exp(cs_t - cs_s) = a_t b_s around c_ref = cs just before the row block
    # (0 at the chunk start); the carried state's decay exp(cs_t) = a_t exp(c_ref). Both are summed unscaled,
    # then multiplied by a_t once.
    c_ref = jnp.where(i > 0, cs_ref[0, jnp.maximum(t0 - 1, 0)], 0.0).astype(acc)

    CB = cb_ref[pl.ds(t0, BT), pl.ds(t0, BT)].astype(acc)
    mask = cm.intra_mask(t0, t0, BT, BT, doc_t, row(doc_ref[pl.ds(t0, BT)]) if has_doc else None)
    L = cm.intra_decay(cs_t, row(cs_ref[0, pl.ds(t0, BT)]), mask)
    diag = cm.intra_output(CB, L, row(w_ref[0, pl.ds(t0, BT)]), x_t, dots.out_intra)

    def below(j, total):
        s0 = j * BT
        CB = cm.same_document(cb_ref[pl.ds(t0, BT), pl.ds(s0, BT)], doc_t, row(doc_ref[pl.ds(s0, BT)]) if has_doc else None)
        _, b_s = cm.split_decay(None, col(cs_ref[0, pl.ds(s0, BT)]), c_ref)
        bw = b_s * col(w_ref[0, pl.ds(s0, BT)])
        return total + cm.intra_output_below(CB, bw, x_ref[pl.ds(s0, BT), 0, :], dots.out_intra)

    off = cm.off_output(Ci, state(), cm.decay_from_start(jnp.broadcast_to(c_ref, cs_t.shape), doc_t), dots.out_off)
    off = lax.fori_loop(0, i, below, off)
    y = diag + jnp.exp(cs_t - c_ref) * off  # a_t, then the diagonal block
    if has_D:
        y = y + D_ref[0].astype(acc) * x_t.astype(acc)
    y_ref[:, 0, :] = y.astype(y_ref.dtype)


def output(plan: Plan, x, B, C, cs, w, states, doc, D, out_dtype, cb, join: Optional[Join] = None):
    """``y (b, L, h, p)`` in ``out_dtype``.

    ``x (b, L, h, p)``, ``B, C (b, L, g, n)``, ``cs, w (b, h, L)``, ``states (b, h, c, p, n)`` (entering each
    chunk), ``doc (b, L)`` or None, ``D (h,)`` or None, ``cb (b, c, g, Q, Q)`` from ``gpu_prologue.chunk_cb``;
    ``join``: None, or the ``(entering, decay, run)`` of a state scan over runs whose run-local ``states`` these
    are (the kernel completes them as it loads them).
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    Q, BT = plan.chunk, plan.config.block_t
    nb, nc = Q // BT, L // Q
    spec = gpu_launch.ChunkSpecs(Q, 1, p, n, lambda hh: cm.idiv(hh, k))
    ins = [x, C, cb, cs, w, states]
    in_specs = [spec.heads(), spec.bc(), spec.cb(), spec.scalars(), spec.scalars(), spec.states()]
    if join is not None:
        entering, decay, run = join
        ins += [entering, decay]
        in_specs += [
            pl.BlockSpec((None, 1, None, p, n), lambda hh, i, c, bb: (bb, hh, cm.idiv(c, run), 0, 0)),
            pl.BlockSpec((None, 1, nc), lambda hh, i, c, bb: (bb, hh, 0)),
        ]
    extra, extra_specs = spec.doc_and_skip(doc, D)
    ins += extra
    in_specs += extra_specs
    kernel = functools.partial(
        _output_kernel, BT=BT, has_doc=doc is not None, has_D=D is not None, has_join=join is not None, dots=plan.dots, acc=plan.acc
    )
    return gpu_launch.call(
        kernel,
        plan,
        plan.config.output,
        grid=(h, nb, nc, b),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, BT, 1, p), lambda hh, i, c, bb: (bb, c * nb + i, hh, 0)),
        out_shape=jax.ShapeDtypeStruct((b, L, h, p), out_dtype),
        name="ssd_output",
    )(*ins)
