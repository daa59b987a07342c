"""The kernels' static configuration: what a user may tune, and what one call fixes.

* :class:`KernelConfig` -- the tile and launch sizes of the GPU launcher's kernels (the pattern of jax's Pallas
  ops, ``BlockSizes``): a small frozen dataclass whose defaults are the shipped configuration, measured on an H200
  (docs/kernel_notes.md; numbers in docs/benchmarks.md). No device needs other values: on Hopper the forward
  output kernel is the Mosaic GPU one because wgmma and TMA exist only there, which ``output_kernel="auto"``
  decides at the call (``ssd_ops.use_mosaic_output``), not a different default. The TPU launcher has nothing to
  tune (one program per (batch, head, chunk)).
* :class:`Plan` -- everything static about one call (launcher, interpret mode, chunk, the matmul numerics that the
  input dtypes fix, the :class:`KernelConfig`); hashable, the non-differentiable argument of the custom_vjp.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from .ssd_common import BF16X2, DotSpec
from .ssd_reference import accumulation_dtype
from .support import MIN_BLOCK, is_power_of_two

OUTPUT_KERNELS = ("auto", "triton", "mosaic")
LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Launch(NamedTuple):
    """Triton launch parameters of one kernel."""

    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile and launch sizes of the GPU kernels; the defaults are the shipped ones.

    Attributes:
      block_t: rows (and source columns) of the ``(T, S)`` blocks of the intra-chunk products; divides the chunk,
        and at least 16 when compiled (Triton's smallest matrix-product dimension).
      state_rows: state rows (headdim) per program of the state scan (capped at the headdim).
      scan_block: chunk rows per matrix-product step of the state scan (capped at the chunk).
      scan_programs: programs the state scan aims for: with fewer (batch, head, state-row block) programs it scans
        runs of chunks side by side, each from a zero state, and joins them (``gpu_scan``).
      cols_heads: heads per program of the backward ``bwd_cols`` kernel (the largest divisor of the heads per group
        up to this).
      state_splits: state-column blocks over which the backward ``bwd_group_rows`` kernel is split (fewer where the
        state has fewer than 16 columns per block).
      output_kernel: the forward output kernel: "auto" (the Mosaic GPU kernel on a Hopper GPU where it supports the
        call, else the Triton one), "triton", or "mosaic" (wherever it supports the call, its interpreter on CPU).
      prologue, scan, output, bwd_cols, bwd_pairs, bwd_group_rows: :class:`Launch` of each group of kernels
        (``prologue``: the per-position scalars and ``C B^T``; ``scan``: the state scan and the state_norm passes).
    """

    block_t: int = 64
    state_rows: int = 64
    scan_block: int = 64
    scan_programs: int = 256
    cols_heads: int = 2
    state_splits: int = 2
    output_kernel: str = "auto"
    prologue: Launch = Launch(4, 2)
    scan: Launch = Launch(4, 3)
    output: Launch = Launch(4, 1)
    bwd_cols: Launch = Launch(4, 1)
    bwd_pairs: Launch = Launch(8, 3)
    bwd_group_rows: Launch = Launch(4, 3)

    def check(self, chunk: int, compiled: bool) -> None:
        """ValueError naming the field when a value cannot work with this chunk."""
        sizes = ("block_t", "state_rows", "scan_block", "scan_programs", "cols_heads", "state_splits")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelConfig.{name} must be a positive int, got {value!r}")
        if chunk % self.block_t or (compiled and not is_power_of_two(self.block_t, MIN_BLOCK)):
            raise ValueError(
                f"KernelConfig.block_t must divide the chunk ({chunk}) and, compiled, be a power of two >= {MIN_BLOCK}; got {self.block_t}"
            )
        if self.output_kernel not in OUTPUT_KERNELS:
            raise ValueError(f"KernelConfig.output_kernel must be one of {OUTPUT_KERNELS}, got {self.output_kernel!r}")
        for name in ("prologue", "scan", "output", "bwd_cols", "bwd_pairs", "bwd_group_rows"):
            launch = getattr(self, name)
            if not isinstance(launch, Launch) or launch.num_warps < 1 or launch.num_stages < 1:
                raise ValueError(f"KernelConfig.{name} must be a Launch(num_warps >= 1, num_stages >= 1), got {launch!r}")


class Dots(NamedTuple):
    """The :class:`~ssd_common.DotSpec` of every named matrix product of the kernels.

    ``cb`` C B^T (data operands), ``out_intra`` (C B^T o L o w) x, ``out_off`` C H^T, ``state`` chunk states,
    ``bstate`` state gradients (dy e)^T C, ``dx_intra`` (L o CB)^T dy, ``dx_state`` B G^T, ``dxx`` dy x^T,
    ``dc_off`` dy H, ``db_state`` (x w d) G, ``dcb`` dCB B and dCB^T C.
    """

    cb: DotSpec
    out_intra: DotSpec
    out_off: DotSpec
    state: DotSpec
    bstate: DotSpec
    dx_intra: DotSpec
    dx_state: DotSpec
    dxx: DotSpec
    dc_off: DotSpec
    db_state: DotSpec
    dcb: DotSpec


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one kernel call fixes (see :func:`make_plan`).

    Attributes:
      launcher: "gpu" or "tpu"; interpret: Pallas interpret mode; chunk: chunk length Q.
      acc: accumulation dtype (float32; float64 for float64 inputs).
      dots: how each matrix product is computed.
      state_dtype, cb_dtype: storage dtypes of the per-chunk states and of ``C B^T`` between GPU kernels.
      config: the tile and launch sizes.
    """

    launcher: str
    interpret: bool
    chunk: int
    acc: Any
    dots: Dots
    state_dtype: Any
    cb_dtype: Any
    config: KernelConfig


def make_plan(x_dtype, bc_dtype, chunk: int, launcher: str, interpret: bool, config: KernelConfig) -> Plan:
    """The plan of a call with inputs ``x`` of ``x_dtype`` and ``B, C`` of ``bc_dtype``.

    Numerics (fixed by the dtypes, measured in docs/kernel_notes.md): bf16 / fp16 inputs take bf16 matmul operands
    with float32 accumulation, except ``dCB B`` and ``dCB^T C`` (dB and dC), whose float32 ``dCB`` operand is split
    into two bf16 parts (``ssd_common.BF16X2``); ``C B^T`` takes the inputs' own dtype when x, B and C share it.
    The per-chunk states and ``C B^T`` travel between kernels in bf16 then (matmul operands anyway; the carried
    state stays float32). float32 and float64 inputs compute in their own dtype (HIGHEST precision on TPU).
    """
    acc = jnp.dtype(accumulation_dtype(x_dtype))
    low = jnp.dtype(x_dtype) in LOW_PRECISION
    op = jnp.dtype(jnp.bfloat16) if low else acc
    data = jnp.dtype(x_dtype) if low and jnp.dtype(x_dtype) == jnp.dtype(bc_dtype) else acc
    precision = lax.Precision.HIGHEST if launcher == "tpu" and op == jnp.float32 else None
    plain = DotSpec(op, acc, precision)
    dots = Dots(
        cb=DotSpec(data, acc, precision),
        out_intra=plain,
        out_off=plain,
        state=plain,
        bstate=plain,
        dx_intra=plain,
        dx_state=plain,
        dxx=plain,
        dc_off=plain,
        db_state=plain,
        dcb=DotSpec(BF16X2 if low else op, acc, precision),
    )
    stored = jnp.dtype(jnp.bfloat16) if low else acc
    return Plan(
        launcher=launcher, interpret=bool(interpret), chunk=int(chunk), acc=acc, dots=dots, state_dtype=stored, cb_dtype=stored, config=config
    )
