"""``ssd_pallas``: the Pallas SSD kernels behind ``ssm_jax.ssd(impl="pallas")``.

This module holds the backend dispatch, the static kernel configuration and the ``jax.custom_vjp`` that
wires the forward kernels to the backward kernels (states are recomputed in the backward pass rather than
stored). The per-chunk mathematics lives in :mod:`ssd_common`, the launchers in :mod:`ssd_gpu` (Triton
lowering of plain ``pl.pallas_call``; interpret mode on CPU) and :mod:`ssd_tpu` (Mosaic TPU).

The wrapper normalises the problem once in ``jnp`` (differentiated by ordinary autodiff): it pads the
sequence to a multiple of the chunk with no-op steps, computes the in-chunk cumulative sums of the
log-decays and the document ids relative to the document of the carried state, and lays the per-position
scalars out as ``(batch, heads, length)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

CHUNK_SIZES = (64, 128, 256)
LAUNCHERS = ("gpu", "tpu")
STATE_VARIANTS = ("fused", "segments", "split")
OUTPUT_KERNELS = ("triton", "mosaic")

_default_launcher: Optional[str] = None


def set_default_launcher(name: Optional[str]) -> None:
    """Forces the launcher used by :func:`ssd_pallas` ("gpu", "tpu" or None for the backend's own)."""
    global _default_launcher
    if name is not None and name not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS} or None, got {name!r}")
    _default_launcher = name


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one kernel launch (hashable: a non-differentiable custom_vjp argument).

    Attributes:
      launcher: "gpu" (Triton) or "tpu" (Mosaic TPU).
      interpret: run the kernels in interpret mode (CPU).
      chunk: chunk length Q (64, 128 or 256).
      block_t: rows/columns of the blocks of the intra-chunk product (GPU).
      heads_per_block: heads per program of the GPU output kernel (they share its ``C B^T`` blocks).
      state_rows: state rows (headdim) per program of the fused state scan (GPU).
      state_variant: "fused" (one kernel computes and passes the chunk states), "segments" (the fused scan over
        runs of chunks side by side, each from a zero state, joined by a small product over the runs; with
        state_norm, whose clip is not linear, "split") or "split" (a parallel chunk-state kernel, then a light
        sequential pass).
      scan_programs: programs the "segments" scan aims for (it cuts the sequence into that many runs per (head,
        row block, batch) divided into it).
      output_kernel: "triton" (``ssd_gpu.output``) or "mosaic" (``ssd_mosaic_gpu.output``: TMA + wgmma, Hopper only;
        calls it does not support (document ids, inputs other than bf16, other head/state sizes) use "triton").
      join_in_output: the "segments" forward's output kernel adds the runs' entering states to the run-local
        states it loads (else XLA completes the states first, one more pass over them). Off in the forward pass
        of a gradient with ``save_states``: the states are completed for the backward pass anyway (measured at
        b2 x L16384 on an H200: forward alone 0.407 ms with it, 0.428 without; forward+backward 1.760 with it,
        1.734 without).
      cb_readers: GPU kernels ("out", "cols") that read ``C B^T`` from one kernel that writes it per
        group and chunk (``ssd_gpu.chunk_cb``) instead of computing their own blocks of it per head block.
      cb_dtype: storage dtype of the precomputed ``C B^T`` (None: ``acc``).
      save_states: keep the per-chunk states (and ``C B^T``) of the forward pass for the backward pass instead of
        recomputing them with one more forward scan (memory per position: ``h * p * n / chunk`` state elements in
        ``state_dtype``, half of a bf16 ``x`` at n=128, chunk 256).
      cols_heads_per_block: heads per program of the GPU ``bwd_cols`` kernel (0: ``heads_per_block``).
      num_warps, num_stages: Triton launch parameters.
      op_dtype: operand dtype of the matmuls with a computed operand (bf16 for bf16 inputs: float32
        accumulation; float32 uses TF32 on GPU).
      data_dtype: operand dtype of ``C B^T`` (the inputs' dtype when x, B, C share it).
      acc: accumulation dtype (float32; float64 for float64 inputs in interpret mode).
      precision: ``lax.Precision`` of the matmuls (None: backend default).
      f32_dots, x2_dots: names of matmuls (see :meth:`dots`) with float32 (TF32 on GPU) or split-bf16 operands.
      emulate_tf32: round float32 operands to TF32 (interpret-mode accuracy studies of the GPU path).
      state_dtype: storage dtype of the per-chunk states between GPU kernels (None: ``acc``).
      scan_block: rows of the chunk per matmul step in the GPU state scan.
      scalars_kernel: the GPU launcher computes the per-position scalars (dt and the in-chunk cumulative log-decays
        in the ``(b, h, L)`` layout) with one kernel (``ssd_gpu.chunk_scalars``) instead of XLA.
      rows_head_blocks: programs sharing a group's heads in the GPU ``bwd_pairs`` kernel (partial ``dCB`` sums).
      rows_state_splits: blocks of state columns over which the GPU ``bwd_group_rows`` kernel is split.
      launch: per-kernel ``(name, num_warps, num_stages)`` overrides ("scan", "chunk_states", "out", "cols",
        "pairs", "group_rows", "cb", "scalars").
    """

    launcher: str = "gpu"
    interpret: bool = False
    chunk: int = 256
    block_t: int = 64
    heads_per_block: int = 4
    state_rows: int = 32
    state_variant: str = "fused"
    scan_programs: int = 256
    join_in_output: bool = True
    output_kernel: str = "triton"
    cb_readers: tuple = ()
    cols_heads_per_block: int = 0
    save_states: bool = False
    cb_dtype: object = None
    num_warps: int = 4
    num_stages: int = 2
    op_dtype: object = jnp.bfloat16
    data_dtype: object = jnp.bfloat16
    acc: object = jnp.float32
    precision: object = None
    f32_dots: tuple = ()
    x2_dots: tuple = ()
    emulate_tf32: bool = False
    state_dtype: object = None  # storage dtype of the per-chunk states between kernels (None: acc)
    scan_block: int = 256
    scalars_kernel: bool = False
    rows_head_blocks: int = 1
    rows_state_splits: int = 1
    launch: tuple = ()

    def launch_for(self, kernel: str):
        """``(num_warps, num_stages)`` of one GPU kernel (names: see ``launch``)."""
        for name, warps, stages in self.launch:
            if name == kernel:
                return warps, stages
        return self.num_warps, self.num_stages

    def dots(self) -> dict:
        """The :class:`ssd_common.DotSpec` of every named matmul of the kernels.

        Names: ``cb`` (C B^T, data operands), ``out_intra`` ((C B^T o L o w) x), ``out_off`` (C H^T), ``state``
        (chunk states), ``bstate`` (state gradients (dy e)^T C), ``dx_intra`` ((L o CB)^T dy), ``dx_state``
        (B G^T), ``dxx`` (dy x^T), ``dc_off`` (dy H), ``db_state`` ((x w d) G), ``dcb`` (dCB B, dCB^T C).
        Names listed in ``x2_dots`` split float32 operands into two bf16 parts (``ssd_common.BF16X2``), names
        in ``f32_dots`` take float32 operands (TF32 on GPU), the others ``op_dtype``.
        """
        from .ssd_common import BF16X2, DotSpec

        names = ("out_intra", "out_off", "state", "bstate", "dx_intra", "dx_state", "dxx", "dc_off", "db_state", "dcb")
        out = {}
        for name in names:
            op = self.acc if name in self.f32_dots else self.op_dtype
            if name in self.x2_dots and self.op_dtype == jnp.bfloat16:
                op = BF16X2
            out[name] = DotSpec(op, self.acc, self.precision, self.emulate_tf32)
        out["cb"] = DotSpec(self.data_dtype, self.acc, self.precision, self.emulate_tf32)
        return out

    def heads_for(self, k: int, wanted: int = 0) -> int:
        """Largest divisor of ``k`` (heads per group) that is at most ``wanted`` (0: ``heads_per_block``)."""
        hb = max(1, min(wanted or self.heads_per_block, k))
        while k % hb:
            hb -= 1
        return hb


def _on_hopper() -> bool:
    """Whether the default device is an NVIDIA Hopper GPU (compute capability 9.x: wgmma)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def default_launcher() -> str:
    if _default_launcher is not None:
        return _default_launcher
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def make_config(x_dtype, bc_dtype, shape, chunk_size: int, *, launcher: Optional[str] = None,
                interpret: Optional[bool] = None, **overrides) -> KernelConfig:
    """The default configuration for inputs of this dtype and ``shape = (b, l, h, p, g, n)``."""
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(
            f"ssd(impl='pallas'): chunk_size must be one of {CHUNK_SIZES} for the Pallas kernels, got {chunk_size!r}"
        )
    launcher = launcher or default_launcher()
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    acc = jnp.float64 if jnp.dtype(x_dtype) == jnp.float64 else jnp.float32
    low = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    data_dtype = jnp.dtype(x_dtype) if jnp.dtype(x_dtype) == jnp.dtype(bc_dtype) and jnp.dtype(x_dtype) in low else acc
    op_dtype = jnp.dtype(jnp.bfloat16) if jnp.dtype(x_dtype) in low else acc
    b, l, h, p, g, n = shape
    precision = None
    if launcher == "tpu" and op_dtype == jnp.float32:
        precision = lax.Precision.HIGHEST
    kw = dict(launcher=launcher, interpret=bool(interpret), chunk=int(chunk_size), op_dtype=op_dtype,
              data_dtype=data_dtype, acc=acc, precision=precision)
    if launcher == "gpu":
        block_t = min(64, chunk_size)
        state_rows = min(64, p)
        # Enough (batch, head, row-block) programs to fill the GPU: one fused scan over the whole sequence; fewer
        # (few long sequences): the same scan over runs of chunks side by side.
        variant = "fused" if b * h * max(1, p // state_rows) >= 256 else "segments"
        # Measured on an H200 (docs/kernel_notes.md, runs 4-18): C B^T written once per group and chunk and read by
        # one-head output programs and two-head bwd_cols programs (kept from the forward pass for bwd_cols), one
        # pipeline stage for output/cols and three for the scans, bwd_pairs (8 warps) and bwd_group_rows,
        # bwd_group_rows split over 2 state-column blocks, the chunk states kept from the forward pass, the
        # per-position scalars from one kernel (6 us instead of 13 us in two XLA fusions).
        # The output kernel through Mosaic GPU on Hopper (wgmma): 0.199 vs 0.243 ms device at b8 x L4096 (H200).
        # With the "segments" join inside it, it was slower than Triton's (0.294 vs 0.263 ms at b2 x L16384): the
        # Mosaic one reads states completed by XLA instead.
        mosaic = not interpret and _on_hopper()
        kw.update(output_kernel="mosaic" if mosaic else "triton", join_in_output=not mosaic)
        kw.update(block_t=block_t, state_rows=state_rows, state_variant=variant, heads_per_block=1,
                  cols_heads_per_block=2, scan_block=64, rows_head_blocks=1, rows_state_splits=2,
                  cb_readers=("out", "cols"), save_states=True, scalars_kernel=True, num_warps=4, num_stages=2,
                  launch=(("out", 4, 1), ("cols", 4, 1), ("scan", 4, 3), ("chunk_states", 4, 3), ("pairs", 8, 3),
                          ("group_rows", 4, 3)))
    if op_dtype != acc:
        # bf16 operands, except dCB B and dCB^T C (dB/dC): their float32 dCB operand is split into two bf16 parts
        # (ssd_common.BF16X2). dA does not go through the dx product (bwd_pairs), so (L o CB)^T dy is plain bf16,
        # and so are the state gradients (dy e)^T C (run 8: dA 1.66e-3, dB 1.76e-3).
        # The per-chunk states and the forward's C B^T travel between kernels in bf16 (bf16 matmul operands
        # anyway; the carried state stays float32).
        kw.update(x2_dots=("dcb",), state_dtype=jnp.dtype(jnp.bfloat16), cb_dtype=jnp.dtype(jnp.bfloat16))
    if "launch" in overrides:  # per-kernel launch overrides replace the defaults of the kernels they name only
        launch = {name: (name, warps, stages) for name, warps, stages in kw.get("launch", ())}
        launch.update({name: (name, warps, stages) for name, warps, stages in overrides["launch"]})
        overrides = dict(overrides, launch=tuple(launch.values()))
    kw.update(overrides)
    cfg = KernelConfig(**kw)
    if cfg.state_variant not in STATE_VARIANTS:
        raise ValueError(f"kernel config state_variant must be one of {STATE_VARIANTS}, got {cfg.state_variant!r}")
    if cfg.output_kernel not in OUTPUT_KERNELS:
        raise ValueError(f"kernel config output_kernel must be one of {OUTPUT_KERNELS}, got {cfg.output_kernel!r}")
    if cfg.scan_programs < 1:
        raise ValueError(f"kernel config scan_programs must be >= 1, got {cfg.scan_programs!r}")
    if not set(cfg.cb_readers) <= {"out", "cols"}:
        raise ValueError(f"kernel config cb_readers must name kernels among ('out', 'cols'), got {cfg.cb_readers!r}")
    if cfg.launcher == "gpu" and not cfg.interpret:
        _check_gpu_shapes(cfg, p, n)
    return cfg


def _check_gpu_shapes(cfg, p, n):
    def pow2(v):
        return v >= 16 and (v & (v - 1)) == 0

    if not (pow2(p) and pow2(n)):
        raise ValueError(
            f"ssd(impl='pallas') on GPU needs headdim and state sizes that are powers of two >= 16 (Triton block "
            f"shapes), got headdim={p}, state={n}; use impl='xla'"
        )
    if cfg.chunk % cfg.block_t or cfg.block_t < 16:
        raise ValueError(f"block_t={cfg.block_t} must divide the chunk ({cfg.chunk}) and be >= 16")


def _launcher_module(cfg):
    if cfg.launcher == "tpu":
        from . import ssd_tpu

        return ssd_tpu
    from . import ssd_gpu

    return ssd_gpu


# -------------------------------------------------------------------------------------------------
# custom_vjp core on the kernel layouts
# -------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(cfg, out_dtype, x, w, cs, B, C, h0, doc, D, max_norm):
    y, final = _launcher_module(cfg).forward(cfg, x, w, cs, B, C, h0, doc, D, max_norm, out_dtype)[:2]
    return y, final


def _core_fwd(cfg, out_dtype, x, w, cs, B, C, h0, doc, D, max_norm):
    if cfg.save_states:  # the states are completed for the backward pass anyway: the output kernel reads those
        cfg_fwd = dataclasses.replace(cfg, join_in_output=False)
    else:
        cfg_fwd = cfg
    y, final, states, scales, cb = _launcher_module(cfg).forward(cfg_fwd, x, w, cs, B, C, h0, doc, D, max_norm,
                                                                 out_dtype)
    # The states entering each chunk (half the size of a bf16 x at state 128, chunk 256) and C B^T (1/8 of it):
    # kept for the backward pass with save_states (GPU launcher), else recomputed there.
    saved = (states, final, scales, cb) if cfg.save_states and states is not None else None
    return (y, final), (x, w, cs, B, C, h0, doc, D, max_norm, saved)


def _core_bwd(cfg, out_dtype, res, cts):
    x, w, cs, B, C, h0, doc, D, max_norm, saved = res
    dy, dfinal = cts
    mod = _launcher_module(cfg)
    if saved is not None:
        states, final_re, scales_re, cb = saved
    else:
        (states, final_re, scales_re), cb = mod.states(cfg, x, w, cs, B, h0, doc, max_norm), None
    dx, dw, dcs, dB, dC, dh0, dD, dm = mod.backward(
        cfg, x, w, cs, B, C, h0, doc, D, max_norm, states, final_re, scales_re, dy, dfinal.astype(cfg.acc), cb=cb
    )
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
    window: Optional[int] = None,
    D=None,
    out_dtype=None,
    launcher: Optional[str] = None,
    interpret: Optional[bool] = None,
    config: Optional[dict] = None,
):
    """SSD scan through the Pallas kernels (the contract of ``ssm_jax.ssd.ssd_chunked``).

    Args:
      x: ``(b, l, h, p)``; dt_in, log_a: ``(b, l, h)``; B, C: ``(b, l, g, n)``; initial_state
        ``(b, h, p, n)`` or None; doc ``(b, l)`` non-decreasing int document ids starting at 0, or None.
      chunk_size: 64, 128 or 256 (ValueError otherwise).
      max_norm: state_norm bound (scalar or ``(h,)``) applied at chunk boundaries, or None.
      window: sliding window; handled by the pure-jnp chunked path (not by the kernels).
      D: optional ``(h,)`` skip, fused into the output kernel (``y + D x``); default None (the contract of
        ``ssd_chunked``: ``ssd()`` adds D itself).
      out_dtype: dtype of ``y`` (default: float32, the accumulation dtype).
      launcher: "gpu" or "tpu" (default: the backend's; CPU runs the GPU launcher in interpret mode).
      interpret: force interpret mode on/off (default: on under the CPU backend).
      config: overrides of :class:`KernelConfig` fields (tuning, tests).

    Returns:
      ``(y (b, l, h, p), final_state (b, h, p, n) float32)``.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(
            f"ssd(impl='pallas'): chunk_size must be one of {CHUNK_SIZES} for the Pallas kernels, got {chunk_size!r}"
        )
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    if out_dtype is None:
        out_dtype = acc
    if window is not None and window < l + 1:
        from ssm_jax.ssd import ssd_chunked  # noqa: PLC0415 - the windowed path stays in jnp

        y, final = ssd_chunked(x, dt_in, log_a, B, C, initial_state, doc, chunk_size=chunk_size, window=window)
        if D is not None:
            y = y + D.astype(y.dtype)[:, None] * x.astype(y.dtype)
        return y.astype(out_dtype), final
    cfg = make_config(x.dtype, B.dtype, (b, l, h, p, g, n), chunk_size, launcher=launcher, interpret=interpret,
                      **(config or {}))
    scalars = None
    if cfg.launcher == "gpu" and cfg.scalars_kernel:
        from . import ssd_gpu

        scalars = functools.partial(ssd_gpu.chunk_scalars, cfg)
    xp, w, cs, Bp, Cp, docrel = prepare(x, dt_in, log_a, B, C, doc, chunk_size, acc, chunk_scalars=scalars)
    h0 = None if initial_state is None else initial_state.astype(acc)
    Dv = None if D is None else jnp.asarray(D).astype(acc)
    mn = None if max_norm is None else jnp.broadcast_to(jnp.asarray(max_norm, acc), (h,))
    y, final = _core(cfg, jnp.dtype(out_dtype), xp, w, cs, Bp, Cp, h0, docrel, Dv, mn)
    if y.shape[1] != l:
        y = y[:, :l]
    return y, final
