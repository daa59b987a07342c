"""Per-chunk SSD mathematics shared by every launcher (GPU/Triton, TPU/Mosaic, interpret mode).

Everything here is a pure function of arrays that a kernel body has already loaded; the launchers (the GPU
launcher's ``gpu_*`` modules, :mod:`ssd_tpu`) only choose blocks, grids, memory spaces and how the state is carried
between chunks. Shapes follow one convention so that the same code lowers through Triton and Mosaic:
per-position vectors are 2-D, ``(T, 1)`` for the output position ``t`` (a column) and ``(1, S)`` for the
source position ``s`` (a row); matrices are ``(T, S)``, ``(T, P)``, ``(S, N)``, states ``(P, N)``.

Notation inside one chunk of length Q (the chunked algorithm of Dao & Gu 2024, state space duality;
docs/background.md), for one head:

* ``cs_t``  inclusive in-chunk cumulative sum of the log-decays (float32, computed by the launcher's
  prologue as a cumulative sum; differences ``cs_t - cs_s`` of two positions of one chunk are the
  segment sums, masked *before* ``exp``);
* ``doc_t`` document id relative to the document of the carried state (0 = same document as the state
  entering the chunk); positions of different documents never interact;
* ``w_s``   the input weight (``dt``); ``x`` inputs ``(Q, P)``; ``B, C`` ``(Q, N)``;
* ``L[t, s] = exp(cs_t - cs_s)`` for ``s <= t`` in one document, else 0;
* ``d_s = exp(cs_last - cs_s)`` (decay from ``s`` to the chunk end, 0 across a document change),
  ``e_t = exp(cs_t)`` (decay from the chunk start, 0 once the document changed), ``g = exp(cs_last)``
  (0 if the chunk contains a document change).

Forward:  ``y = (CB^T o L o w) x + e o (C H^T)``,  ``S = (x o w o d)^T B``,  ``H' = clip(g H + S)``.
Backward (``G`` = gradient of the state leaving the chunk, after the clip's backward):
``draw = (L o CB^T)^T dy + d o (B G^T)``, ``dx = w o draw``, ``dw = rowsum(x o draw)``,
``dCB = sum_heads L o w o (dy x^T)``, ``dC = dCB B + e o (dy H)``, ``dB = dCB^T C + (x o w o d) G``,
``dcs_t = rowsum(L o CB o w o dy x^T)_t + e_t C_t.(dy H)_t - w_t dw_t + [t = last](sum_s V_s + g <G, H>)``
with ``V_s = w_s d_s x_s.(B G^T)_s`` (the ``dcs`` identity replaces the column sums of the masked product
by ``w dw``, so no transposed reduction is needed), and the state gradient entering the chunk
``g G + (dy o e)^T C``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")

# dot_general dimension numbers for 2-D operands.
NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


class DotSpec(NamedTuple):
    """How one matmul is computed: operand dtype (or :data:`BF16X2`), accumulation dtype, precision."""

    op_dtype: Any
    acc: Any
    precision: Any = None


BF16X2 = "bf16x2"  # op_dtype marker: float32 operands split into two bf16 terms (hi + lo)


def _split_bf16(v):
    hi = v.astype(jnp.bfloat16)
    return hi, (v - hi.astype(v.dtype)).astype(jnp.bfloat16)


def mm(a, b, dims, spec: DotSpec):
    """``dot_general`` with operands cast to ``spec.op_dtype`` and ``spec.acc`` accumulation.

    With ``op_dtype == BF16X2`` a float32 operand is split into ``hi + lo`` bf16 parts and the product is
    ``hi_a hi_b + hi_a lo_b + lo_a hi_b`` (bf16 operands are exact and not split): about 16 mantissa bits
    from bf16 matrix units, at the cost of two (one bf16 operand) or three bf16 products.
    """
    if spec.op_dtype == BF16X2:
        a_parts = (a,) if a.dtype == jnp.bfloat16 else _split_bf16(a.astype(spec.acc))
        b_parts = (b,) if b.dtype == jnp.bfloat16 else _split_bf16(b.astype(spec.acc))
        dot = lambda u, v: lax.dot_general(u, v, dims, precision=spec.precision, preferred_element_type=spec.acc)
        out = dot(a_parts[0], b_parts[0])
        if len(b_parts) > 1:
            out = out + dot(a_parts[0], b_parts[1])
        if len(a_parts) > 1:
            out = out + dot(a_parts[1], b_parts[0])
        return out
    if a.dtype != spec.op_dtype:
        a = a.astype(spec.op_dtype)
    if b.dtype != spec.op_dtype:
        b = b.astype(spec.op_dtype)
    out = lax.dot_general(a, b, dims, precision=spec.precision, preferred_element_type=spec.acc)
    return out if out.dtype == spec.acc else out.astype(spec.acc)


def positions(t0, s0, bt, bs):
    """Absolute in-chunk positions: ``t`` as a (bt, bs) iota along rows, ``s`` along columns."""
    t = lax.broadcasted_iota(jnp.int32, (bt, bs), 0) + t0
    s = lax.broadcasted_iota(jnp.int32, (bt, bs), 1) + s0
    return t, s


def intra_mask(t0, s0, bt, bs, doc_t=None, doc_s=None):
    """``(bt, bs)`` bool: ``s <= t`` and the same document (``doc_t (bt, 1)``, ``doc_s (1, bs)``)."""
    t, s = positions(t0, s0, bt, bs)
    mask = s <= t
    if doc_t is not None:
        mask = jnp.logical_and(mask, doc_t == doc_s)
    return mask


def intra_decay(cs_t, cs_s, mask):
    """``L[t, s] = exp(cs_t - cs_s)`` where ``mask`` else 0 (masked before ``exp``: no inf, no NaN)."""
    return jnp.exp(jnp.where(mask, cs_t - cs_s, NEG_INF))


def split_decay(cs_t, cs_s, c_ref):
    """``exp(cs_t - cs_s) = a_t * b_s`` with ``a_t = exp(cs_t - c_ref)`` and ``b_s = exp(c_ref - cs_s)``.

    For a block pair below the diagonal (every ``s`` before every ``t``) and ``c_ref`` the cumulative
    log-decay at a position between the two blocks, both exponents are <= 0 because the log-decays are <= 0
    (``A < 0``, ``dt > 0``: ``cs`` never increases), so neither factor overflows; a factor that underflows
    belongs to a product below float32's range. The ``(T, S)`` exponentials become ``T + S`` of them: the
    elementwise work (exp throughput, not the matmuls) is what limits the intra-chunk kernels on GPUs.
    Either position vector may be None (its factor is then None).
    """
    a_t = None if cs_t is None else jnp.exp(cs_t - c_ref)
    b_s = None if cs_s is None else jnp.exp(c_ref - cs_s)
    return a_t, b_s


def same_document(M, doc_t=None, doc_s=None):
    """``M`` where row ``t`` and column ``s`` are in the same document, else 0 (``M`` itself without documents)."""
    if doc_t is None:
        return M
    return jnp.where(doc_t == doc_s, M, jnp.zeros_like(M))


def decay_to_end(cs, cs_last, doc=None, doc_last=None):
    """``d_s = exp(cs_last - cs_s)``, 0 where the document changes after ``s`` (any vector shape)."""
    if doc is None:
        return jnp.exp(cs_last - cs)
    return jnp.exp(jnp.where(doc == doc_last, cs_last - cs, NEG_INF))


def decay_from_start(cs, doc=None):
    """``e_t = exp(cs_t)``, 0 once the document differs from the one of the entering state."""
    if doc is None:
        return jnp.exp(cs)
    return jnp.exp(jnp.where(doc == 0, cs, NEG_INF))


def chunk_decay(cs_last, doc_last=None):
    """``g = exp(cs_last)``, 0 if the chunk contains a document change."""
    return decay_from_start(cs_last, doc_last)


# ---------------------------------------------------------------------------------------------
# forward pieces
# ---------------------------------------------------------------------------------------------


def off_output(Ct, H, e_t, spec: DotSpec):
    """Inter-chunk output ``e_t * (C_t H^T)``: ``Ct (T, N)``, ``H (P, N)``, ``e_t (T, 1)`` -> ``(T, P)``."""
    return e_t * mm(Ct, H, NT, spec)


def intra_output(CB, L, w_s, xs, spec: DotSpec):
    """Intra-chunk output ``(CB o L o w_s) x_s``: ``CB, L (T, S)``, ``w_s (1, S)``, ``xs (S, P)``."""
    return mm(CB * L * w_s, xs, NN, spec)


def intra_output_below(CB, bw_s, xs, spec: DotSpec):
    """``CB (x o b o w)`` for a block pair below the diagonal, to be scaled by ``a_t`` (:func:`split_decay`):
    ``CB (T, S)`` (document-masked), ``bw_s (S, 1)`` = ``b_s w_s``, ``xs (S, P)``."""
    return mm(CB, xs.astype(spec.acc) * bw_s, NN, spec)


def chunk_state(xs, coef_s, Ms, spec: DotSpec):
    """``(x o coef)^T M``: ``xs (S, P)``, ``coef_s (S, 1)``, ``Ms (S, N)`` -> ``(P, N)``.

    Used for the chunk's local state (``coef = w d``, ``M = B``) and, in the backward pass, for the
    state gradient of the inter-chunk output (``x = dy``, ``coef = e``, ``M = C``).
    """
    return mm(xs.astype(spec.acc) * coef_s, Ms, TN, spec)


def clip_scale(state, max_norm):
    """``min(1, max_norm / ||state||_F)`` as a ``(1, 1)`` array (state_norm at a chunk boundary)."""
    sq = jnp.sum(jnp.sum(state * state, axis=1, keepdims=True), axis=0, keepdims=True)
    norm = jnp.sqrt(sq)
    tiny = jnp.finfo(state.dtype).tiny
    return jnp.minimum(1.0, max_norm / jnp.maximum(norm, tiny))


def clip_backward(G, scale, h_out):
    """Backward of ``h_out = h_pre * min(1, m / ||h_pre||)`` given the clipped state ``h_out``.

    Returns ``(dh_pre, <G, h_hat> * [clipped])`` where ``h_hat = h_out / ||h_out||``; the second value
    is the gradient with respect to ``max_norm``.
    """
    sq = jnp.sum(jnp.sum(h_out * h_out, axis=1, keepdims=True), axis=0, keepdims=True)
    inv = lax.rsqrt(jnp.maximum(sq, jnp.finfo(h_out.dtype).tiny))
    h_hat = h_out * inv
    proj = jnp.sum(jnp.sum(G * h_hat, axis=1, keepdims=True), axis=0, keepdims=True)
    clipped = scale < 1.0
    dpre = scale * (G - jnp.where(clipped, proj, 0.0) * h_hat)
    return dpre, jnp.where(clipped, proj, 0.0)


# ---------------------------------------------------------------------------------------------
# backward pieces
# ---------------------------------------------------------------------------------------------


def state_grad_terms(Bs, G, d_s, w_s, xs, spec: DotSpec):
    """State-output part of the input gradient for a block of source positions.

    ``Bs (S, N)``, ``G (P, N)``, ``d_s, w_s (S, 1)``, ``xs (S, P)``. Returns ``(draw_state (S, P),
    V (S, 1))`` with ``draw_state = d o (B G^T)`` and ``V = w x.draw_state``.
    """
    draw = d_s * mm(Bs, G, NT, spec)
    V = w_s * jnp.sum(xs.astype(spec.acc) * draw, axis=1, keepdims=True)
    return draw, V


def intra_input_grad(CB, L, dyt, spec: DotSpec):
    """``(L o CB)^T dy_t``: ``CB, L (T, S)``, ``dyt (T, P)`` -> ``(S, P)`` (sum over output rows)."""
    return mm(CB * L, dyt, TN, spec)


def intra_input_grad_below(CB, dyt, a_t, spec: DotSpec):
    """``CB^T (dy o a)`` for a block pair below the diagonal, to be scaled by ``b_s`` (:func:`split_decay`):
    ``CB (T, S)`` (document-masked), ``dyt (T, P)``, ``a_t (T, 1)`` -> ``(S, P)``."""
    return mm(CB, dyt.astype(spec.acc) * a_t, TN, spec)


def intra_row_terms(CB, L, w_s, dyt, xs, spec: DotSpec):
    """Per-head row-block terms: ``(dCB_h (T, S), rowZ (T, 1))``.

    ``dCB_h = L o w_s o (dy_t x_s^T)`` (summed over the heads of a group by the caller) and
    ``rowZ = rowsum(dCB_h o CB)`` (the ``dy.y_diag`` part of the log-decay gradient).
    """
    DX = mm(dyt, xs, NT, spec)
    dcb = L * w_s * DX
    return dcb, jnp.sum(dcb * CB, axis=1, keepdims=True)


def intra_pair_terms(CB, L, w_s, dyt, xs, spec: DotSpec):
    """Per-head terms of one (row block, source block) pair: ``(dCB_h (T, S), rowZ (T, 1), colZ (1, S))``.

    ``Z = dCB_h o CB`` with ``dCB_h = L o w_s o (dy_t x_s^T)``; ``rowZ - colZ`` is the intra-chunk part of the
    log-decay gradient (``colZ_s = w_s x_s.((L o CB)^T dy)_s``), computed from one float32 matrix so that it
    does not depend on the precision of the ``dx`` product.
    """
    DX = mm(dyt, xs, NT, spec)
    dcb = L * w_s * DX
    Z = dcb * CB
    return dcb, jnp.sum(Z, axis=1, keepdims=True), jnp.sum(Z, axis=0, keepdims=True)


def off_row_terms(dyt, H, Ct, e_t, spec: DotSpec):
    """Inter-chunk-output terms for a row block: ``(dC_off (T, N), off (T, 1))``.

    ``dC_off = e o (dy H)`` and ``off = e_t C_t.(dy H)_t = dy_t.y_off_t``.
    """
    T1 = mm(dyt, H, NN, spec)
    dC = e_t * T1
    return dC, jnp.sum(dC * Ct.astype(spec.acc), axis=1, keepdims=True)


def state_input_grad_B(xs, coef_s, G, spec: DotSpec):
    """``(x o w o d) G``: ``xs (S, P)``, ``coef_s (S, 1)``, ``G (P, N)`` -> ``(S, N)`` (dB from the state)."""
    return mm(xs.astype(spec.acc) * coef_s, G, NN, spec)


def frobenius(a, b):
    """``<a, b>`` of two 2-D arrays as a ``(1, 1)`` array."""
    return jnp.sum(jnp.sum(a * b, axis=1, keepdims=True), axis=0, keepdims=True)


def idiv(a, k: int):
    """``a // k`` for non-negative grid indices (truncating division: no sign logic in index maps)."""
    return lax.div(a, jnp.asarray(k, dtype=a.dtype))
