"""JAX's persistent compilation cache, on by default for ssm-jax.

A first training step or ``generate`` call compiles for tens of seconds (the SSD kernels, the model's
layers, the decode loop). JAX can keep compiled executables on disk so that the next process running the
same shapes loads them instead of compiling again; this module turns that on when ``ssm_jax`` is imported,
so ``train.py``, ``eval.py`` and library users all get it.

Where the cache goes, in order:

* ``SSM_JAX_COMPILATION_CACHE=off`` (or ``0``, ``false``, ``no``): nowhere, the cache stays off;
* a directory the user already gave JAX (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update("jax_compilation_cache_dir", ...)`` before the import): kept as it is;
* ``SSM_JAX_COMPILATION_CACHE=<directory>``: that directory;
* otherwise ``$XDG_CACHE_HOME/ssm_jax/jax_compilation_cache`` (``~/.cache/ssm_jax/...`` without it).

JAX keys every entry by the computation, the JAX and backend versions and the compiler flags, so a stale
entry is never used; it caches only compilations that took at least
``jax_persistent_cache_min_compile_time_secs`` (1 s by default). A directory that cannot be created turns
the cache off with a warning rather than failing the import.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import jax

ENV = "SSM_JAX_COMPILATION_CACHE"
OFF_VALUES = ("0", "off", "false", "no")


def default_directory() -> str:
    """``$XDG_CACHE_HOME/ssm_jax/jax_compilation_cache``, or under ``~/.cache`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ssm_jax", "jax_compilation_cache")


def enable_by_default() -> Optional[str]:
    """Turns the persistent cache on as the module docstring says; returns the directory in use (None: off)."""
    choice = os.environ.get(ENV, "").strip()
    if choice.lower() in OFF_VALUES:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current  # the user's own choice
    directory = os.path.expanduser(choice) if choice else default_directory()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        warnings.warn(
            f"ssm_jax: the compilation cache stays off: cannot create {directory} ({err}); set {ENV} to a writable directory, or to 'off'",
            stacklevel=2,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
