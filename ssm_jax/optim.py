"""Optimiser and learning-rate schedules for training (optax only; no data or config imports).

The paper's recipe (arXiv 2410.07145 section 6): AdamW with weight decay 0.1, gradient clipping at global norm
1.0, a warmup-stable-decay schedule. Weight decay is applied to the matrices only (embedding, in/out
projection kernels, conv weights): never to norms, biases, ``A_log``, ``D`` or ``dt_bias``
(:func:`weight_decay_mask`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "SCHEDULES",
    "DECAY_SHAPES",
    "NO_DECAY_NAMES",
    "make_schedule",
    "weight_decay_mask",
    "make_optimizer",
]

SCHEDULES = ("wsd", "cosine", "constant")
DECAY_SHAPES = ("linear", "sqrt", "cosine")
NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias", "conv_bias", "bias", "norm_weight", "norm_f_weight"})


def _decay_curve(frac, shape: str):
    """1 -> 0 as ``frac`` goes 0 -> 1."""
    if shape == "linear":
        return 1.0 - frac
    if shape == "sqrt":
        return 1.0 - jnp.sqrt(frac)
    if shape == "cosine":
        return 0.5 * (1.0 + jnp.cos(math.pi * frac))
    raise ValueError(f"decay shape must be one of {DECAY_SHAPES}, got {shape!r}")


def make_schedule(
    kind: str,
    *,
    peak_lr: float,
    num_steps: int,
    warmup_steps: int = 0,
    decay_fraction: float = 0.2,
    min_lr_ratio: float = 0.0,
    decay_shape: str = "linear",
) -> Callable[[Any], jax.Array]:
    """A learning-rate schedule ``count -> lr`` (``count`` = optimiser updates applied so far).

    * warmup (all kinds): ``lr = peak * (count + 1) / warmup_steps`` for the first ``warmup_steps``;
    * ``"wsd"`` (warmup-stable-decay): then ``peak`` until the last ``round(decay_fraction * num_steps)``
      steps, which go down to ``min_lr_ratio * peak`` along ``decay_shape`` ("linear", "sqrt": 1 - sqrt,
      "cosine"), reaching it at the final step;
    * ``"cosine"``: from the end of warmup a cosine down to ``min_lr_ratio * peak`` at the final step;
    * ``"constant"``: ``peak`` after warmup.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"decay shape must be one of {DECAY_SHAPES}, got {decay_shape!r}")
    if peak_lr <= 0:
        raise ValueError(f"peak learning rate must be > 0, got {peak_lr}")
    if num_steps < 1 or warmup_steps < 0 or warmup_steps > num_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= num_steps ({num_steps}) and num_steps >= 1")
    min_lr = peak_lr * min_lr_ratio
    if kind == "wsd":
        decay_steps = int(round(decay_fraction * num_steps))
        if warmup_steps + decay_steps > num_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) + decay steps ({decay_steps}) exceed num_steps ({num_steps})")
        shape = decay_shape
    elif kind == "cosine":
        decay_steps = num_steps - warmup_steps
        shape = "cosine"
    else:
        decay_steps = 0
        shape = "linear"
    decay_start = num_steps - decay_steps

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        lr = jnp.full((), peak_lr, jnp.float32)
        if warmup_steps > 0:
            lr = jnp.where(step < warmup_steps, peak_lr * (step + 1.0) / warmup_steps, lr)
        if decay_steps > 0:
            frac = jnp.clip((step - decay_start + 1.0) / decay_steps, 0.0, 1.0)
            decayed = min_lr + (peak_lr - min_lr) * _decay_curve(frac, shape)
            lr = jnp.where(step >= decay_start, decayed, lr)
        return lr

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools: True for arrays of rank >= 2 whose name is not in :data:`NO_DECAY_NAMES`."""

    def decay(path, leaf):
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return bool(jnp.ndim(leaf) >= 2 and str(name) not in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(
    learning_rate: Union[float, Callable[[Any], jax.Array]],
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: Optional[float] = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when ``clip_norm`` is None or <= 0) then AdamW with the decay mask."""
    parts = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts)
