"""GPU launcher, backward pass: the input gradients of each chunk, given the states and the state gradients.

Three kernels (``ssd_common``'s notation; ``G`` the gradient of the state leaving a chunk):

* :func:`bwd_cols` -- per (head block, source block, chunk, batch): ``dx``, ``dw`` and the state terms
  ``V_s = w_s x_s.(d o B G^T)_s``; the diagonal block exactly, the row blocks below it through
  ``exp(cs_t - cs_s) = a_t b_s`` (their sum scaled by ``b_s`` once), ``C B^T`` from the forward pass;
* :func:`bwd_pairs` -- per (group, row block, source block, chunk, batch), looping over the group's heads:
  ``dCB = sum_heads L o w o (dy x^T)`` and the row and column sums of ``dCB_h o CB`` per head, from which the
  intra-chunk part of the log-decay gradient is ``rowZ - colZ - V`` (one float32 matrix: independent of the
  rounding of the ``dx`` product);
* :func:`bwd_group_rows` -- per (group and block of state columns, row block, chunk, batch), looping over the
  group's heads: ``dC`` and ``dB`` (the state terms, then the intra-chunk terms from ``dCB``) and the per-head
  ``dy.y_off`` and ``<G, H>`` terms of the log-decay gradient.
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
from .gpu_launch import col, flat, row


def _bwd_cols_kernel(*refs, Q, BT, HB, nb, has_doc, has_D, dots, acc):
    it = iter(refs)
    x_ref, dy_ref, B_ref, cs_ref, w_ref, G_ref, cb_ref = (next(it) for _ in range(7))
    doc_ref = next(it) if has_doc else None
    D_ref = next(it) if has_D else None
    dx_ref, dw_ref, V_ref = next(it), next(it), next(it)
    dD_ref = next(it) if has_D else None

    j = pl.program_id(1)
    s0 = j * BT
    Bj = B_ref[pl.ds(s0, BT), :]
    doc_s = doc_ref[pl.ds(s0, BT)] if has_doc else None
    doc_last = doc_ref[Q - 1] if has_doc else None
    cs_s = [cs_ref[hh, pl.ds(s0, BT)] for hh in range(HB)]
    w_s = [col(w_ref[hh, pl.ds(s0, BT)]) for hh in range(HB)]
    accs = []
    for hh in range(HB):
        d = cm.decay_to_end(col(cs_s[hh]), cs_ref[hh, Q - 1], None if doc_s is None else col(doc_s), doc_last)
        draw, V = cm.state_grad_terms(Bj, G_ref[hh], d, w_s[hh], x_ref[pl.ds(s0, BT), hh, :], dots.dx_state)
        V_ref[hh, :] = flat(V)
        accs.append(draw)
    doc_s_row = None if doc_s is None else row(doc_s)

    # The diagonal block exactly; the row blocks below it through exp(cs_t - cs_s) = a_t b_s around c_ref = cs
    # at the end of this source block (cm.split_decay): their sum is scaled by b_s once at the end.
    CB = cb_ref[pl.ds(s0, BT), pl.ds(s0, BT)].astype(acc)
    mask = cm.intra_mask(s0, s0, BT, BT, None if doc_s is None else col(doc_s), doc_s_row)
    for hh in range(HB):
        L = cm.intra_decay(col(cs_s[hh]), row(cs_s[hh]), mask)
        accs[hh] = accs[hh] + cm.intra_input_grad(CB, L, dy_ref[pl.ds(s0, BT), hh, :], dots.dx_intra)
    c_ref = [cs_ref[hh, s0 + BT - 1] for hh in range(HB)]

    def below(i, lows):
        t0 = i * BT
        doc_t = col(doc_ref[pl.ds(t0, BT)]) if has_doc else None
        CB = cm.same_document(cb_ref[pl.ds(t0, BT), pl.ds(s0, BT)], doc_t, doc_s_row)
        new = []
        for hh in range(HB):
            a_t, _ = cm.split_decay(col(cs_ref[hh, pl.ds(t0, BT)]), None, c_ref[hh])
            new.append(lows[hh] + cm.intra_input_grad_below(CB, dy_ref[pl.ds(t0, BT), hh, :], a_t, dots.dx_intra))
        return tuple(new)

    lows = lax.fori_loop(j + 1, nb, below, tuple(jnp.zeros_like(a) for a in accs))
    for hh in range(HB):
        xs = x_ref[pl.ds(s0, BT), hh, :].astype(acc)
        _, b_s = cm.split_decay(None, col(cs_s[hh]), c_ref[hh])
        draw = accs[hh] + b_s * lows[hh]
        dx = w_s[hh] * draw
        if has_D:
            dys = dy_ref[pl.ds(s0, BT), hh, :].astype(acc)
            dx = dx + D_ref[hh].astype(acc) * dys
            dD_ref[hh] = jnp.sum(dys * xs)
        dx_ref[:, hh, :] = dx.astype(dx_ref.dtype)
        dw_ref[hh, :] = jnp.sum(xs * draw, axis=1)


def bwd_cols(plan: Plan, x, dy, B, cs, w, Gs, doc, D, cb):
    """``(dx (b, L, h, p), dw (b, h, L), V (b, h, L)[, dD parts (b, h, c * nb)])``; ``Gs (b, h, c, p, n)`` the
    state gradients, ``cb`` the forward's ``C B^T``."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    Q, BT = plan.chunk, plan.config.block_t
    nb, nc = Q // BT, L // Q
    HB = gpu_launch.head_block(k, plan.config.cols_heads)
    spec = gpu_launch.ChunkSpecs(Q, HB, p, n, lambda hb: cm.idiv(hb * HB, k))
    ins = [x, dy, B, cs, w, Gs, cb]
    in_specs = [spec.heads(), spec.heads(), spec.bc(), spec.scalars(), spec.scalars(), spec.states(), spec.cb()]
    extra, extra_specs = spec.doc_and_skip(doc, D)
    ins += extra
    in_specs += extra_specs
    vec = lambda: pl.BlockSpec((None, HB, BT), lambda hb, j, c, bb: (bb, hb, c * nb + j))
    out_shape = [
        jax.ShapeDtypeStruct((b, L, h, p), x.dtype),
        jax.ShapeDtypeStruct((b, h, L), plan.acc),
        jax.ShapeDtypeStruct((b, h, L), plan.acc),
    ]
    out_specs = [pl.BlockSpec((None, BT, HB, p), lambda hb, j, c, bb: (bb, c * nb + j, hb, 0)), vec(), vec()]
    if D is not None:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc * nb), plan.acc))
        out_specs.append(pl.BlockSpec((None, HB, None), lambda hb, j, c, bb: (bb, hb, c * nb + j)))
    kernel = functools.partial(_bwd_cols_kernel, Q=Q, BT=BT, HB=HB, nb=nb, has_doc=doc is not None, has_D=D is not None, dots=plan.dots, acc=plan.acc)
    return gpu_launch.call(
        kernel,
        plan,
        plan.config.bwd_cols,
        grid=(h // HB, nb, nc, b),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name="ssd_bwd_cols",
    )(*ins)


def _bwd_pairs_kernel(*refs, BT, k, has_doc, dots, acc):
    it = iter(refs)
    x_ref, dy_ref, C_ref, B_ref, cs_ref, w_ref = (next(it) for _ in range(6))
    doc_ref = next(it) if has_doc else None
    dcb_ref, rowZ_ref, colZ_ref = next(it), next(it), next(it)

    i, j = pl.program_id(1), pl.program_id(2)
    t0, s0 = i * BT, j * BT

    def pair(causal):
        CB = cm.mm(C_ref[pl.ds(t0, BT), :], B_ref[pl.ds(s0, BT), :], cm.NT, dots.cb)
        doc_t = col(doc_ref[pl.ds(t0, BT)]) if has_doc else None
        doc_s = row(doc_ref[pl.ds(s0, BT)]) if has_doc else None
        mask = cm.intra_mask(t0, s0, BT, BT, doc_t, doc_s) if causal else None

        def head(hh, dCB):
            cs_t, cs_s = col(cs_ref[hh, pl.ds(t0, BT)]), row(cs_ref[hh, pl.ds(s0, BT)])
            if causal:
                L = cm.intra_decay(cs_t, cs_s, mask)
            else:  # below the diagonal: an outer product of factors around cs at the end of the source block
                a_t, b_s = cm.split_decay(cs_t, cs_s, cs_ref[hh, s0 + BT - 1])
                L = cm.same_document(a_t * b_s, doc_t, doc_s)
            dcb, rowZ, colZ = cm.intra_pair_terms(
                CB, L, row(w_ref[hh, pl.ds(s0, BT)]), dy_ref[pl.ds(t0, BT), hh, :], x_ref[pl.ds(s0, BT), hh, :], dots.dxx
            )
            rowZ_ref[hh, :] = flat(rowZ)
            colZ_ref[hh, :] = colZ[0]
            return dCB + dcb

        dcb_ref[...] = lax.fori_loop(0, k, head, jnp.zeros((BT, BT), acc)).astype(dcb_ref.dtype)

    pl.when(j < i)(lambda: pair(causal=False))
    pl.when(j == i)(lambda: pair(causal=True))

    @pl.when(j > i)
    def _():
        dcb_ref[...] = jnp.zeros(dcb_ref.shape, dcb_ref.dtype)
        for hh in range(k):  # one head row at a time: k need not be a power of two (Triton block shapes)
            rowZ_ref[hh, :] = jnp.zeros(rowZ_ref.shape[1:], rowZ_ref.dtype)
            colZ_ref[hh, :] = jnp.zeros(colZ_ref.shape[1:], colZ_ref.dtype)


def bwd_pairs(plan: Plan, x, dy, B, C, cs, w, doc):
    """The (row block, source block) terms of the backward pass, one program per block pair and group.

    Returns ``dCB (b, c, g, Q, Q)`` (``sum_heads L o w o (dy x^T)`` over the heads of each group, zero above the
    block diagonal) and the row and column sums of ``dCB_h o CB`` per head, ``rowZ, colZ (b, nb, h, L)``: one slab
    per source block (rowZ) or row block (colZ), summed by the caller.
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    Q, BT = plan.chunk, plan.config.block_t
    nb, nc = Q // BT, L // Q
    acc = plan.acc
    spec = gpu_launch.ChunkSpecs(Q, k, p, n, lambda gg: gg)
    ins = [x, dy, C, B, cs, w]
    in_specs = [spec.heads(), spec.heads(), spec.bc(), spec.bc(), spec.scalars(), spec.scalars()]
    if doc is not None:
        ins.append(doc)
        in_specs.append(spec.doc())
    out_shape = [
        jax.ShapeDtypeStruct((b, nc, g, Q, Q), acc),
        jax.ShapeDtypeStruct((b, nb, h, L), acc),
        jax.ShapeDtypeStruct((b, nb, h, L), acc),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, BT, BT), lambda gg, i, j, c, bb: (bb, c, gg, i, j)),
        pl.BlockSpec((None, None, k, BT), lambda gg, i, j, c, bb: (bb, j, gg, c * nb + i)),
        pl.BlockSpec((None, None, k, BT), lambda gg, i, j, c, bb: (bb, i, gg, c * nb + j)),
    ]
    kernel = functools.partial(_bwd_pairs_kernel, BT=BT, k=k, has_doc=doc is not None, dots=plan.dots, acc=acc)
    return gpu_launch.call(
        kernel,
        plan,
        plan.config.bwd_pairs,
        grid=(g, nb, nb, nc, b),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name="ssd_bwd_pairs",
    )(*ins)


def _bwd_group_rows_kernel(*refs, Q, BT, k, nb, has_doc, dots, acc):
    it = iter(refs)
    x_ref, dy_ref, C_ref, B_ref, cs_ref, w_ref, H_ref, G_ref, dcb_ref = (next(it) for _ in range(9))
    doc_ref = next(it) if has_doc else None
    dC_ref, dB_ref, off_ref, dg_ref = (next(it) for _ in range(4))

    r = pl.program_id(1)
    t0 = r * BT
    Cr = C_ref[pl.ds(t0, BT), :]
    n = Cr.shape[1]
    doc_t = col(doc_ref[pl.ds(t0, BT)]) if has_doc else None
    doc_last = doc_ref[Q - 1] if has_doc else None

    # The state terms of the block's positions, summed over the heads of the group (a K loop over heads).
    def head_terms(hh, carry):
        dC, dB = carry
        H = H_ref[hh].astype(acc)
        G = G_ref[hh].astype(acc)
        cs_t = col(cs_ref[hh, pl.ds(t0, BT)])
        e = cm.decay_from_start(cs_t, doc_t)
        d = cm.decay_to_end(cs_t, cs_ref[hh, Q - 1], doc_t, doc_last)
        dC_off, off = cm.off_row_terms(dy_ref[pl.ds(t0, BT), hh, :], H, Cr, e, dots.dc_off)
        off_ref[hh, :] = flat(off)
        dB = dB + cm.state_input_grad_B(x_ref[pl.ds(t0, BT), hh, :], col(w_ref[hh, pl.ds(t0, BT)]) * d, G, dots.db_state)
        dg_ref[hh] = jnp.sum(G * H)
        return dC + dC_off, dB

    zeros = jnp.zeros((BT, n), acc)
    dC, dB = lax.fori_loop(0, k, head_terms, (zeros, zeros))

    def dcb_block(ti, si):  # dCB at block (ti, si)
        return dcb_ref[pl.ds(ti * BT, BT), pl.ds(si * BT, BT)]

    # dC_t += sum_s dCB[t, s] B_s (this block's row of blocks); dB_s += sum_t dCB[t, s] C_t (its column).
    dC = lax.fori_loop(0, r + 1, lambda j, dC: dC + cm.mm(dcb_block(r, j), B_ref[pl.ds(j * BT, BT), :], cm.NN, dots.dcb), dC)
    dB = lax.fori_loop(r, nb, lambda i, dB: dB + cm.mm(dcb_block(i, r), C_ref[pl.ds(i * BT, BT), :], cm.TN, dots.dcb), dB)
    dC_ref[...] = dC.astype(dC_ref.dtype)
    dB_ref[...] = dB.astype(dB_ref.dtype)


def bwd_group_rows(plan: Plan, x, dy, B, C, cs, w, Hs, Gs, doc, dcb):
    """``dC``, ``dB`` (both ``(b, L, g, n)``, complete) and the per-head ``dy.y_off`` and ``<G, H>`` terms: one
    program per (group and block of state columns, row block, chunk, batch) loops over the group's heads for the
    state terms, then adds the intra-chunk terms from :func:`bwd_pairs`' ``dCB``. ``dy.y_off`` and ``<G, H>`` come
    back as one partial sum per state-column block, ``(b, splits, h, ...)``."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    ns = max(1, plan.config.state_splits)
    while ns > 1 and (n % ns or n // ns < 16):
        ns -= 1
    nn = n // ns
    Q, BT = plan.chunk, plan.config.block_t
    nb, nc = Q // BT, L // Q
    acc = plan.acc
    grp = lambda gs: cm.idiv(gs, ns)  # noqa: E731 - program axis 0 = group * ns + state-column block
    blk = lambda gs: gs - grp(gs) * ns  # noqa: E731
    heads = pl.BlockSpec((None, Q, k, p), lambda gs, r, c, bb: (bb, c, grp(gs), 0))
    bc = pl.BlockSpec((None, Q, None, nn), lambda gs, r, c, bb: (bb, c, grp(gs), blk(gs)))
    scal = pl.BlockSpec((None, k, Q), lambda gs, r, c, bb: (bb, grp(gs), c))
    st = pl.BlockSpec((None, k, None, p, nn), lambda gs, r, c, bb: (bb, grp(gs), c, 0, blk(gs)))
    ins = [x, dy, C, B, cs, w, Hs, Gs, dcb]
    in_specs = [heads, heads, bc, bc, scal, scal, st, st, pl.BlockSpec((None, None, None, Q, Q), lambda gs, r, c, bb: (bb, c, grp(gs), 0, 0))]
    if doc is not None:
        ins.append(doc)
        in_specs.append(pl.BlockSpec((None, Q), lambda gs, r, c, bb: (bb, c)))
    out_shape = [
        jax.ShapeDtypeStruct((b, L, g, n), acc),
        jax.ShapeDtypeStruct((b, L, g, n), acc),
        jax.ShapeDtypeStruct((b, ns, h, L), acc),  # dy.y_off (partial over state-column blocks)
        jax.ShapeDtypeStruct((b, ns, h, nc * nb), acc),  # <G, H> (partial; identical in every row block)
    ]
    out_specs = [
        pl.BlockSpec((None, BT, None, nn), lambda gs, r, c, bb: (bb, c * nb + r, grp(gs), blk(gs))),
        pl.BlockSpec((None, BT, None, nn), lambda gs, r, c, bb: (bb, c * nb + r, grp(gs), blk(gs))),
        pl.BlockSpec((None, None, k, BT), lambda gs, r, c, bb: (bb, blk(gs), grp(gs), c * nb + r)),
        pl.BlockSpec((None, None, k, None), lambda gs, r, c, bb: (bb, blk(gs), grp(gs), c * nb + r)),
    ]
    kernel = functools.partial(_bwd_group_rows_kernel, Q=Q, BT=BT, k=k, nb=nb, has_doc=doc is not None, dots=plan.dots, acc=acc)
    return gpu_launch.call(
        kernel,
        plan,
        plan.config.bwd_group_rows,
        grid=(g * ns, nb, nc, b),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name="ssd_bwd_group_rows",
    )(*ins)
