"""``ssd_stepwise``: the exact per-step SSD recurrence in one Pallas kernel (Triton on GPU, interpret on CPU).

State normalisation in its exact (streaming) form clips every head's state after every update,
``h_t <- h_t * min(1, max_norm / ||h_t||_F)`` (a training-free mitigation of Chen et al. 2024, arXiv 2410.07145;
docs/background.md). The clip is a non-linear function of the whole state, so the chunked algorithms cannot apply
it inside a chunk, and ``ssd_recurrent`` runs it as a ``lax.scan`` of one tiny step per token (launch-bound on a
GPU). Here the time loop runs inside the kernel:

* one program per (head, batch) keeps the ``(headdim, state)`` state in registers (float32) and walks the
  sequence, so a layer call costs one launch instead of one per token;
* the wrapper casts once to float32 (``u = dt x``, ``B``, ``C``, and ``alpha = exp(log_a)``, 0 at document
  resets): casting bf16 rows inside the loop puts layout conversions on the critical path of every step;
* the time axis is processed in blocks of ``time_block`` steps: the block's rows of ``u``, ``B``, ``C`` and its
  decays are all loaded before its first step (statically unrolled), so the loads of a block are in flight
  together instead of one dependent global load per step; a sequence that is not a multiple of the block ends
  with a shorter unrolled tail (no padding, no extra steps);
* the clip scale is applied lazily: the kernel carries the unclipped state ``R_t`` and the scale ``s_t`` of
  ``h_t = s_t R_t`` and folds ``s_{t-1}`` into the next decay (``R_t = (alpha_t s_{t-1}) R_{t-1} + dt_t x_t B_t^T``),
  which saves one pass over the state per step; ``y_t = s_t (R_t C_t)`` and the Frobenius norm of ``R_t`` are
  both reductions of ``R_t`` and run side by side.

Semantics are those of ``ssd_reference.ssd_recurrent(..., window=None)``: the backward pass of the
``jax.custom_vjp`` recomputes through ``jax.vjp`` of that reference (the streaming use is inference; the
gradients are exact but as slow as the scan). Index arithmetic goes through multi-dimensional BlockSpecs and
per-dimension indices, so Pallas switches to 64-bit offsets for arrays above 4 GiB (no int32 overflow at 1M+
tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import support
from .config import Launch
from .gpu_launch import triton_params
from .ssd_reference import accumulation_dtype, ssd_recurrent

Array = jax.Array
MAX_TIME_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class StepwiseConfig:
    """Static launch configuration (hashable: a non-differentiable custom_vjp argument).

    Attributes:
      time_block: steps per statically unrolled block (the block's loads are issued together).
      num_warps, num_stages: Triton launch parameters (more warps: fewer state elements per thread, so a
        shorter dependent chain per step, but a wider cross-warp reduction); the defaults were the fastest
        measured (docs/kernel_notes.md).
      interpret: run in Pallas interpret mode (CPU and other non-GPU backends).
    """

    time_block: int = 8
    num_warps: int = 16
    num_stages: int = 1
    interpret: bool = False


def ssd_stepwise(
    x: Array,
    dt_in: Array,
    log_a: Array,
    B: Array,
    C: Array,
    initial_state: Optional[Array] = None,
    doc: Optional[Array] = None,
    *,
    max_norm=None,
    interpret: Optional[bool] = None,
    time_block: int = 8,
    num_warps: int = 16,
    num_stages: int = 1,
) -> Tuple[Array, Array]:
    """Exact per-step SSD recurrence (without the ``D`` skip), optionally clipping the state norm every step.

    Args:
      x: ``(batch, seqlen, heads, headdim)`` inputs.
      dt_in: ``(batch, seqlen, heads)`` input weights (``dt``, possibly rescaled by a mitigation).
      log_a: ``(batch, seqlen, heads)`` per-step log-decays.
      B, C: ``(batch, seqlen, groups, state)``; head ``i`` reads group ``i // (heads // groups)``.
      initial_state: ``(batch, heads, headdim, state)`` state before position 0, or None (zeros).
      doc: ``(batch, seqlen)`` int document ids, or None; the state resets (decay 0) wherever the id differs
        from the previous position's.
      max_norm: per-head bound on the Frobenius norm of the state, a scalar or ``(heads,)``; None: no clip.
      interpret: Pallas interpret mode; None: compiled on a GPU backend, interpreted elsewhere.
      time_block, num_warps, num_stages: see :class:`StepwiseConfig`.

    Returns:
      ``y (batch, seqlen, heads, headdim)`` and the final state ``(batch, heads, headdim, state)``, both in
      float32 (float64 for float64 inputs), as ``ssd_reference.ssd_recurrent``.
    """
    if interpret is None:
        interpret = support.default_target("stepwise").interpret
    _validate(x, dt_in, log_a, B, C, initial_state, doc, max_norm, time_block, interpret)
    cfg = StepwiseConfig(int(time_block), int(num_warps), int(num_stages), bool(interpret))
    acc = accumulation_dtype(x.dtype)
    bound = None
    if max_norm is not None:
        bound = jnp.broadcast_to(jnp.asarray(max_norm, acc), (x.shape[2],))  # (heads,)
    if initial_state is not None:
        initial_state = initial_state.astype(acc)
    return _stepwise(cfg, x, dt_in.astype(acc), log_a.astype(acc), B, C, initial_state, doc, bound)


# --------------------------------------------------------------------------------------------------
# custom_vjp: kernel forward, reference backward
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stepwise(cfg, x, dt_in, log_a, B, C, initial_state, doc, bound):
    return _forward(cfg, x, dt_in, log_a, B, C, initial_state, doc, bound)


def _stepwise_fwd(cfg, x, dt_in, log_a, B, C, initial_state, doc, bound):
    out = _forward(cfg, x, dt_in, log_a, B, C, initial_state, doc, bound)
    return out, (x, dt_in, log_a, B, C, initial_state, doc, bound)


def _stepwise_bwd(cfg, residuals, cotangents):
    """Recomputes the step-by-step reference and differentiates it (exact; as slow as the scan)."""
    x, dt_in, log_a, B, C, initial_state, doc, bound = residuals

    def reference(x, dt_in, log_a, B, C, initial_state, bound):
        return ssd_recurrent(x, dt_in, log_a, B, C, initial_state, doc, max_norm=bound)

    _, vjp = jax.vjp(reference, x, dt_in, log_a, B, C, initial_state, bound)
    dx, ddt, dlog_a, dB, dC, dh0, dbound = vjp(cotangents)
    return dx, ddt, dlog_a, dB, dC, dh0, None, dbound


_stepwise.defvjp(_stepwise_fwd, _stepwise_bwd)


# --------------------------------------------------------------------------------------------------
# the kernel
# --------------------------------------------------------------------------------------------------


def _step(R, s, u_t, B_t, C_t, alpha_t, bound, acc):
    """One step on the unclipped state ``R (p, n)`` with pending scale ``s``; returns ``R, s, y_t (p,)``."""
    R = (alpha_t * s) * R + u_t[:, None] * B_t[None, :]  # (p, n)
    y = jnp.sum(R * C_t[None, :], axis=1)  # (p,)
    if bound is not None:
        norm = jnp.sqrt(jnp.sum(jnp.sum(R * R, axis=1), axis=0))  # Triton reduces one axis at a time
        s = jnp.minimum(1.0, bound / jnp.maximum(norm, jnp.finfo(acc).tiny))
        y = y * s
    return R, s, y


def _stepwise_kernel(*refs, T, nblocks, tail, has_init, clip, acc):
    it = iter(refs)
    u_ref, B_ref, C_ref, alpha_ref = (next(it) for _ in range(4))
    init_ref = next(it) if has_init else None
    bound_ref = next(it) if clip else None
    y_ref, final_ref = next(it), next(it)

    bound = bound_ref[...] if clip else None
    R0 = init_ref[...].astype(acc) if has_init else jnp.zeros(final_ref.shape, acc)  # (p, n)

    def run_block(t0, steps, carry):
        # All loads of the block first: they do not depend on the state, so they are in flight together.
        rows = [(u_ref[t0 + i, :], B_ref[t0 + i, :], C_ref[t0 + i, :], alpha_ref[t0 + i]) for i in range(steps)]
        R, s = carry
        for i, (u_t, B_t, C_t, alpha_t) in enumerate(rows):
            R, s, y = _step(R, s, u_t, B_t, C_t, alpha_t, bound, acc)
            y_ref[t0 + i, :] = y.astype(y_ref.dtype)
        return R, s

    carry = (R0, jnp.ones((), acc))
    carry = lax.fori_loop(0, nblocks, lambda k, c: run_block(k * T, T, c), carry)
    if tail:
        carry = run_block(nblocks * T, tail, carry)
    R, s = carry
    final_ref[...] = (s * R).astype(final_ref.dtype)


def _forward(cfg: StepwiseConfig, x, dt_in, log_a, B, C, initial_state, doc, bound):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g
    acc = accumulation_dtype(x.dtype)
    # The kernel reads everything in the accumulation dtype: casting bf16 rows inside the loop costs layout
    # conversions on the critical path of every step, casting here costs one cheap elementwise pass.
    u = x.astype(acc) * dt_in[..., None]  # (b, l, h, p)
    alpha = _decays(log_a, doc)  # (b, l, h)
    grp = lambda hh: lax.div(hh, jnp.asarray(k, hh.dtype))

    ins = [u, B.astype(acc), C.astype(acc), alpha]
    in_specs = [
        pl.BlockSpec((None, l, None, p), lambda hh, bb: (bb, 0, hh, 0)),
        pl.BlockSpec((None, l, None, n), lambda hh, bb: (bb, 0, grp(hh), 0)),
        pl.BlockSpec((None, l, None, n), lambda hh, bb: (bb, 0, grp(hh), 0)),
        pl.BlockSpec((None, l, None), lambda hh, bb: (bb, 0, hh)),
    ]
    if initial_state is not None:
        ins.append(initial_state)
        in_specs.append(pl.BlockSpec((None, None, p, n), lambda hh, bb: (bb, hh, 0, 0)))
    if bound is not None:
        ins.append(bound)
        in_specs.append(pl.BlockSpec((None,), lambda hh, bb: (hh,)))

    T = cfg.time_block
    kernel = functools.partial(
        _stepwise_kernel,
        T=T,
        nblocks=l // T,
        tail=l % T,
        has_init=initial_state is not None,
        clip=bound is not None,
        acc=acc,
    )
    params = triton_params(Launch(cfg.num_warps, cfg.num_stages), cfg.interpret)
    return pl.pallas_call(
        kernel,
        grid=(h, b),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, l, None, p), lambda hh, bb: (bb, 0, hh, 0)),
            pl.BlockSpec((None, None, p, n), lambda hh, bb: (bb, hh, 0, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, l, h, p), acc), jax.ShapeDtypeStruct((b, h, p, n), acc)],
        interpret=cfg.interpret,
        compiler_params=params,
        name="ssd_stepwise",
    )(*ins)


def _decays(log_a: Array, doc: Optional[Array]) -> Array:
    """``alpha (b, l, h) = exp(log_a)``, 0 where the document id changes (the state restarts there)."""
    alpha = jnp.exp(log_a)
    if doc is None:
        return alpha
    reset = jnp.concatenate([jnp.zeros_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], axis=1)  # (b, l)
    return jnp.where(reset[..., None], 0.0, alpha)


def _validate(x, dt_in, log_a, B, C, initial_state, doc, max_norm, time_block, interpret) -> None:
    def fail(message):
        raise ValueError(f"ssd_stepwise: {message}")

    if x.ndim != 4 or x.shape[1] < 1:
        fail(f"`x` must be (batch, seqlen >= 1, heads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    for name, arr in (("dt_in", dt_in), ("log_a", log_a)):
        if arr.shape != (b, l, h):
            fail(f"`{name}` has shape {tuple(arr.shape)}, expected (batch, seqlen, heads) = {(b, l, h)}")
    if B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        fail(f"`B` and `C` must both be (batch, seqlen, groups, state) with batch, seqlen = {(b, l)}; got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g:
        fail(f"heads ({h}) must be a multiple of groups ({g})")
    reason = support.unsupported("stepwise", support.Target("gpu", interpret), headdim=p, state=n, dtype=jnp.result_type(x.dtype, B.dtype, C.dtype))
    if reason is not None:
        fail(reason)
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        fail(f"`initial_state` has shape {tuple(initial_state.shape)}, expected (batch, heads, headdim, state) = {(b, h, p, n)}")
    if doc is not None and (doc.shape != (b, l) or not jnp.issubdtype(doc.dtype, jnp.integer)):
        fail(f"`doc` must be integer (batch, seqlen) = {(b, l)}, got {doc.dtype} {tuple(doc.shape)}")
    if max_norm is not None and jnp.shape(max_norm) not in ((), (h,)):
        fail(f"`max_norm` must be a scalar or (heads,) = {(h,)}, got shape {jnp.shape(max_norm)}")
    if not isinstance(time_block, int) or not 1 <= time_block <= MAX_TIME_BLOCK:
        fail(f"`time_block` must be an int in [1, {MAX_TIME_BLOCK}], got {time_block!r}")
