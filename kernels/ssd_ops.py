"""``ssd_pallas``: the Pallas SSD kernels behind ``ssm_jax.ssd(impl="pallas")``, and their wiring.

:func:`ssd_pallas` normalises the problem once in ``jnp`` (differentiated by ordinary autodiff): it pads the
sequence to a multiple of the chunk with no-op steps, computes the in-chunk cumulative sums of the log-decays and
the document ids relative to the document of the carried state, and lays the per-position scalars out as
``(batch, heads, length)``. Then one ``jax.custom_vjp`` wires the forward kernels to the backward kernels:

* GPU launcher (the phases, each a module): ``gpu_prologue`` (per-position scalars, ``C B^T``), ``gpu_scan`` (the
  state scan and the join of its runs) or ``gpu_state_norm`` (with state_norm), ``gpu_output`` (Triton) or
  ``ssd_mosaic_gpu`` (Hopper) for ``y``; backward: the state scan in reverse, then ``gpu_backward``. The forward
  pass keeps the per-chunk states and ``C B^T`` for the backward pass (half the size of a bf16 ``x`` at state 128,
  chunk 256) rather than recomputing them.
* TPU launcher (``ssd_tpu``): one forward kernel; its backward recomputes the states, then one backward kernel.

The per-chunk mathematics is in :mod:`ssd_common`; what the kernels accept is stated in :mod:`support`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from . import gpu_backward, gpu_output, gpu_prologue, gpu_scan, gpu_state_norm, ssd_mosaic_gpu, ssd_tpu, support
from .config import KernelConfig, Plan, make_plan

# -------------------------------------------------------------------------------------------------
# GPU launcher: the phases wired together
# -------------------------------------------------------------------------------------------------


def use_mosaic_output(plan: Plan, x, B, C, cs, states, doc, out_dtype) -> bool:
    """Whether the forward output kernel is the Mosaic GPU one: asked for (``KernelConfig.output_kernel``), or
    "auto" on a Hopper GPU, and the call is one it supports (else the Triton kernel runs)."""
    choice = plan.config.output_kernel
    if choice == "triton" or (choice == "auto" and (plan.interpret or not support.on_hopper())):
        return False
    return ssd_mosaic_gpu.unsupported(x, B, C, cs, states, doc, out_dtype, plan.chunk) is None


def _gpu_forward(plan: Plan, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype, *, for_backward: bool):
    """``(y, final, residuals)``; ``residuals = (states, final, clip scales, C B^T)`` for the backward pass, or None
    when ``for_backward`` is False."""
    if max_norm is None:
        states, final, join = gpu_scan.state_scan(plan, x, B, cs, w, doc, h0, backward=False)
        scales = None
    else:
        states, final, scales = gpu_state_norm.state_pass(plan, x, B, cs, w, doc, h0, max_norm, backward=False)
        join = None
    cb = gpu_prologue.chunk_cb(plan, B, C, plan.cb_dtype)
    if use_mosaic_output(plan, x, B, C, cs, states, doc, out_dtype):
        # With runs of chunks, XLA completes the states first (faster than inside the Mosaic kernel).
        states = gpu_scan.complete(states, join)
        y = ssd_mosaic_gpu.output(plan, x, B, C, cs, w, states, doc, D, out_dtype, cb)
    elif join is not None and not for_backward:
        # A forward pass alone: the Triton kernel completes the run-local states as it loads them (one pass over
        # the states less); the runs' entering states are read in the states' storage dtype.
        entering, decay, run = join
        y = gpu_output.output(plan, x, B, C, cs, w, states, doc, D, out_dtype, cb, (entering.astype(states.dtype), decay, run))
    else:
        # For the backward pass the states are completed anyway: the output kernel reads those.
        states = gpu_scan.complete(states, join)
        y = gpu_output.output(plan, x, B, C, cs, w, states, doc, D, out_dtype, cb)
    return y, final, ((states, final, scales, cb) if for_backward else None)


def _gpu_backward(plan: Plan, x, w, cs, B, C, h0, doc, D, max_norm, residuals, dy, dfinal):
    """``(dx, dw, dcs, dB, dC, dh0, dD, dmax_norm)`` in the kernel layouts."""
    states, final, scales, cb = residuals
    b, L, h, p = x.shape
    Q, BT = plan.chunk, plan.config.block_t
    nb, nc = Q // BT, L // Q
    if max_norm is None:
        Gs, dh0, join = gpu_scan.state_scan(plan, dy, C, cs, w, doc, dfinal, backward=True)
        Gs = gpu_scan.complete(Gs, join)
    else:
        hout = jnp.concatenate([states[:, :, 1:], final[:, :, None]], axis=2)  # the clipped states leaving chunks
        Gs, dh0, dm_parts = gpu_state_norm.state_pass(plan, dy, C, cs, w, doc, dfinal, max_norm, backward=True, scales=scales, hout=hout)
    col_outs = gpu_backward.bwd_cols(plan, x, dy, B, cs, w, Gs, doc, D, cb)
    dx, dw, V = col_outs[:3]
    dD = None if D is None else jnp.sum(col_outs[3], axis=(0, 2))
    dcb, rowZp, colZp = gpu_backward.bwd_pairs(plan, x, dy, B, C, cs, w, doc)
    dC, dB, off, dg = gpu_backward.bwd_group_rows(plan, x, dy, B, C, cs, w, states, Gs, doc, dcb)
    off, dg = off.sum(1), dg.sum(1)
    # The intra-chunk log-decay terms rowZ - colZ - V (= rowZ - w dw) from one float32 matrix: independent of
    # the rounding of the dx product.
    intra = rowZp.sum(1) - colZp.sum(1) - V

    gdec = gpu_scan.chunk_decays(cs, doc, Q)  # (b, h, c)
    dg = dg[:, :, ::nb]  # (b, h, c)
    Vsum = V.reshape(b, h, nc, Q).sum(-1)
    last = (Vsum + gdec * dg)[..., None] * (jnp.arange(Q) == Q - 1)
    dcs = intra + off + last.reshape(b, h, L)
    dm = None if max_norm is None else jnp.sum(dm_parts, axis=(0, 2))
    return dx, dw, dcs, dB, dC, (dh0 if h0 is not None else None), dD, dm


# -------------------------------------------------------------------------------------------------
# custom_vjp core on the kernel layouts
# -------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(plan: Plan, out_dtype, x, w, cs, B, C, h0, doc, D, max_norm):
    if plan.launcher == "tpu":
        return ssd_tpu.forward(plan, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype)
    y, final, _ = _gpu_forward(plan, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype, for_backward=False)
    return y, final


def _core_fwd(plan: Plan, out_dtype, x, w, cs, B, C, h0, doc, D, max_norm):
    if plan.launcher == "tpu":
        y, final = ssd_tpu.forward(plan, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype)
        residuals = None
    else:
        y, final, residuals = _gpu_forward(plan, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype, for_backward=True)
    return (y, final), (x, w, cs, B, C, h0, doc, D, max_norm, residuals)


def _core_bwd(plan: Plan, out_dtype, res, cts):
    x, w, cs, B, C, h0, doc, D, max_norm, residuals = res
    dy, dfinal = cts
    if plan.launcher == "tpu":
        grads = ssd_tpu.backward(plan, x, w, cs, B, C, h0, doc, D, max_norm, dy, dfinal.astype(plan.acc))
    else:
        grads = _gpu_backward(plan, x, w, cs, B, C, h0, doc, D, max_norm, residuals, dy, dfinal.astype(plan.acc))
    dx, dw, dcs, dB, dC, dh0, dD, dm = grads
    dB = dB.astype(B.dtype)
    dC = dC.astype(C.dtype)
    if h0 is not None:
        dh0 = dh0.astype(h0.dtype)
    if D is not None:
        dD = dD.astype(D.dtype)
    if max_norm is not None:
        dm = dm.astype(max_norm.dtype)
    return (dx.astype(x.dtype), dw.astype(w.dtype), dcs.astype(cs.dtype), dB, dC, dh0, None, dD, dm)


_core.defvjp(_core_fwd, _core_bwd)


# -------------------------------------------------------------------------------------------------
# public entry point
# -------------------------------------------------------------------------------------------------


def prepare(x, dt_in, log_a, B, C, doc, chunk, acc, chunk_scalars=None):
    """Pads to a multiple of ``chunk`` and builds the kernel inputs ``(x, w, cs, B, C, docrel)``.

    ``chunk_scalars``: a function ``(dt_in, log_a) -> (w, cs)`` of the padded ``(b, L, h)`` inputs that computes the
    per-position scalars in the kernels' layout (a launcher's kernel), or None for the same computation in ``jnp``.
    """
    b, l, h, p = x.shape
    nc = -(-l // chunk)
    L = nc * chunk
    pad = L - l

    def pad_seq(a, mode="constant"):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode) if pad else a

    xp, Bp, Cp = pad_seq(x), pad_seq(B), pad_seq(C)
    if chunk_scalars is not None:
        w, cs = chunk_scalars(pad_seq(dt_in.astype(acc)), pad_seq(log_a.astype(acc)))
    else:
        w = jnp.swapaxes(pad_seq(dt_in.astype(acc)), 1, 2)  # (b, h, L)
        a = pad_seq(log_a.astype(acc)).reshape(b, nc, chunk, h)
        cs = jnp.moveaxis(jnp.cumsum(a, axis=2), 3, 1).reshape(b, h, L)  # in-chunk inclusive cumsum
    docrel = None
    if doc is not None:
        d = pad_seq(doc.astype(jnp.int32), mode="edge").reshape(b, nc, chunk)
        prev_end = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), d[:, :-1, -1]], axis=1)
        docrel = (d - prev_end[:, :, None]).reshape(b, L)
    return xp, w, cs, Bp, Cp, docrel


def ssd_pallas(
    x,
    dt_in,
    log_a,
    B,
    C,
    initial_state,
    doc,
    *,
    chunk_size: int,
    max_norm=None,
    D=None,
    out_dtype=None,
    launcher: Optional[str] = None,
    interpret: Optional[bool] = None,
    config: Optional[KernelConfig] = None,
):
    """SSD scan through the Pallas kernels (the contract of ``ssm_jax.ssd.ssd_chunked``, without a window).

    Args:
      x: ``(b, l, h, p)``; dt_in, log_a: ``(b, l, h)``; B, C: ``(b, l, g, n)``; initial_state
        ``(b, h, p, n)`` or None; doc ``(b, l)`` non-decreasing int document ids starting at 0, or None.
      chunk_size: one of ``support.CHUNK_SIZES`` (ValueError otherwise, as for every size the kernels refuse).
      max_norm: state_norm bound (scalar or ``(h,)``) applied at chunk boundaries, or None.
      D: optional ``(h,)`` skip, fused into the output kernel (``y + D x``); default None (the contract of
        ``ssd_chunked``: ``ssd()`` adds D itself).
      out_dtype: dtype of ``y`` (default: the accumulation dtype, float32 or float64).
      launcher: "gpu" or "tpu" (default: the backend's; CPU runs the GPU launcher in interpret mode).
      interpret: force interpret mode on/off (default: on under the CPU backend).
      config: tile and launch sizes (default: ``KernelConfig()``, the shipped ones).

    Returns:
      ``(y (b, l, h, p), final_state (b, h, p, n))``, the final state in the accumulation dtype.
    """
    b, l, h, p = x.shape
    n = B.shape[3]
    target = support.default_target("pallas")
    target = support.Target(launcher or target.launcher, target.interpret if interpret is None else bool(interpret))
    support.check("pallas", target, where="ssd_pallas", chunk_size=chunk_size, headdim=p, state=n, dtype=jnp.result_type(x.dtype, B.dtype, C.dtype))
    config = KernelConfig() if config is None else config
    config.check(chunk_size, compiled=not target.interpret)
    plan = make_plan(x.dtype, B.dtype, chunk_size, target.launcher, target.interpret, config)
    acc = plan.acc
    scalars = functools.partial(gpu_prologue.chunk_scalars, plan) if plan.launcher == "gpu" else None
    xp, w, cs, Bp, Cp, docrel = prepare(x, dt_in, log_a, B, C, doc, chunk_size, acc, chunk_scalars=scalars)
    h0 = None if initial_state is None else initial_state.astype(acc)
    Dv = None if D is None else jnp.asarray(D).astype(acc)
    mn = None if max_norm is None else jnp.broadcast_to(jnp.asarray(max_norm, acc), (h,))
    y, final = _core(plan, jnp.dtype(acc if out_dtype is None else out_dtype), xp, w, cs, Bp, Cp, h0, docrel, Dv, mn)
    if y.shape[1] != l:
        y = y[:, :l]
    return y, final
