"""The SSD scan of Mamba-2: one entry point, :func:`ssd`, and its pure-JAX chunked implementation.

Per head, with ``alpha_t = exp(dt_t * A)`` and a P x N state ``h``::

    h_t = alpha_t * h_{t-1} + dt_t * x_t B_t^T        y_t = h_t C_t + D * x_t

* ``impl="recurrent"``: a ``lax.scan`` over time -- the definition, used as the test oracle
  (:func:`ssd_recurrent`, from the kernels' bottom module ``ssm_jax.kernels.ssd_reference``).
* ``impl="xla"``: the chunked state-space-duality algorithm (Dao & Gu 2024; docs/background.md) in ``jnp``: an
  attention-like masked product inside each chunk, per-chunk states, a sequential pass over chunks, and the
  inter-chunk output. It is the fallback on CPU and old GPUs and the oracle of the Pallas kernels.
* ``impl="pallas"``: the kernels in :mod:`ssm_jax.kernels` (interpret mode on CPU); a sliding window runs the
  ``"xla"`` path instead (exact, differentiable).
* ``impl="stepwise"``: the recurrence of ``impl="recurrent"`` (exact per-step ``state_norm``) as one Pallas
  kernel with the time loop inside (:mod:`ssm_jax.kernels.ssd_stepwise`; interpret mode off GPU). Streaming
  with ``state_norm`` uses it on GPU; never chosen by "auto".

What the kernels accept (chunk sizes, head and state sizes, dtypes, platforms) is stated once, in
:mod:`ssm_jax.kernels.support`: ``resolve_impl`` and the argument checks of :func:`ssd` read it.

The pure-JAX paths work on a normalised problem: the input weight ``dt_in`` (``dt``, possibly rescaled by a
mitigation), the per-step log-decay ``log_a = dt * A (+ log alpha_scale)``, and document ids ``doc``
(non-decreasing, 0 at position 0) derived from ``segment_ids``; the state is reset to zero wherever ``doc``
changes and the initial state belongs to document 0. Accumulation is in float32 (float64 when the inputs are
float64).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ssm_jax import mitigations as mitigations_lib
from ssm_jax.kernels import support
from ssm_jax.kernels.ssd_reference import (  # noqa: F401 - ssd_recurrent and accumulation_dtype are public here
    accumulation_dtype,
    clip_norm,
    expand_groups,
    matmul_precision,
    ssd_recurrent,
)

IMPLS = ("auto", "recurrent", "xla", "pallas", "stepwise")
Array = jax.Array


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def ssd(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    D: Optional[Array] = None,
    chunk_size: int = 256,
    initial_state: Optional[Array] = None,
    segment_ids: Optional[Array] = None,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    impl: str = "auto",
) -> Tuple[Array, Array]:
    """Runs the Mamba-2 SSD scan.

    Args:
      x: ``(batch, seqlen, heads, headdim)`` inputs.
      dt: ``(batch, seqlen, heads)`` positive step sizes (already softplus'd and clamped).
      A: ``(heads,)`` negative decay rates (``-exp(A_log)``).
      B, C: ``(batch, seqlen, groups, state)``; head ``h`` reads group ``h // (heads // groups)``.
      D: ``(heads,)`` skip connection, or None.
      chunk_size: chunk length of the chunked algorithms (any positive int; the kernels take
        ``ssm_jax.kernels.support.CHUNK_SIZES``).
      initial_state: ``(batch, heads, headdim, state)`` state before position 0, or None (zeros).
      segment_ids: ``(batch, seqlen)`` ints; the state resets to zero wherever the id changes from one
        position to the next (packed documents). The initial state belongs to the first segment.
      mitigation: an :mod:`ssm_jax.mitigations` value applied to every head, or None.
      impl: "recurrent", "xla", "pallas", "stepwise" or "auto" (kernels on GPU/TPU where they take the sizes,
        xla elsewhere). "stepwise" computes what "recurrent" computes (state_norm after every step) in one kernel;
        with a ``sliding_window`` mitigation it falls back to "recurrent" and "pallas" to "xla" (same result).
        Sizes, dtypes or platforms the kernels do not take (``ssm_jax.kernels.support``) are refused up front
        with a ValueError that names the accepted values.

    Returns:
      ``y`` with the shape and dtype of ``x``, and the final state ``(batch, heads, headdim, state)``
      in float32 (float64 for float64 inputs). With a sliding window the final state is the windowed state.

    Raises:
      ValueError: naming the argument, for wrong shapes, non-floating ``x``, ``dt``, ``A``, ``B``, ``C``, ``D`` or
        ``initial_state``, non-integer ``segment_ids``, an empty sequence, an unknown ``impl``, a chunk size that
        is not a positive int, or sizes the chosen kernels do not take.

    Non-finite inputs (NaN, Inf) are neither checked nor replaced (a check would need the values on the host,
    which ``jit`` does not have): they propagate. A non-finite ``x``, ``dt`` or ``B`` at position ``t`` of batch
    row ``b`` makes ``y`` non-finite at ``t`` and at every later position of row ``b`` in the heads that read it
    (``x``, ``dt``: its head; ``B``: the heads of its group), segment resets included (``0 * NaN`` is NaN), and
    the final state of those heads in row ``b``; the chunked paths ("xla", "pallas") may also spread it to
    earlier positions of those heads in row ``b`` (a masked-out term of a matrix product is ``0 * NaN``). A
    non-finite ``C_t`` makes ``y_t`` non-finite; a non-finite ``A`` or ``D`` the whole output of its head. Other
    batch rows, and heads that do not read the value, stay finite.
    """
    _validate(x, dt, A, B, C, D, chunk_size, initial_state, segment_ids, impl)
    mitigation = mitigations_lib.resolve(mitigation)
    if mitigation is not None:
        mitigation.check_heads(x.shape[2])
    sizes = dict(headdim=x.shape[3], state=B.shape[3], dtype=jnp.result_type(x.dtype, B.dtype, C.dtype))
    impl = resolve_impl(impl, chunk_size=chunk_size, **sizes)
    window = mitigation.window if mitigation is not None else None
    if impl == "pallas" and window is not None and window <= x.shape[1]:
        impl = "xla"  # the kernels have no window (a wider one is a no-op); the chunked path computes it exactly
    if impl == "stepwise" and window is not None:
        impl = "recurrent"  # the stepwise kernel has no window; the recurrence carries it (same result)
    if impl in ("pallas", "stepwise"):
        support.check(impl, support.default_target(impl), where=f"ssd(impl='{impl}')", chunk_size=chunk_size if impl == "pallas" else None, **sizes)

    acc = accumulation_dtype(x.dtype)
    dt_in, log_a = input_weight_and_log_decay(dt, A, mitigation, acc)
    doc = document_ids(segment_ids, x.shape[:2])
    max_norm = mitigation.max_norm if mitigation is not None else None
    if initial_state is not None:
        initial_state = initial_state.astype(acc)

    if impl == "stepwise":
        from ssm_jax.kernels import ssd_stepwise  # imported lazily: the kernels pull in Pallas

        y, final_state = ssd_stepwise.ssd_stepwise(x, dt_in, log_a, B, C, initial_state, doc, max_norm=max_norm)
    elif impl == "recurrent":
        y, final_state = ssd_recurrent(x, dt_in, log_a, B, C, initial_state, doc, max_norm=max_norm, window=window)
    elif impl == "xla":
        y, final_state = ssd_chunked(x, dt_in, log_a, B, C, initial_state, doc, chunk_size=chunk_size, max_norm=max_norm, window=window)
    else:
        from ssm_jax.kernels import ssd_ops  # imported lazily: the kernels pull in Pallas

        # The kernels fuse the D skip and write y in x's dtype directly (less memory traffic).
        return ssd_ops.ssd_pallas(
            x,
            dt_in,
            log_a,
            B,
            C,
            initial_state,
            doc,
            chunk_size=chunk_size,
            max_norm=max_norm,
            D=None if D is None else D.astype(acc),
            out_dtype=x.dtype,
        )

    if D is not None:
        y = y + D.astype(acc)[:, None] * x.astype(acc)
    return y.astype(x.dtype), final_state


def resolve_impl(impl: str, *, headdim: Optional[int] = None, state: Optional[int] = None, chunk_size: Optional[int] = None, dtype=None) -> str:
    """Maps "auto" to the fastest implementation available on the default backend for these sizes.

    "auto" runs the kernels on GPU and TPU where ``ssm_jax.kernels.support`` says they take the call (the sizes
    given; those left None are not checked), and the chunked XLA path everywhere else (the CPU included).
    """
    if impl not in IMPLS:
        raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if jax.default_backend() not in ("gpu", "tpu") or not _kernels_available():
        return "xla"
    reason = support.unsupported("pallas", support.default_target("pallas"), chunk_size=chunk_size, headdim=headdim, state=state, dtype=dtype)
    return "pallas" if reason is None else "xla"


@functools.lru_cache(maxsize=None)
def _kernels_available() -> bool:
    try:
        from ssm_jax.kernels import ssd_ops  # noqa: F401
    except ImportError:
        return False
    return True


def input_weight_and_log_decay(dt: Array, A: Array, mitigation: Optional[mitigations_lib.Mitigation], acc) -> Tuple[Array, Array]:
    """Applies the input-side mitigations and returns ``dt_in, log_a``, both ``(batch, seqlen, heads)``."""
    dt = dt.astype(acc)
    A = A.astype(acc)
    if mitigation is not None and mitigation.dt_scale is not None:
        dt = dt * jnp.asarray(mitigation.dt_scale, acc)
    log_a = dt * A
    dt_in = dt
    if mitigation is not None:
        if mitigation.alpha_scale is not None:
            log_a = log_a + jnp.log(jnp.asarray(mitigation.alpha_scale, acc))
        if mitigation.b_scale is not None:
            dt_in = dt_in * jnp.asarray(mitigation.b_scale, acc)
    return dt_in, log_a


def document_ids(segment_ids: Optional[Array], batch_seqlen: Tuple[int, int]) -> Optional[Array]:
    """``(batch, seqlen)`` int32 ids that start at 0 and grow by one wherever ``segment_ids`` changes."""
    if segment_ids is None:
        return None
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    resets = jnp.concatenate([jnp.zeros((batch_seqlen[0], 1), jnp.int32), changed.astype(jnp.int32)], axis=1)
    return jnp.cumsum(resets, axis=1, dtype=jnp.int32)


def _validate(x, dt, A, B, C, D, chunk_size, initial_state, segment_ids, impl) -> None:
    def shape_error(name, got, want):
        raise ValueError(f"ssd: `{name}` has shape {tuple(got)}, expected {want}")

    if x.ndim != 4:
        raise ValueError(f"ssd: `x` must be (batch, seqlen, heads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if l < 1:
        raise ValueError("ssd: `x` has an empty sequence axis (seqlen = 0)")
    if dt.shape != (b, l, h):
        shape_error("dt", dt.shape, f"(batch, seqlen, heads) = {(b, l, h)}")
    if A.shape != (h,):
        shape_error("A", A.shape, f"(heads,) = {(h,)}")
    if B.ndim != 4 or B.shape[:2] != (b, l):
        shape_error("B", B.shape, f"(batch, seqlen, groups, state) with batch, seqlen = {(b, l)}")
    if C.shape != B.shape:
        shape_error("C", C.shape, f"the shape of B, {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"ssd: heads ({h}) must be a multiple of groups ({g}) (the third axis of B and C)")
    if D is not None and D.shape != (h,):
        shape_error("D", D.shape, f"(heads,) = {(h,)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        shape_error("initial_state", initial_state.shape, f"(batch, heads, headdim, state) = {(b, h, p, n)}")
    if segment_ids is not None:
        if segment_ids.shape != (b, l):
            shape_error("segment_ids", segment_ids.shape, f"(batch, seqlen) = {(b, l)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"ssd: `segment_ids` must be integers, got dtype {segment_ids.dtype}")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"ssd: `chunk_size` must be a positive int, got {chunk_size!r}")
    if impl not in IMPLS:
        raise ValueError(f"ssd: `impl` must be one of {IMPLS}, got {impl!r}")
    arrays = (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("initial_state", initial_state))
    for name, arr in arrays:
        if arr is not None and not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"ssd: `{name}` must be floating point (float32, bfloat16, ...), got dtype {arr.dtype}")


# --------------------------------------------------------------------------------------------------
# impl="xla": chunked SSD
# --------------------------------------------------------------------------------------------------


def segsum(a: Array) -> Array:
    """``a (..., q) -> (..., q, q)`` with ``out[..., t, s] = sum_{j=s+1..t} a_j`` for ``s <= t`` and 0 above
    the diagonal, computed as a masked cumulative sum (never as a difference of cumulative sums)."""
    q = a.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((q, q), bool), -1)  # [j, s]: j > s
    terms = jnp.where(strictly_lower, a[..., :, None], 0.0)  # [..., j, s] = a_j for j > s
    return jnp.cumsum(terms, axis=-2)  # [..., t, s] = sum_{s < j <= t} a_j


def _exclusive_suffix_sum(a: Array) -> Array:
    """``out[..., s] = sum_{j=s+1..q-1} a_j`` (a direct reverse cumulative sum, no subtraction)."""
    inclusive = jnp.flip(jnp.cumsum(jnp.flip(a, -1), axis=-1), -1)
    return jnp.concatenate([inclusive[..., 1:], jnp.zeros_like(a[..., :1])], axis=-1)


def ssd_chunked(
    x: Array,
    dt_in: Array,
    log_a: Array,
    B: Array,
    C: Array,
    initial_state: Optional[Array],
    doc: Optional[Array],
    *,
    chunk_size: int = 256,
    max_norm=None,
    window: Optional[int] = None,
) -> Tuple[Array, Array]:
    """Chunked SSD (without the ``D`` skip); returns ``y`` in the accumulation dtype and the final state.

    ``state_norm`` is applied to the state carried between chunks (chunk boundaries), not inside a chunk.
    """
    b, l, h, p = x.shape
    if window is not None and window >= l + 1:
        window = None  # the window covers the whole sequence and the initial state: no-op
    if window is not None:
        y = _chunked_windowed_output(x, dt_in, log_a, B, C, initial_state, doc, chunk_size, int(window))
        # The windowed final state holds the last `window` inputs (and the initial state if l < window).
        if l >= window:
            tail = slice(l - window, l)
            tail_doc = None if doc is None else doc[:, tail] - doc[:, l - window : l - window + 1]
            _, final = ssd_chunked(x[:, tail], dt_in[:, tail], log_a[:, tail], B[:, tail], C[:, tail], None, tail_doc, chunk_size=chunk_size)
        else:
            _, final = ssd_chunked(x, dt_in, log_a, B, C, initial_state, doc, chunk_size=chunk_size)
        return y, final

    g, n = B.shape[2], B.shape[3]
    k = h // g
    q = chunk_size
    acc = accumulation_dtype(x.dtype)
    prec = matmul_precision(acc)
    xc, u, a, Bc, Cc, docc, c = _to_chunks(x, dt_in, log_a, B, C, doc, q)
    # xc, u: (b, c, q, g, k, p); a: (b, c, g, k, q); Bc, Cc: (b, c, q, g, n); docc: (b, c, q) or None

    ss = segsum(a)  # (b, c, g, k, q, q)
    causal = jnp.tril(jnp.ones((q, q), bool))
    if docc is not None:
        same_doc = docc[:, :, :, None] == docc[:, :, None, :]  # (b, c, q, q)
        causal = causal & same_doc[:, :, None, None]
    decay_matrix = jnp.where(causal, jnp.exp(ss), 0.0)  # (b, c, g, k, q, q)

    # 1. intra-chunk (quadratic) output
    CB = jnp.einsum("bctgn,bcsgn->bcgts", Cc, Bc, precision=prec, preferred_element_type=acc)
    y_diag = jnp.einsum("bcgkts,bcsgkp->bctgkp", CB[:, :, :, None] * decay_matrix, u, precision=prec)

    # 2. each chunk's local final state
    decay_to_end = decay_matrix[..., -1, :]  # (b, c, g, k, q): exp(sum a over (s, end]), masked by document
    chunk_states = jnp.einsum("bcsgn,bcgks,bcsgkp->bcgkpn", Bc.astype(acc), decay_to_end, u, precision=prec)

    # 3. sequential pass over chunks
    a_cum = jnp.cumsum(a, axis=-1)  # (b, c, g, k, q)
    chunk_decay = jnp.exp(a_cum[..., -1])  # (b, c, g, k)
    if docc is not None:
        prev_end_doc = jnp.concatenate([jnp.zeros((b, 1), docc.dtype), docc[:, :-1, -1]], axis=1)  # (b, c)
        chunk_decay = chunk_decay * (docc[:, :, -1] == prev_end_doc)[:, :, None, None]
    h0 = jnp.zeros((b, g, k, p, n), acc) if initial_state is None else initial_state.reshape(b, g, k, p, n)
    norm_bound = None if max_norm is None else jnp.broadcast_to(jnp.asarray(max_norm, acc), (h,)).reshape(g, k)

    def pass_chunk(state, inputs):
        decay, local = inputs
        entering = state
        state = decay[..., None, None] * state + local
        if norm_bound is not None:
            state = clip_norm(state, norm_bound)
        return state, entering

    final, entering = jax.lax.scan(pass_chunk, h0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # (b, c, g, k, p, n): state before each chunk

    # 4. inter-chunk output
    in_decay = jnp.exp(a_cum)  # (b, c, g, k, q): exp(sum a over [start, t])
    if docc is not None:
        in_decay = in_decay * (docc == prev_end_doc[:, :, None])[:, :, None, None]
    y_off = jnp.einsum("bctgn,bcgkpn->bctgkp", Cc.astype(acc), entering, precision=prec)
    y_off = y_off * jnp.moveaxis(in_decay, -1, 2)[..., None]

    y = (y_diag + y_off).reshape(b, c * q, h, p)[:, :l]
    return y, final.reshape(b, h, p, n)


def _to_chunks(x, dt_in, log_a, B, C, doc, q):
    """Pads the sequence to a multiple of ``q`` (with no-op steps: zero input, decay 1) and splits it."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    acc = accumulation_dtype(x.dtype)
    c = -(-l // q)
    pad = c * q - l

    def pad_seq(a, mode="constant"):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode) if pad else a

    u = x.astype(acc) * dt_in[..., None]
    xc = pad_seq(x).reshape(b, c, q, g, k, p)
    uc = pad_seq(u).reshape(b, c, q, g, k, p)
    a = pad_seq(log_a.astype(acc)).reshape(b, c, q, g, k)
    a = jnp.moveaxis(a, 2, -1)  # (b, c, g, k, q)
    Bc = pad_seq(B).reshape(b, c, q, g, n)
    Cc = pad_seq(C).reshape(b, c, q, g, n)
    docc = None if doc is None else pad_seq(doc, mode="edge").reshape(b, c, q)
    return xc, uc, a, Bc, Cc, docc, c


def _chunked_windowed_output(x, dt_in, log_a, B, C, initial_state, doc, q, window):
    """SSD output restricted to the band ``t - window < s <= t`` (plus the initial state for ``t < window - 1``).

    Every chunk reads itself and the ``J = floor((window + q - 2) / q)`` chunks before it; the log-decay
    between ``s`` in chunk ``c - j`` and ``t`` in chunk ``c`` is a sum of bounded pieces
    (``t``'s in-chunk prefix, whole chunks in between, ``s``'s in-chunk suffix), never a difference.
    """
    b, l, h, p = x.shape
    g = B.shape[2]
    k = h // g
    acc = accumulation_dtype(x.dtype)
    prec = matmul_precision(acc)
    _, u, a, Bc, Cc, docc, c = _to_chunks(x, dt_in, log_a, B, C, doc, q)
    a_cum = jnp.cumsum(a, axis=-1)  # (b, c, g, k, q) inclusive prefix inside each chunk
    suffix = _exclusive_suffix_sum(a)  # (b, c, g, k, q)
    totals = a_cum[..., -1]  # (b, c, g, k)
    tq = jnp.arange(q)[:, None]
    sq = jnp.arange(q)[None, :]
    num_lags = min((window + q - 2) // q, c - 1)

    def shift_chunks(arr, j, fill=0):  # arr[:, c - j] at chunk c
        if j == 0:
            return arr
        pad = jnp.full(arr.shape[:1] + (j,) + arr.shape[2:], fill, arr.dtype)
        return jnp.concatenate([pad, arr[:, :-j]], axis=1)

    y = jnp.zeros((b, c, q, g, k, p), acc)
    between = jnp.zeros_like(totals)  # sum of totals of chunks c-j+1 .. c-1
    for j in range(num_lags + 1):
        if j == 0:
            exponent = segsum(a)
        else:
            if j >= 2:
                between = between + shift_chunks(totals, j - 1)
            exponent = a_cum[..., :, None] + (between[..., None, None] + shift_chunks(suffix, j)[..., None, :])
        mask = (j * q + tq - sq < window) & (tq - sq >= -j * q)  # band and causality
        mask = mask & (jnp.arange(c) >= j)[:, None, None]  # (c, q, q): source chunk exists
        mask = jnp.broadcast_to(mask, (b, c, q, q))
        if docc is not None:
            mask = mask & (docc[:, :, :, None] == shift_chunks(docc, j, fill=-1)[:, :, None, :])
        weights = jnp.where(mask[:, :, None, None], jnp.exp(jnp.where(mask[:, :, None, None], exponent, 0.0)), 0.0)
        CB = jnp.einsum("bctgn,bcsgn->bcgts", Cc, shift_chunks(Bc, j), precision=prec, preferred_element_type=acc)
        y = y + jnp.einsum("bcgkts,bcsgkp->bctgkp", CB[:, :, :, None] * weights, shift_chunks(u, j), precision=prec)

    y = y.reshape(b, c * q, h, p)[:, :l]
    if initial_state is not None:
        # The initial state sits at position -1: inside the window while t - window < -1.
        prefix = jnp.cumsum(log_a.astype(acc), axis=1)  # (b, l, h): sum over [0, t]
        keep = jnp.arange(l)[None, :, None] < window - 1
        if doc is not None:
            keep = keep & (doc == 0)[:, :, None]
        weight = jnp.where(keep, jnp.exp(jnp.where(keep, prefix, 0.0)), 0.0)  # (b, l, h)
        Ch = expand_groups(C.astype(acc), h)  # (b, l, h, n); cast first: the heads' gradients sum in acc
        y = y + weight[..., None] * jnp.einsum("bhpn,blhn->blhp", initial_state.astype(acc), Ch, precision=prec)
    return y
