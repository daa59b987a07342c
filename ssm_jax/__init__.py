"""ssm-jax: Mamba-2 in JAX/Flax for long contexts.

Public API (DESIGN.md): :func:`ssd`, :func:`from_pretrained`, :class:`Mamba2Config`, :class:`Mamba2LM`,
and the :mod:`ssm_jax.mitigations` transforms. Heavier subsystems (data, training, evaluation,
parallelism) are imported from their modules.
"""

from ssm_jax import mitigations
from ssm_jax.convert import from_pretrained, save_hf
from ssm_jax.model import Mamba2Block, Mamba2Config, Mamba2LM, Mamba2Mixer
from ssm_jax.ssd import ssd

__all__ = [
    "ssd", "from_pretrained", "save_hf", "Mamba2Config", "Mamba2LM", "Mamba2Mixer", "Mamba2Block", "mitigations",
]
__version__ = "0.1.0"
