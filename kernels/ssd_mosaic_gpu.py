"""Mosaic GPU (Hopper: TMA + wgmma) version of the SSD forward output kernel of :mod:`ssd_gpu`.

Why: ``ssd_gpu.output`` (Triton lowering) is the largest forward kernel (0.242 of 0.36 ms at b8 x L4096, 32 heads x
headdim 64, state 128, chunk 256, bf16 on an H200, data floor ~0.08 ms). This module computes the same ``y`` with
``plgpu.kernel`` so that one GPU run (``benchmarks/mosaic_bench.py``) can say whether wgmma beats the Triton lowering.

Math (one head, chunk ``c``, output rows ``t`` of one row block, source positions ``s <= t`` of the chunk;
:mod:`ssd_common` notation)::

    y_t = sum_s CB[t, s] exp(cs_t - cs_s) w_s x_s  +  exp(cs_t) C_t . H_c^T  (+ D x_t)

One program (one warpgroup) per (batch, chunk, row block of ``BT`` rows, head), heads fastest:

* TMA loads of the chunk's ``cs`` and ``w`` (``(Q,)`` float32), the row block of ``C`` ``(BT, n)``, the entering state
  ``H_c`` ``(p, n)`` and, through a ring of ``STAGES`` shared-memory slots, one ``(BT, BT)`` block of ``C B^T`` (from
  ``ssd_gpu.chunk_cb``) and the matching ``(BT, p)`` block of ``x`` per source block: the diagonal block first, then the
  blocks before it.
* With a ``"segments"`` state scan's ``join = (entering, decay, run)`` the loaded ``H_c`` is the run-local state: the
  run's entering state ``E_{c // run}`` ``(p, n)`` is TMA-loaded too and ``H_c + decay_c E_{c // run}`` is formed in
  float32 registers, stored back (bf16) into the state's shared-memory buffer and fenced before the state wgmma (the
  Triton kernel's ``state(hh)``; ``ssd_gpu.add_entering`` without the ``(b, h, nc, p, n)`` round trip).
* State term: ``wgmma(C_t, H_c^T)`` into its own accumulator (``plgpu.transpose_ref`` of the ``(p, n)`` state), scaled
  per row by ``exp(cs_t)`` in float32 at the end.
* Intra-chunk term: per source block the decayed, masked block ``A = CB o L o w`` is computed in float32 registers
  (diagonal block: exact masked ``exp(cs_t - cs_s)``; blocks below it: ``a_t b_s`` with ``a_t = exp(cs_t - c_ref)``,
  ``b_s = exp(c_ref - cs_s)``, ``c_ref`` the cumulative log-decay just before the row block, as
  ``ssd_common.split_decay``), cast to bf16 (as the Triton kernel does) and multiplied with the bf16 ``x`` block by
  ``wgmma`` (A from registers, or through shared memory), float32 accumulation.

Only ``doc=None`` (no document ids) is supported: callers fall back to ``ssd_gpu.output`` otherwise.

Interpret mode (CPU, ``cfg.interpret``) runs the kernel in Mosaic GPU's interpreter, which has no ``layout_cast``
(layouts are dropped there), takes wgmma operands from shared memory only (every variant runs its shared-memory-A
form there) and cannot read a ``plgpu.transpose_ref`` operand (the states are transposed by XLA there): the register-A
wgmma and the transposed state operand are checked on CPU by lowering only.
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

CHUNKS = (64, 128, 256)
HEADDIMS = (64, 128)
STATE_SIZES = (64, 128)
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
NEG_INF = float("-inf")


ROWS = 64  # rows (and source columns) per block, BT: one warpgroup per program, M=64 wgmmas
STAGES = 2  # shared-memory slots of the (x, C B^T) source-block ring (TMA prefetch depth)


@dataclasses.dataclass(frozen=True)
class Variant:
    """Static launch choices of the kernel.

    Attributes:
      a_in_regs: the decayed ``C B^T`` block is wgmma's A operand straight from registers (else stored to shared
        memory first; the interpreter needs that).
    """

    a_in_regs: bool = True


# Measured on an H200 (jax 0.11.2, b8 x L4096, h32 p64 n128 chunk 256): r64_s2 200 us vs Triton 245 us. Dropped:
# 3 ring slots (wrong results on the GPU, cause not found; the interpreter runs wgmma synchronously) and 128-row
# blocks (435 us).
VARIANTS = {
    "r64_s2": Variant(a_in_regs=True),
    "r64_s2_smem_a": Variant(a_in_regs=False),  # 263 us; the form the interpreter runs
}
DEFAULT_VARIANT = "r64_s2"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shapes of one launch: chunk ``Q``, block ``BT``, ``nb = Q // BT`` row blocks, ``k`` heads per group."""

    Q: int
    BT: int
    nb: int
    k: int
    p: int
    n: int
    stages: int
    a_in_regs: bool
    has_D: bool
    run: int  # chunks per run of a "segments" join (0: no join)
    interpret: bool

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


def _cast(v: jax.Array, layout: Any, plan: _Plan) -> jax.Array:
    return v if plan.interpret else plgpu.layout_cast(v, layout)


def _load(ref: Any, layout: Any, plan: _Plan) -> jax.Array:
    """``ref[...]`` in ``layout`` (the layout cast right after the read is the load's layout hint)."""
    return _cast(ref[...], layout, plan)


def _iota(shape: tuple, dim: int, plan: _Plan) -> jax.Array:
    return _cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA, plan)


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


def _decayed_block(cb: jax.Array, cs_t: jax.Array, cs_s: jax.Array, w_s: jax.Array, a_t: Optional[jax.Array],
                   c_ref: Optional[jax.Array], plan: _Plan) -> jax.Array:
    """``A = CB o L o w`` of one block pair in float32: ``cb (T, S)``, ``cs_t (T,)``, ``cs_s, w_s (S,)``.

    Diagonal block (``a_t`` None): exact ``exp(cs_t - cs_s)`` masked to ``s <= t`` before the ``exp``. A block below
    the diagonal: ``a_t b_s`` with ``b_s = exp(c_ref - cs_s)`` (``ssd_common.split_decay``: T + S exponentials).
    """
    shape = cb.shape
    if a_t is None:
        mask = _iota(shape, 0, plan) >= _iota(shape, 1, plan)
        L = jnp.exp(jnp.where(mask, _by_row(cs_t, shape) - _by_col(cs_s, shape), NEG_INF))
        return cb * L * _by_col(w_s, shape)
    bw = jnp.exp(c_ref - cs_s) * w_s  # (S,)
    return cb * _by_row(a_t, shape) * _by_col(bw, shape)


def _output_body(*refs, plan: _Plan) -> None:
    it = iter(refs)
    x_ref, C_ref, cb_ref, cs_ref, w_ref, st_ref = (next(it) for _ in range(6))
    ent_ref, dec_ref = (next(it), next(it)) if plan.run else (None, None)
    D_ref = next(it) if plan.has_D else None
    y_ref = next(it)
    c_smem, st_smem, ent_smem, cs_smem, w_smem, x_smem, cb_smem, a_smem, y_smem, bars, src_bars = it

    Q, BT, S = plan.Q, plan.BT, plan.stages
    hh, c, bb = lax.axis_index("head"), lax.axis_index("chunk"), lax.axis_index("batch")
    i = plan.nb - 1 - lax.axis_index("row")  # the row blocks with the most source blocks start first
    gg = lax.div(hh, plan.k)
    q0, t0 = c * Q, i * BT  # chunk start in the sequence, row block start in the chunk
    nsteps = i + 1  # source blocks: the diagonal one, then 0 .. i-1

    def source_block(step):
        return jnp.where(step == 0, i, step - 1)

    def load_source(step, slot):
        s0 = source_block(step) * BT
        plgpu.copy_gmem_to_smem(x_ref.at[bb, pl.ds(q0 + s0, BT), hh], x_smem.at[slot], src_bars.at[slot])
        plgpu.copy_gmem_to_smem(cb_ref.at[bb, c, gg, pl.ds(t0, BT), pl.ds(s0, BT)], cb_smem.at[slot],
                                src_bars.at[slot])

    plgpu.copy_gmem_to_smem(cs_ref.at[bb, hh, pl.ds(q0, Q)], cs_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(w_ref.at[bb, hh, pl.ds(q0, Q)], w_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(C_ref.at[bb, pl.ds(q0 + t0, BT), gg], c_smem, bars.at[2])
    plgpu.copy_gmem_to_smem(st_ref.at[bb, hh, c], st_smem, bars.at[3])
    if plan.run:
        plgpu.copy_gmem_to_smem(ent_ref.at[bb, hh, lax.div(c, plan.run)], ent_smem, bars.at[4])
    for slot in range(S):
        pl.when(slot < nsteps)(functools.partial(load_source, slot, slot))
    for b in range(5 if plan.run else 4):
        plgpu.barrier_wait(bars.at[b])
    if plan.run:  # the true entering state: run-local state + decay * the run's entering state, bf16 for the wgmma
        st = _load(st_smem, plgpu.Layout.WGMMA, plan).astype(jnp.float32)
        ent = _load(ent_smem, plgpu.Layout.WGMMA, plan).astype(jnp.float32)
        st_smem[...] = (st + dec_ref[bb, hh, c] * ent).astype(st_smem.dtype)
        plgpu.commit_smem()  # generic-proxy stores -> visible to the state wgmma (async proxy), whole warpgroup

    cs_t = _load(cs_smem.at[pl.ds(t0, BT)], _ROWS, plan)  # (BT,)
    c_ref = cs_smem[jnp.maximum(t0 - 1, 0)]  # used by the blocks below the diagonal only (i > 0)
    a_t = jnp.exp(cs_t - c_ref)  # (BT,)

    def step(k, diag: bool, acc) -> Optional[jax.Array]:
        """Source step ``k`` (``diag``: the diagonal block, step 0); returns ``D x_t (BT, p)`` at the diagonal step
        (its x block is the row block's own, read before the ring reuses the slot) when there is a D."""
        slot = lax.rem(k, S)
        plgpu.barrier_wait(src_bars.at[slot])
        s0 = source_block(k) * BT
        dx = None
        if diag and plan.has_D:
            dx = D_ref[hh] * _load(x_smem.at[slot], plgpu.Layout.WGMMA, plan).astype(jnp.float32)
        cb = _load(cb_smem.at[slot], plgpu.Layout.WGMMA, plan).astype(jnp.float32)  # (BT, BT)
        cs_s = _load(cs_smem.at[pl.ds(s0, BT)], _COLS, plan)
        w_s = _load(w_smem.at[pl.ds(s0, BT)], _COLS, plan)
        A = _decayed_block(cb, cs_t, cs_s, w_s, None if diag else a_t, c_ref, plan).astype(jnp.bfloat16)
        if plan.a_in_regs:
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
        st_t = st_smem if plan.states_transposed else plgpu.transpose_ref(st_smem, (1, 0))  # (n, p)
        plgpu.wgmma(acc_off, c_smem, st_t)  # C_t H^T
        dx = step(0, True, acc)

        @pl.loop(1, nsteps)
        def _(k):
            step(k, False, acc)

        return acc_off[...], acc[...], dx

    acc_shape = (BT, plan.p)
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
    """Why this kernel cannot take the call (naming the argument and the accepted values), or None: callers fall
    back to ``ssd_gpu.output`` where it is not None."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if doc is not None:
        return "doc (document ids) must be None; use ssd_gpu.output with documents"
    if Q not in CHUNKS:
        return f"cfg.chunk must be one of {CHUNKS}, got {Q!r}"
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


def _check(x, B, C, cs, states, doc, out_dtype, Q: int, join) -> None:
    """ValueError naming the argument for everything this kernel does not support."""
    reason = unsupported(x, B, C, cs, states, doc, out_dtype, Q)
    if reason is not None:
        raise ValueError(f"ssd_mosaic_gpu.output: {reason}")
    b, L, h, p = x.shape
    n = B.shape[3]
    if join is not None:
        entering, decay, run = join
        nc = L // Q
        if not isinstance(run, int) or run < 1:
            raise ValueError(f"ssd_mosaic_gpu.output: join run must be a python int >= 1, got {run!r}")
        want = (b, h, -(-nc // run), p, n)
        if tuple(entering.shape) != want:
            raise ValueError(f"ssd_mosaic_gpu.output: join entering must have shape {want}, got {entering.shape}")
        if tuple(decay.shape) != (b, h, nc) or decay.dtype != jnp.float32:
            raise ValueError(f"ssd_mosaic_gpu.output: join decay must be float32 {(b, h, nc)}, got "
                             f"{decay.dtype} {decay.shape}")


def output(cfg, x, B, C, cs, w, states, doc, D, out_dtype, cb, join=None, *, variant: str = DEFAULT_VARIANT):
    """``y (b, L, h, p)`` in ``out_dtype``: the drop-in Mosaic GPU counterpart of ``ssd_gpu.output``.

    Args (layouts of :mod:`ssd_gpu`): ``x (b, L, h, p)``, ``B, C (b, L, g, n)``, ``cs, w (b, h, L)`` float32,
    ``states (b, h, nc, p, n)`` bf16 (state entering each chunk), ``doc`` must be None, ``D (h,)`` float32 or None,
    ``cb (b, nc, g, Q, Q)`` bf16 from ``ssd_gpu.chunk_cb``; ``join``: None or ``(entering (b, h, nseg, p, n),
    decay (b, h, nc) float32, run)`` of a ``"segments"`` state scan whose run-local ``states`` these are (chunk
    ``c`` then uses ``states[c] + decay[c] * entering[c // run]``, as ``ssd_gpu.output``). ``cfg`` gives the chunk
    and interpret mode; ``variant`` names a :data:`VARIANTS` entry.
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = cfg.chunk
    _check(x, B, C, cs, states, doc, out_dtype, Q, join)
    if variant not in VARIANTS:
        raise ValueError(f"ssd_mosaic_gpu.output: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    var = VARIANTS[variant]
    if cfg.interpret and var.a_in_regs:
        var = dataclasses.replace(var, a_in_regs=False)  # the interpreter's wgmma takes shared-memory operands only
    cb = cb.astype(jnp.bfloat16)
    BT = min(ROWS, Q)
    nb, nc = Q // BT, L // Q
    plan = _Plan(Q=Q, BT=BT, nb=nb, k=h // g, p=p, n=n, stages=min(STAGES, nb), a_in_regs=var.a_in_regs,
                 has_D=D is not None, run=0 if join is None else join[2], interpret=bool(cfg.interpret))
    bf16 = jnp.bfloat16
    ins = [x, C, cb, cs, w, states]
    if join is not None:
        ins += [join[0].astype(bf16), join[1]]
    if plan.states_transposed:  # states and the runs' entering states as (.., n, p)
        ins[5:7] = [jnp.swapaxes(a, 3, 4) for a in ins[5:7]]
    st_shape = ins[5].shape[3:]
    st_smem = plgpu.SMEM(st_shape, bf16, transforms=_smem_transforms(st_shape[1], bf16))
    scratch = [
        plgpu.SMEM((BT, n), bf16, transforms=_smem_transforms(n, bf16)),  # C row block
        st_smem,  # entering state
        None if join is None else st_smem,  # the run's entering state (join)
        plgpu.SMEM((Q,), jnp.float32),  # cs of the chunk
        plgpu.SMEM((Q,), jnp.float32),  # w of the chunk
        plgpu.SMEM((plan.stages, BT, p), bf16, transforms=_smem_transforms(p, bf16)),  # x source blocks
        plgpu.SMEM((plan.stages, BT, BT), bf16, transforms=_smem_transforms(BT, bf16)),  # C B^T blocks
        None if plan.a_in_regs else plgpu.SMEM((2, BT, BT), bf16, transforms=_smem_transforms(BT, bf16)),
        plgpu.SMEM((BT, p), out_dtype, transforms=_smem_transforms(p, out_dtype)),  # y row block
        plgpu.Barrier(num_barriers=4 if join is None else 5),
        plgpu.Barrier(num_arrivals=2, num_barriers=plan.stages),
    ]
    if D is not None:
        ins.append(D.astype(jnp.float32))
    kernel = plgpu.kernel(
        functools.partial(_output_body, plan=plan),
        out_type=jax.ShapeDtypeStruct((b, L, h, p), out_dtype),
        scratch_types=scratch,
        # The last grid axis varies fastest (CUDA x): the heads of one row block, which read the same C B^T and C
        # blocks when they share a group, run side by side.
        grid=(b, nc, nb, h),
        grid_names=("batch", "chunk", "row", "head"),
        interpret=_interpret_params() if cfg.interpret else None,
        kernel_name="ssd_output_mosaic",
    )
    return kernel(*ins)
