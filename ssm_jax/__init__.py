"""ssm-jax: Mamba-2 in JAX/Flax for long contexts.

Public API: :func:`ssd`, :func:`from_pretrained` (a directory or a Hugging Face Hub repo id; bad checkpoints
raise :class:`CheckpointError`), :func:`save_hf`, :func:`save_state_spaces`, :class:`Mamba2Config`,
:class:`Mamba2LM`, and the :mod:`ssm_jax.mitigations` transforms. Generation and streaming live in
:mod:`ssm_jax.inference`; heavier subsystems (data, training, evaluation, parallelism) are imported from their
modules. Importing the package turns JAX's persistent compilation cache on (:mod:`ssm_jax.compilation_cache`:
where it goes, and the opt-out).
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _register_checkout_kernels() -> None:
    """Makes ``ssm_jax.kernels`` importable from a source checkout that was not pip-installed.

    setup.py installs the top-level ``kernels/`` directory as ``ssm_jax.kernels``; a script run from a plain
    checkout (``python train.py`` on a fresh machine or a GPU box) would otherwise not find the kernels and
    ``impl="auto"`` would silently use the XLA path. Importing ``kernels/__init__.py`` does not import Pallas.
    """
    if "ssm_jax.kernels" in _sys.modules or _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")):
        return
    path = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(path, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _importlib_util.spec_from_file_location("ssm_jax.kernels", init, submodule_search_locations=[path])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["ssm_jax.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # as the import system would set it for a real subpackage


_register_checkout_kernels()

from ssm_jax import compilation_cache as _compilation_cache  # noqa: E402
from ssm_jax import mitigations  # noqa: E402
from ssm_jax.convert import from_pretrained, save_hf, save_state_spaces  # noqa: E402
from ssm_jax.hub import CheckpointError  # noqa: E402
from ssm_jax.model import Mamba2Block, Mamba2Config, Mamba2LM, Mamba2Mixer  # noqa: E402
from ssm_jax.ssd import ssd  # noqa: E402

_compilation_cache.enable_by_default()  # off with SSM_JAX_COMPILATION_CACHE=off

__all__ = [
    "ssd",
    "from_pretrained",
    "save_hf",
    "save_state_spaces",
    "CheckpointError",
    "Mamba2Config",
    "Mamba2LM",
    "Mamba2Mixer",
    "Mamba2Block",
    "mitigations",
]
__version__ = "0.1.0"
