"""TPU launcher of the SSD kernels (Mosaic TPU; ``pltpu.InterpretParams()`` on CPU).

One program per (batch, head, chunk); the chunk axis is the innermost, sequential ("arbitrary") grid axis
and the carried state (forward) or state gradient (backward, chunks visited in reverse through the index
maps) lives in a VMEM scratch buffer. Every block's last two dimensions are either full array dimensions
or multiples of (8, 128): inputs are laid out head-major, ``x (b, h, L, p)``, ``B, C (b, g, L, n)``, and the
per-position scalars are passed twice, as columns ``(b, h, L, 1)`` and as rows ``(b, h, c, 1, Q)`` (both free
reshapes of ``(b, h, L)``), so that no in-kernel transpose of a vector is needed. Matmuls take bf16 operands
with float32 accumulation for bf16 inputs (``ssd_common.mm``).

The per-chunk mathematics is :mod:`ssd_common`, the same functions the GPU launcher calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import ssd_common as cm
from .config import Plan


def _interpret(plan: Plan):
    if not plan.interpret:
        return False
    return pltpu.InterpretParams()


def _compiler_params():
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _last(row):
    """The last entry of a ``(1, Q)`` row as a ``(1, 1)`` array (a masked reduction: no unaligned slice)."""
    lane = lax.broadcasted_iota(jnp.int32, row.shape, 1)
    return jnp.sum(jnp.where(lane == row.shape[1] - 1, row, jnp.zeros_like(row)), axis=1, keepdims=True)


def _layouts(x, w, cs, B, C, doc, Q):
    b, L, h, p = x.shape
    nc = L // Q
    xt = jnp.swapaxes(x, 1, 2)  # (b, h, L, p)
    Bt, Ct = jnp.swapaxes(B, 1, 2), jnp.swapaxes(C, 1, 2)  # (b, g, L, n)
    col = lambda v: v.reshape(v.shape + (1,))  # (b, h, L, 1)
    row = lambda v: v.reshape(v.shape[:-1] + (nc, 1, Q))  # (b, h, c, 1, Q)
    vecs = [col(cs), row(cs), col(w), row(w)]
    if doc is not None:
        vecs += [doc.reshape(b, L, 1), doc.reshape(b, nc, 1, Q)]
    return xt, Bt, Ct, vecs


def _vec_specs(Q, has_doc, cmap):
    specs = [
        pl.BlockSpec((None, None, Q, 1), lambda bb, hh, c: (bb, hh, cmap(c), 0)),
        pl.BlockSpec((None, None, None, 1, Q), lambda bb, hh, c: (bb, hh, cmap(c), 0, 0)),
        pl.BlockSpec((None, None, Q, 1), lambda bb, hh, c: (bb, hh, cmap(c), 0)),
        pl.BlockSpec((None, None, None, 1, Q), lambda bb, hh, c: (bb, hh, cmap(c), 0, 0)),
    ]
    if has_doc:
        specs += [
            pl.BlockSpec((None, Q, 1), lambda bb, hh, c: (bb, cmap(c), 0)),
            pl.BlockSpec((None, None, 1, Q), lambda bb, hh, c: (bb, cmap(c), 0, 0)),
        ]
    return specs


def _read_vecs(it, has_doc):
    cs_t, cs_s, w_t, w_s = (next(it)[...] for _ in range(4))
    doc_t = doc_s = None
    if has_doc:
        doc_t, doc_s = next(it)[...], next(it)[...]
    return cs_t, cs_s, w_t, w_s, doc_t, doc_s


# -------------------------------------------------------------------------------------------------
# forward: output, states, final state
# -------------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, Q, nc, has_doc, has_init, has_D, clip, emit_y, dots, acc):
    it = iter(refs)
    x_ref, B_ref, C_ref = next(it), next(it), next(it)
    cs_t, cs_s, w_t, w_s, doc_t, doc_s = _read_vecs(it, has_doc)
    h0_ref = next(it) if has_init else None
    D_ref = next(it) if has_D else None
    mn_ref = next(it) if clip else None
    y_ref = next(it) if emit_y else None
    final_ref = next(it)
    states_ref = None if emit_y else next(it)
    scale_ref = next(it) if clip else None
    state = next(it)

    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        state[...] = h0_ref[...].astype(acc) if has_init else jnp.zeros(state.shape, acc)

    H = state[...]
    cs_last = _last(cs_s)
    doc_last = _last(doc_s) if has_doc else None
    xs, Bs = x_ref[...], B_ref[...]
    if emit_y:
        Cs = C_ref[...]
        CB = cm.mm(Cs, Bs, cm.NT, dots.cb)
        L = cm.intra_decay(cs_t, cs_s, cm.intra_mask(0, 0, Q, Q, doc_t, doc_s))
        y = cm.intra_output(CB, L, w_s, xs, dots.out_intra)
        y = y + cm.off_output(Cs, H, cm.decay_from_start(cs_t, doc_t), dots.out_off)
        if has_D:
            y = y + D_ref[...].astype(acc) * xs.astype(acc)
        y_ref[...] = y.astype(y_ref.dtype)
    else:
        states_ref[...] = H.astype(states_ref.dtype)
    coef = w_t * cm.decay_to_end(cs_t, cs_last, doc_t, doc_last)
    new = cm.chunk_decay(cs_last, doc_last) * H + cm.chunk_state(xs, coef, Bs, dots.state)
    if clip:
        scale = cm.clip_scale(new, mn_ref[...].astype(acc))
        scale_ref[...] = scale
        new = new * scale
    state[...] = new

    @pl.when(c == nc - 1)
    def _():
        final_ref[...] = new.astype(final_ref.dtype)


def _forward_call(plan: Plan, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype, emit_y):
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    Q = plan.chunk
    nc = L // Q
    acc = plan.acc
    has_doc, has_init, has_D, clip = doc is not None, h0 is not None, D is not None, max_norm is not None
    xt, Bt, Ct, vecs = _layouts(x, w, cs, B, C, doc, Q)
    ident = lambda c: c
    ins = [xt, Bt, Ct] + vecs
    in_specs = [
        pl.BlockSpec((None, None, Q, p), lambda bb, hh, c: (bb, hh, c, 0)),
        pl.BlockSpec((None, None, Q, n), lambda bb, hh, c: (bb, cm.idiv(hh, k), c, 0)),
        pl.BlockSpec((None, None, Q, n), lambda bb, hh, c: (bb, cm.idiv(hh, k), c, 0)),
    ] + _vec_specs(Q, has_doc, ident)
    if has_init:
        ins.append(h0)
        in_specs.append(pl.BlockSpec((None, None, p, n), lambda bb, hh, c: (bb, hh, 0, 0)))
    if has_D:
        ins.append(D.reshape(h, 1, 1))
        in_specs.append(pl.BlockSpec((None, 1, 1), lambda bb, hh, c: (hh, 0, 0)))
    if clip:
        ins.append(max_norm.reshape(h, 1, 1).astype(acc))
        in_specs.append(pl.BlockSpec((None, 1, 1), lambda bb, hh, c: (hh, 0, 0)))
    out_shape, out_specs = [], []
    if emit_y:
        out_shape.append(jax.ShapeDtypeStruct((b, h, L, p), out_dtype))
        out_specs.append(pl.BlockSpec((None, None, Q, p), lambda bb, hh, c: (bb, hh, c, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, p, n), acc))
    out_specs.append(pl.BlockSpec((None, None, p, n), lambda bb, hh, c: (bb, hh, 0, 0)))
    if not emit_y:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, p, n), acc))
        out_specs.append(pl.BlockSpec((None, None, None, p, n), lambda bb, hh, c: (bb, hh, c, 0, 0)))
    if clip:
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, 1, 1), acc))
        out_specs.append(pl.BlockSpec((None, None, None, 1, 1), lambda bb, hh, c: (bb, hh, c, 0, 0)))
    kernel = functools.partial(
        _fwd_kernel,
        Q=Q,
        nc=nc,
        has_doc=has_doc,
        has_init=has_init,
        has_D=has_D,
        clip=clip,
        emit_y=emit_y,
        dots=plan.dots,
        acc=acc,
    )
    return pl.pallas_call(
        kernel,
        grid=(b, h, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((p, n), acc)],
        compiler_params=_compiler_params(),
        interpret=_interpret(plan),
        name="ssd_tpu_fwd" if emit_y else "ssd_tpu_states",
    )(*ins)


def forward(plan: Plan, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype):
    """``(y (b, L, h, p), final state (b, h, p, n))`` in the kernel layouts of ``ssd_ops``."""
    outs = _forward_call(plan, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype, emit_y=True)
    return jnp.swapaxes(outs[0], 1, 2), outs[1]


def _states(plan: Plan, x, w, cs, B, h0, doc, max_norm):
    """``(states entering each chunk (b, h, c, p, n), final state, clip scales (b, h, c) or None)``, recomputed for
    the backward pass (one more forward pass over the chunks, without the output)."""
    outs = _forward_call(plan, x, w, cs, B, B, h0, doc, None, max_norm, plan.acc, emit_y=False)
    scales = outs[2].reshape(outs[2].shape[:3]) if max_norm is not None else None
    return outs[1], outs[0], scales


# -------------------------------------------------------------------------------------------------
# backward: one reverse pass over chunks, all gradients of one head per program
# -------------------------------------------------------------------------------------------------


def _bwd_kernel(*refs, Q, nc, has_doc, has_init, has_D, clip, dots, acc):
    it = iter(refs)
    x_ref, dy_ref, B_ref, C_ref = (next(it) for _ in range(4))
    cs_t, cs_s, w_t, w_s, doc_t, doc_s = _read_vecs(it, has_doc)
    H_ref, dfinal_ref = next(it), next(it)
    D_ref = next(it) if has_D else None
    if clip:
        scale_ref, hout_ref = next(it), next(it)
    dx_ref, dw_ref, dcs_ref, dB_ref, dC_ref = (next(it) for _ in range(5))
    dh0_ref = next(it) if has_init else None
    dD_ref = next(it) if has_D else None
    dm_ref = next(it) if clip else None
    G_scr = next(it)

    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        G_scr[...] = dfinal_ref[...].astype(acc)

    G = G_scr[...]
    if clip:
        G, dm = cm.clip_backward(G, scale_ref[...], hout_ref[...].astype(acc))
        dm_ref[...] = dm
    H = H_ref[...].astype(acc)
    xs, dys, Bs, Cs = x_ref[...], dy_ref[...], B_ref[...], C_ref[...]
    cs_last = _last(cs_s)
    doc_last = _last(doc_s) if has_doc else None
    e_t = cm.decay_from_start(cs_t, doc_t)
    d_t = cm.decay_to_end(cs_t, cs_last, doc_t, doc_last)
    g = cm.chunk_decay(cs_last, doc_last)

    CB = cm.mm(Cs, Bs, cm.NT, dots.cb)
    L = cm.intra_decay(cs_t, cs_s, cm.intra_mask(0, 0, Q, Q, doc_t, doc_s))
    dcb, rowZ = cm.intra_row_terms(CB, L, w_s, dys, xs, dots.dxx)
    draw_state, V = cm.state_grad_terms(Bs, G, d_t, w_t, xs, dots.dx_state)
    draw = cm.intra_input_grad(CB, L, dys, dots.dx_intra) + draw_state
    xa = xs.astype(acc)
    dx = w_t * draw
    if has_D:
        dya = dys.astype(acc)
        dx = dx + D_ref[...].astype(acc) * dya
        dD_ref[...] = cm.frobenius(dya, xa)
    dw = jnp.sum(xa * draw, axis=1, keepdims=True)
    dC_off, off = cm.off_row_terms(dys, H, Cs, e_t, dots.dc_off)
    dC_ref[...] = (cm.mm(dcb, Bs, cm.NN, dots.dcb) + dC_off).astype(dC_ref.dtype)
    dB = cm.mm(dcb, Cs, cm.TN, dots.dcb) + cm.state_input_grad_B(xs, w_t * d_t, G, dots.db_state)
    dB_ref[...] = dB.astype(dB_ref.dtype)
    t = lax.broadcasted_iota(jnp.int32, (Q, 1), 0)
    tail = jnp.sum(V, axis=0, keepdims=True) + g * cm.frobenius(G, H)
    dcs_ref[...] = rowZ + off - w_t * dw + jnp.where(t == Q - 1, tail, 0.0)
    dx_ref[...] = dx.astype(dx_ref.dtype)
    dw_ref[...] = dw
    new = g * G + cm.chunk_state(dys, e_t, Cs, dots.bstate)
    G_scr[...] = new

    if has_init:

        @pl.when(c == nc - 1)
        def _():
            dh0_ref[...] = new.astype(dh0_ref.dtype)


def backward(plan: Plan, x, w, cs, B, C, h0, doc, D, max_norm, dy, dfinal):
    """``(dx, dw, dcs, dB, dC, dh0, dD, dmax_norm)`` in the kernel layouts of ``ssd_ops``: the states are recomputed
    first, then one reverse pass over the chunks computes every gradient of one head per program."""
    states_, final, scales = _states(plan, x, w, cs, B, h0, doc, max_norm)
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    Q = plan.chunk
    nc = L // Q
    acc = plan.acc
    has_doc, has_init, has_D, clip = doc is not None, h0 is not None, D is not None, max_norm is not None
    xt, Bt, Ct, vecs = _layouts(x, w, cs, B, C, doc, Q)
    dyt = jnp.swapaxes(dy, 1, 2)
    rev = lambda c: nc - 1 - c
    ins = [xt, dyt, Bt, Ct] + vecs + [states_, dfinal]
    in_specs = (
        [
            pl.BlockSpec((None, None, Q, p), lambda bb, hh, c: (bb, hh, rev(c), 0)),
            pl.BlockSpec((None, None, Q, p), lambda bb, hh, c: (bb, hh, rev(c), 0)),
            pl.BlockSpec((None, None, Q, n), lambda bb, hh, c: (bb, cm.idiv(hh, k), rev(c), 0)),
            pl.BlockSpec((None, None, Q, n), lambda bb, hh, c: (bb, cm.idiv(hh, k), rev(c), 0)),
        ]
        + _vec_specs(Q, has_doc, rev)
        + [
            pl.BlockSpec((None, None, None, p, n), lambda bb, hh, c: (bb, hh, rev(c), 0, 0)),
            pl.BlockSpec((None, None, p, n), lambda bb, hh, c: (bb, hh, 0, 0)),
        ]
    )
    if has_D:
        ins.append(D.reshape(h, 1, 1))
        in_specs.append(pl.BlockSpec((None, 1, 1), lambda bb, hh, c: (hh, 0, 0)))
    if clip:
        hout = jnp.concatenate([states_[:, :, 1:], final[:, :, None]], axis=2)
        ins += [scales.reshape(b, h, nc, 1, 1), hout]
        in_specs += [
            pl.BlockSpec((None, None, None, 1, 1), lambda bb, hh, c: (bb, hh, rev(c), 0, 0)),
            pl.BlockSpec((None, None, None, p, n), lambda bb, hh, c: (bb, hh, rev(c), 0, 0)),
        ]
    out_shape = [
        jax.ShapeDtypeStruct((b, h, L, p), x.dtype),
        jax.ShapeDtypeStruct((b, h, L, 1), acc),
        jax.ShapeDtypeStruct((b, h, L, 1), acc),
        jax.ShapeDtypeStruct((b, h, L, n), acc),
        jax.ShapeDtypeStruct((b, h, L, n), acc),
    ]
    out_specs = [
        pl.BlockSpec((None, None, Q, p), lambda bb, hh, c: (bb, hh, rev(c), 0)),
        pl.BlockSpec((None, None, Q, 1), lambda bb, hh, c: (bb, hh, rev(c), 0)),
        pl.BlockSpec((None, None, Q, 1), lambda bb, hh, c: (bb, hh, rev(c), 0)),
        pl.BlockSpec((None, None, Q, n), lambda bb, hh, c: (bb, hh, rev(c), 0)),
        pl.BlockSpec((None, None, Q, n), lambda bb, hh, c: (bb, hh, rev(c), 0)),
    ]
    if has_init:
        out_shape.append(jax.ShapeDtypeStruct((b, h, p, n), acc))
        out_specs.append(pl.BlockSpec((None, None, p, n), lambda bb, hh, c: (bb, hh, 0, 0)))
    for flag in (has_D, clip):
        if flag:
            out_shape.append(jax.ShapeDtypeStruct((b, h, nc, 1, 1), acc))
            out_specs.append(pl.BlockSpec((None, None, None, 1, 1), lambda bb, hh, c: (bb, hh, rev(c), 0, 0)))
    kernel = functools.partial(_bwd_kernel, Q=Q, nc=nc, has_doc=has_doc, has_init=has_init, has_D=has_D, clip=clip, dots=plan.dots, acc=acc)
    outs = pl.pallas_call(
        kernel,
        grid=(b, h, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((p, n), acc)],
        compiler_params=_compiler_params(),
        interpret=_interpret(plan),
        name="ssd_tpu_bwd",
    )(*ins)
    it = iter(outs)
    dx, dw, dcs, dBh, dCh = (next(it) for _ in range(5))
    dh0 = next(it) if has_init else None
    dD = jnp.sum(next(it), axis=(0, 2, 3, 4)) if has_D else None
    dm = jnp.sum(next(it), axis=(0, 2, 3, 4)) if clip else None
    dx = jnp.swapaxes(dx, 1, 2)
    group_sum = lambda a: jnp.swapaxes(a.reshape(b, g, k, L, n).sum(2), 1, 2)  # (b, L, g, n)
    return dx, dw[..., 0], dcs[..., 0], group_sum(dBh), group_sum(dCh), dh0, dD, dm
