"""What the Triton kernels of the GPU launcher (and the stepwise kernel) share.

* The Triton import shim: :data:`pltriton` and :func:`triton_params`, whose compiler parameters also select the
  Triton lowering for a plain ``pl.pallas_call`` (jax's default GPU lowering is Mosaic GPU);
* :func:`call`: ``pl.pallas_call`` with one kernel's :class:`~config.Launch` (interpret mode on CPU);
* :class:`ChunkSpecs`: the BlockSpecs of the kernels whose grid is (head block, blocks inside the chunk, chunk,
  batch);
* ``col``, ``row``, ``flat``: 1-D <-> 2-D views of per-position vectors (``ssd_common``'s shape convention).

All index arithmetic goes through multi-dimensional BlockSpecs and per-dimension ``pl.ds`` offsets, so Pallas emits
64-bit offsets whenever an array exceeds 4 GiB: no flat int32 offsets at 1M+ tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from jax.experimental import pallas as pl

from .config import Launch, Plan

try:
    from jax.experimental.pallas import triton as pltriton

    _TritonParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
except ImportError:  # pragma: no cover - a jax without the Pallas Triton backend
    pltriton = None
    _TritonParams = None


def triton_params(launch: Launch, interpret: bool) -> Optional[Any]:
    """Triton compiler parameters for ``launch`` (None in interpret mode or without the Triton backend)."""
    if _TritonParams is None or interpret:
        return None
    return _TritonParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def call(kernel: Callable, plan: Plan, launch: Launch, **kwargs) -> Callable:
    """``pl.pallas_call`` of ``kernel`` with ``launch``'s Triton parameters (interpret mode per ``plan``)."""
    return pl.pallas_call(kernel, interpret=plan.interpret, compiler_params=triton_params(launch, plan.interpret), **kwargs)


def head_block(k: int, wanted: int) -> int:
    """Largest divisor of ``k`` (heads per group) that is at most ``wanted``."""
    hb = max(1, min(wanted, k))
    while k % hb:
        hb -= 1
    return hb


def col(v):
    """``(T,) -> (T, 1)``: a per-position vector indexed by the output row ``t``."""
    return v[:, None]


def row(v):
    """``(S,) -> (1, S)``: a per-position vector indexed by the source column ``s``."""
    return v[None, :]


def flat(v):
    """``(T, 1) -> (T,)``."""
    return v.reshape(v.shape[0])


class ChunkSpecs:
    """The input BlockSpecs shared by the intra-chunk kernels: grid ``(hb, ..., c, bb)`` = (head block of ``HB``
    heads, blocks inside the chunk (one or two grid axes), chunk, batch); ``group(hb)`` is the B/C group the head
    block reads. Each method returns the spec of one kind of operand, whole chunk ``c``."""

    def __init__(self, Q: int, HB: int, p: int, n: int, group: Callable):
        self.Q, self.HB, self.p, self.n, self.group = Q, HB, p, n, group

    def heads(self):  # x, dy: (b, L, h, p)
        return pl.BlockSpec((None, self.Q, self.HB, self.p), lambda hb, *r: (r[-1], r[-2], hb, 0))

    def bc(self):  # B, C: (b, L, g, n)
        return pl.BlockSpec((None, self.Q, None, self.n), lambda hb, *r: (r[-1], r[-2], self.group(hb), 0))

    def scalars(self):  # cs, w: (b, h, L)
        return pl.BlockSpec((None, self.HB, self.Q), lambda hb, *r: (r[-1], hb, r[-2]))

    def states(self):  # (b, h, c, p, n)
        return pl.BlockSpec((None, self.HB, None, self.p, self.n), lambda hb, *r: (r[-1], hb, r[-2], 0, 0))

    def doc(self):  # (b, L)
        return pl.BlockSpec((None, self.Q), lambda hb, *r: (r[-1], r[-2]))

    def per_head(self):  # D: (h,)
        return pl.BlockSpec((self.HB,), lambda hb, *r: (hb,))

    def doc_and_skip(self, doc, D):
        """``(arrays, specs)`` of the optional document ids ``doc (b, L)`` and skip ``D (h,)``, those given, in
        that order (to append to a kernel's inputs)."""
        given = [(doc, self.doc), (D, self.per_head)]
        return [a for a, _ in given if a is not None], [spec() for a, spec in given if a is not None]

    def cb(self):  # (b, c, g, Q, Q) from gpu_prologue.chunk_cb
        return pl.BlockSpec((None, None, None, self.Q, self.Q), lambda hb, *r: (r[-1], r[-2], self.group(hb), 0, 0))
