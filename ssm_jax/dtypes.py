"""Floating-point dtype arguments in any of the forms JAX users write, stored under one canonical name.

Every dtype argument of the library (``Mamba2Config.dtype`` / ``param_dtype``, ``from_pretrained(dtype=...)``,
``config.model.dtype``) goes through :func:`dtype_name`, so ``"bfloat16"``, ``jnp.bfloat16``,
``np.dtype("float16")`` and ``np.float32`` all work, and configs keep a plain string (JSON-serialisable,
comparable, overridable from the command line).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

# Canonical name -> jnp scalar type, for the floating dtypes the model computes or stores parameters in.
FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}

_ACCEPTED = f"one of {sorted(FLOAT_DTYPES)} as a string, a jnp scalar type (e.g. jnp.bfloat16) or a np.dtype (e.g. np.dtype('float32'))"


def dtype_name(value: Any, argument: str) -> str:
    """The canonical name (``"bfloat16"``, ...) of a dtype given as a string, a jnp / NumPy scalar type or a
    ``np.dtype``; ``argument`` names the caller's argument in the error raised for anything else."""
    if isinstance(value, str):
        name = value
    elif isinstance(value, np.dtype):
        name = value.name
    elif isinstance(value, type) and isinstance(getattr(value, "dtype", None), np.dtype):
        name = value.dtype.name  # jnp.bfloat16, jnp.float32: jax scalar types carry their np.dtype
    elif isinstance(value, type) and issubclass(value, np.generic):
        name = np.dtype(value).name  # np.float32, ml_dtypes.bfloat16
    else:
        raise ValueError(f"`{argument}` must be {_ACCEPTED}; got {value!r} of type {type(value).__name__}")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"`{argument}` must be {_ACCEPTED}; got {value!r}")
    return name


def jnp_dtype(name: str):
    """The jnp scalar type of a canonical name returned by :func:`dtype_name`."""
    return FLOAT_DTYPES[name]
