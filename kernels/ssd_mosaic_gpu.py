"""GPU launcher, forward output on Hopper: the Triton output kernel (``gpu_output``) as a Mosaic GPU kernel.

Same ``y`` as ``gpu_output.output`` with ``plgpu.kernel``: TMA loads and wgmma, which exist only on Hopper (sm90).
It is the forward output kernel there wherever it supports the call (:func:`unsupported`: no document ids, bf16
operands, headdim and state 64 or 128); elsewhere the Triton kernel runs. Measured against the Triton kernel in
``benchmarks/mosaic_bench.py`` (docs/benchmarks/mosaic_h200.json).

Math (one head, chunk ``c``, output rows ``t`` of one row block, source positions ``s <= t`` of the chunk;
:mod:`ssd_common` notation)::

    y_t = sum_s CB[t, s] exp(cs_t - cs_s) w_s x_s  +  exp(cs_t) C_t . H_c^T  (+ D x_t)

One program (one warpgroup) per (batch, chunk, row block of ``BT`` rows, head), heads fastest:

* TMA loads of the chunk's ``cs`` and ``w`` (``(Q,)`` float32), the row block of ``C`` ``(BT, n)``, the entering state
  ``H_c`` ``(p, n)`` and, through a ring of ``STAGES`` shared-memory slots, one ``(BT, BT)`` block of ``C B^T`` (from
  ``gpu_prologue.chunk_cb``) and the matching ``(BT, p)`` block of ``x`` per source block: the diagonal block first,
  then the blocks before it.
* State term: ``wgmma(C_t, H_c^T)`` into its own accumulator (``plgpu.transpose_ref`` of the ``(p, n)`` state), scaled
  per row by ``exp(cs_t)`` in float32 at the end.
* Intra-chunk term: per source block the decayed, masked block ``A = CB o L o w`` is computed in float32 registers
  (diagonal block: exact masked ``exp(cs_t - cs_s)``; blocks below it: ``a_t b_s`` with ``a_t = exp(cs_t - c_ref)``,
  ``b_s = exp(c_ref - cs_s)``, ``c_ref`` the cumulative log-decay just before the row block, as
  ``ssd_common.split_decay``), cast to bf16 (as the Triton kernel does) and fed to ``wgmma`` from registers with the
  bf16 ``x`` block, float32 accumulation.

Interpret mode (CPU, ``plan.interpret``) runs the kernel in Mosaic GPU's interpreter, which has no ``layout_cast``
(layouts are dropped there), takes wgmma operands from shared memory only (the decayed block is stored to shared
memory first there) and cannot read a ``plgpu.transpose_ref`` operand (the states are transposed by XLA there): the
register operand and the transposed state operand are checked on CPU by lowering only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .config import Plan
from .ssd_common import NEG_INF
from .support import CHUNK_SIZES

HEADDIMS = (64, 128)
STATE_SIZES = (64, 128)
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
ROWS = 64  # rows (and source columns) per block, BT: one warpgroup per program, M=64 wgmmas
STAGES = 2  # shared-memory slots of the (x, C B^T) source-block ring (TMA prefetch depth; 3 gave wrong results)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static shapes of one launch: chunk ``Q``, block ``BT``, ``nb = Q // BT`` row blocks, ``k`` heads per group."""

    Q: int
    BT: int
    nb: int
    k: int
    p: int
    n: int
    stages: int
    has_D: bool
    interpret: bool

    @property
    def a_in_regs(self) -> bool:
        """The decayed ``C B^T`` block is wgmma's A operand straight from registers (compiled) or stored to shared
        memory first (the interpreter takes shared-memory operands only)."""
        return not self.interpret

    @property
    def states_transposed(self) -> bool:
        """The states arrive as ``(b, h, nc, n, p)`` (transposed by XLA): the interpreter's wgmma cannot read a
        ``plgpu.transpose_ref`` operand; compiled kernels read ``(p, n)`` states through one."""
        return self.interpret


def _interpret_params() -> Any:
    """Mosaic GPU interpreter parameters (public in newer jax, private module in 0.10)."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params  # noqa: PLC0415
    return params()


# -------------------------------------------------------------------------------------------------
# register layouts (dropped in interpret mode: the interpreter has no layout_cast)
# -------------------------------------------------------------------------------------------------


def _cast(v: jax.Array, layout: Any, static: _Static) -> jax.Array:
    return v if static.interpret else plgpu.layout_cast(v, layout)


def _load(ref: Any, layout: Any, static: _Static) -> jax.Array:
    """``ref[...]`` in ``layout`` (the layout cast right after the read is the load's layout hint)."""
    return _cast(ref[...], layout, static)


def _iota(shape: tuple, dim: int, static: _Static) -> jax.Array:
    return _cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA, static)


_ROWS = plgpu.Layout.WGMMA.reduce(1)  # a vector indexed by the row t of a WGMMA-layout matrix
_COLS = plgpu.Layout.WGMMA.reduce(0)  # a vector indexed by the column s


def _by_row(v: jax.Array, shape: tuple) -> jax.Array:  # (T,) -> (T, X)
    return lax.broadcast_in_dim(v, shape, [0])


def _by_col(v: jax.Array, shape: tuple) -> jax.Array:  # (S,) -> (X, S)
    return lax.broadcast_in_dim(v, shape, [1])


def _smem_transforms(cols: int, dtype: Any) -> tuple:
    """Tiling + swizzle of a 2-D shared-memory operand whose minor dimension has ``cols`` elements of ``dtype``."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


# -------------------------------------------------------------------------------------------------
# kernel body
# -------------------------------------------------------------------------------------------------


def _decayed_block(
    cb: jax.Array, cs_t: jax.Array, cs_s: jax.Array, w_s: jax.Array, a_t: Optional[jax.Array], c_ref: Optional[jax.Array], static: _Static
) -> jax.Array:
    """``A = CB o L o w`` of one block pair in float32: ``cb (T, S)``, ``cs_t (T,)``, ``cs_s, w_s (S,)``.

    Diagonal block (``a_t`` None): exact ``exp(cs_t - cs_s)`` masked to ``s <= t`` before the ``exp``. A block below
    the diagonal: ``a_t b_s`` with ``b_s = exp(c_ref - cs_s)`` (``ssd_common.split_decay``: T + S exponentials).
    """
    shape = cb.shape
    if a_t is None:
        mask = _iota(shape, 0, static) >= _iota(shape, 1, static)
        L = jnp.exp(jnp.where(mask, _by_row(cs_t, shape) - _by_col(cs_s, shape), NEG_INF))
        return cb * L * _by_col(w_s, shape)
    bw = jnp.exp(c_ref - cs_s) * w_s  # (S,)
    return cb * _by_row(a_t, shape) * _by_col(bw, shape)


def _output_body(*refs, static: _Static) -> None:
    it = iter(refs)
    x_ref, C_ref, cb_ref, cs_ref, w_ref, st_ref = (next(it) for _ in range(6))
    D_ref = next(it) if static.has_D else None
    y_ref = next(it)
    c_smem, st_smem, cs_smem, w_smem, x_smem, cb_smem, a_smem, y_smem, bars, src_bars = it

    Q, BT, S = static.Q, static.BT, static.stages
    hh, c, bb = lax.axis_index("head"), lax.axis_index("chunk"), lax.axis_index("batch")
    i = static.nb - 1 - lax.axis_index("row")  # the row blocks with the most source blocks start first
    gg = lax.div(hh, static.k)
    q0, t0 = c * Q, i * BT  # chunk start in the sequence, row block start in the chunk
    nsteps = i + 1  # source blocks: the diagonal one, then 0 .. i-1

    def source_block(step):
        return jnp.where(step == 0, i, step - 1)

    def load_source(step, slot):
        s0 = source_block(step) * BT
        plgpu.copy_gmem_to_smem(x_ref.at[bb, pl.ds(q0 + s0, BT), hh], x_smem.at[slot], src_bars.at[slot])
        plgpu.copy_gmem_to_smem(cb_ref.at[bb, c, gg, pl.ds(t0, BT), pl.ds(s0, BT)], cb_smem.at[slot], src_bars.at[slot])

    plgpu.copy_gmem_to_smem(cs_ref.at[bb, hh, pl.ds(q0, Q)], cs_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(w_ref.at[bb, hh, pl.ds(q0, Q)], w_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(C_ref.at[bb, pl.ds(q0 + t0, BT), gg], c_smem, bars.at[2])
    plgpu.copy_gmem_to_smem(st_ref.at[bb, hh, c], st_smem, bars.at[3])
    for slot in range(S):
        pl.when(slot < nsteps)(functools.partial(load_source, slot, slot))
    for b in range(4):
        plgpu.barrier_wait(bars.at[b])

    cs_t = _load(cs_smem.at[pl.ds(t0, BT)], _ROWS, static)  # (BT,)
    c_ref = cs_smem[jnp.maximum(t0 - 1, 0)]  # used by the blocks below the diagonal only (i > 0)
    a_t = jnp.exp(cs_t - c_ref)  # (BT,)

    def step(k, diag: bool, acc) -> Optional[jax.Array]:
        """Source step ``k`` (``diag``: the diagonal block, step 0); returns ``D x_t (BT, p)`` at the diagonal step
        (its x block is the row block's own, read before the ring reuses the slot) when there is a D."""
        slot = lax.rem(k, S)
        plgpu.barrier_wait(src_bars.at[slot])
        s0 = source_block(k) * BT
        dx = None
        if diag and static.has_D:
            dx = D_ref[hh] * _load(x_smem.at[slot], plgpu.Layout.WGMMA, static).astype(jnp.float32)
        cb = _load(cb_smem.at[slot], plgpu.Layout.WGMMA, static).astype(jnp.float32)  # (BT, BT)
        cs_s = _load(cs_smem.at[pl.ds(s0, BT)], _COLS, static)
        w_s = _load(w_smem.at[pl.ds(s0, BT)], _COLS, static)
        A = _decayed_block(cb, cs_t, cs_s, w_s, None if diag else a_t, c_ref, static).astype(jnp.bfloat16)
        if static.a_in_regs:
            plgpu.wgmma(acc, A, x_smem.at[slot])
        else:
            a_buf = a_smem.at[lax.rem(k, 2)]
            a_buf[...] = A
            plgpu.commit_smem()
            plgpu.wgmma(acc, a_buf, x_smem.at[slot])
        plgpu.wgmma_wait(1)  # the previous step's wgmma is done: its slot (and A buffer) can be reused

        @pl.when(jnp.logical_and(k >= 1, k - 1 + S < nsteps))
        def _():
            load_source(k - 1 + S, lax.rem(k - 1, S))

        return dx

    def products(acc_off, acc):
        st_t = st_smem if static.states_transposed else plgpu.transpose_ref(st_smem, (1, 0))  # (n, p)
        plgpu.wgmma(acc_off, c_smem, st_t)  # C_t H^T
        dx = step(0, True, acc)

        @pl.loop(1, nsteps)
        def _(k):
            step(k, False, acc)

        return acc_off[...], acc[...], dx

    acc_shape = (BT, static.p)
    off, intra, dx = pl.run_scoped(products, plgpu.ACC(acc_shape, jnp.float32), plgpu.ACC(acc_shape, jnp.float32))
    y = intra + _by_row(jnp.exp(cs_t), acc_shape) * off  # (BT, p)
    if dx is not None:
        y = y + dx
    y_smem[...] = y.astype(y_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_smem, y_ref.at[bb, pl.ds(q0 + t0, BT), hh])
    plgpu.wait_smem_to_gmem(0)


# -------------------------------------------------------------------------------------------------
# launcher
# -------------------------------------------------------------------------------------------------


def unsupported(x, B, C, cs, states, doc, out_dtype, Q: int) -> Optional[str]:
    """Why this kernel cannot take the call (naming the argument and the accepted values), or None; the GPU
    launcher runs ``gpu_output.output`` where it is not None."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if doc is not None:
        return "doc (document ids) must be None; gpu_output.output takes documents"
    if Q not in CHUNK_SIZES:
        return f"the chunk must be one of {CHUNK_SIZES}, got {Q!r}"
    if p not in HEADDIMS:
        return f"headdim p = x.shape[3] must be one of {HEADDIMS}, got {p}"
    if n not in STATE_SIZES:
        return f"state size n = B.shape[3] must be one of {STATE_SIZES}, got {n}"
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        return f"out_dtype must be bfloat16 or float32, got {jnp.dtype(out_dtype)}"
    if g < 1 or h % g:
        return f"groups g = B.shape[2] must divide heads h = {h}, got g = {g}"
    if L % Q:
        return f"sequence length x.shape[1] = {L} must be a multiple of the chunk {Q}"
    for name, arr in (("x", x), ("B", B), ("C", C), ("states", states)):
        if arr.dtype != jnp.bfloat16:
            return f"{name} must be bfloat16 (wgmma operands), got {arr.dtype}"
    if cs.dtype != jnp.float32:
        return f"cs and w must be float32, got {cs.dtype}"
    return None


def output(plan: Plan, x, B, C, cs, w, states, doc, D, out_dtype, cb):
    """``y (b, L, h, p)`` in ``out_dtype``: the drop-in Mosaic GPU counterpart of ``gpu_output.output``.

    Args (the GPU launcher's layouts): ``x (b, L, h, p)``, ``B, C (b, L, g, n)``, ``cs, w (b, h, L)`` float32,
    ``states (b, h, nc, p, n)`` bf16 (the state entering each chunk), ``doc`` must be None, ``D (h,)`` float32 or
    None, ``cb (b, nc, g, Q, Q)`` bf16 from ``gpu_prologue.chunk_cb``; ``plan`` gives the chunk and interpret mode.
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = plan.chunk
    reason = unsupported(x, B, C, cs, states, doc, out_dtype, Q)
    if reason is not None:
        raise ValueError(f"ssd_mosaic_gpu.output: {reason}")
    cb = cb.astype(jnp.bfloat16)
    BT = min(ROWS, Q)
    nb, nc = Q // BT, L // Q
    static = _Static(Q=Q, BT=BT, nb=nb, k=h // g, p=p, n=n, stages=min(STAGES, nb), has_D=D is not None, interpret=bool(plan.interpret))
    bf16 = jnp.bfloat16
    if static.states_transposed:
        states = jnp.swapaxes(states, 3, 4)  # (b, h, nc, n, p)
    ins = [x, C, cb, cs, w, states]
    st_shape = states.shape[3:]
    scratch = [
        plgpu.SMEM((BT, n), bf16, transforms=_smem_transforms(n, bf16)),  # C row block
        plgpu.SMEM(st_shape, bf16, transforms=_smem_transforms(st_shape[1], bf16)),  # entering state
        plgpu.SMEM((Q,), jnp.float32),  # cs of the chunk
        plgpu.SMEM((Q,), jnp.float32),  # w of the chunk
        plgpu.SMEM((static.stages, BT, p), bf16, transforms=_smem_transforms(p, bf16)),  # x source blocks
        plgpu.SMEM((static.stages, BT, BT), bf16, transforms=_smem_transforms(BT, bf16)),  # C B^T blocks
        None if static.a_in_regs else plgpu.SMEM((2, BT, BT), bf16, transforms=_smem_transforms(BT, bf16)),
        plgpu.SMEM((BT, p), out_dtype, transforms=_smem_transforms(p, out_dtype)),  # y row block
        plgpu.Barrier(num_barriers=4),
        plgpu.Barrier(num_arrivals=2, num_barriers=static.stages),
    ]
    if D is not None:
        ins.append(D.astype(jnp.float32))
    kernel = plgpu.kernel(
        functools.partial(_output_body, static=static),
        out_type=jax.ShapeDtypeStruct((b, L, h, p), out_dtype),
        scratch_types=scratch,
        # The last grid axis varies fastest (CUDA x): the heads of one row block, which read the same C B^T and C
        # blocks when they share a group, run side by side.
        grid=(b, nc, nb, h),
        grid_names=("batch", "chunk", "row", "head"),
        interpret=_interpret_params() if plan.interpret else None,
        kernel_name="ssd_output_mosaic",
    )
    return kernel(*ins)
