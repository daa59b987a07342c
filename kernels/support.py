"""What the Pallas kernels support, stated once.

``ssm_jax.ssd.resolve_impl`` (which implementation ``impl="auto"`` picks), the argument checks of ``ssd()`` and
of the kernels' own entry points, and their error messages all read :func:`unsupported`; adding a size means
changing this module only. It imports no Pallas module, so it can be asked on any backend.

Where the kernels run (a :class:`Target`):

* ``impl="pallas"`` (the chunked kernels): compiled on a GPU (the ``"gpu"`` launcher: Triton, and Mosaic GPU for
  the forward output kernel on Hopper) and on a TPU (the ``"tpu"`` launcher: Mosaic TPU); on the CPU the GPU
  launcher runs in Pallas interpret mode (tests; ``impl="auto"`` picks ``"xla"`` there).
* ``impl="stepwise"`` (the per-step recurrence in one kernel): compiled on a GPU (Triton), interpret mode on
  every other backend.

What they accept:

* chunk sizes :data:`CHUNK_SIZES` (``impl="pallas"``; the stepwise kernel has no chunks);
* compiled chunked kernels: ``headdim`` and ``state`` powers of two of at least :data:`MIN_BLOCK` (Triton's
  smallest matrix-product operand dimension; the TPU kernels are lowered and tested at the same sizes); in
  interpret mode any size;
* the stepwise kernel: ``headdim`` and ``state`` powers of two (Triton tensor shapes), on every target;
* ``x``, ``B``, ``C`` in :data:`COMPILED_DTYPES` when compiled, and also float64 in interpret mode (the tests
  check the kernels' algebra in float64).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

CHUNK_SIZES = (64, 128, 256)
MIN_BLOCK = 16
LAUNCHERS = ("gpu", "tpu")
KERNEL_IMPLS = ("pallas", "stepwise")
COMPILED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
INTERPRET_DTYPES = COMPILED_DTYPES + (jnp.dtype(jnp.float64),)


class Target(NamedTuple):
    """Where a kernel runs: ``launcher`` "gpu" or "tpu", compiled or in Pallas interpret mode."""

    launcher: str
    interpret: bool


def default_target(impl: str = "pallas") -> Target:
    """The target of ``impl`` ("pallas" or "stepwise") on the default backend."""
    backend = jax.default_backend()
    if impl == "stepwise":
        return Target("gpu", backend != "gpu")
    return Target("tpu" if backend == "tpu" else "gpu", backend == "cpu")


def on_hopper() -> bool:
    """Whether the default device is an NVIDIA Hopper GPU (compute capability 9.x: wgmma and TMA, which the Mosaic
    GPU output kernel needs)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def is_power_of_two(value: int, minimum: int = 1) -> bool:
    """``value`` is a power of two and at least ``minimum``."""
    return value >= minimum and value & (value - 1) == 0


def unsupported(
    impl: str, target: Target, *, chunk_size: Optional[int] = None, headdim: Optional[int] = None, state: Optional[int] = None, dtype=None
) -> Optional[str]:
    """Why the ``impl`` kernels cannot take a call on ``target`` (naming the argument and the accepted values), or
    None when they can. Arguments left None are not checked (``resolve_impl`` may know only some of them)."""
    if impl not in KERNEL_IMPLS:
        return f"impl must be one of {KERNEL_IMPLS} to run kernels, got {impl!r}"
    if target.launcher not in LAUNCHERS:
        return f"launcher must be one of {LAUNCHERS}, got {target.launcher!r}"
    if impl == "pallas" and chunk_size is not None and chunk_size not in CHUNK_SIZES:
        return f"chunk_size must be one of {CHUNK_SIZES} for the Pallas kernels, got {chunk_size!r}"
    fallback = "recurrent" if impl == "stepwise" else "xla"  # what computes the same without these kernels
    if impl == "stepwise":
        minimum, accepted = 1, "(Triton tensor shapes: 1, 2, 4, ..., 64, 128, ...)"
    elif target.interpret:
        minimum, accepted = None, ""
    else:
        minimum, accepted = MIN_BLOCK, f">= {MIN_BLOCK} for the compiled {target.launcher} kernels (16, 32, 64, ...)"
    for name, size in (("headdim (x.shape[3])", headdim), ("state (B.shape[3])", state)):
        if size is not None and minimum is not None and not is_power_of_two(size, minimum):
            return f"{name} must be a power of two {accepted}, got {size}; use impl='{fallback}'"
    if dtype is not None:
        dtypes = INTERPRET_DTYPES if target.interpret else COMPILED_DTYPES
        if jnp.dtype(dtype) not in dtypes:
            where = "in interpret mode" if target.interpret else "when compiled (float64: interpret mode only)"
            return f"x, B and C must be one of {tuple(d.name for d in dtypes)} {where}, got {jnp.dtype(dtype)}; use impl='{fallback}'"
    return None


def check(impl: str, target: Target, *, where: str, **sizes) -> None:
    """ValueError ``"{where}: {reason}"`` when :func:`unsupported` gives a reason."""
    reason = unsupported(impl, target, **sizes)
    if reason is not None:
        raise ValueError(f"{where}: {reason}")
