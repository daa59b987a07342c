"""Next-token sampling: greedy, temperature, and the top-k / top-p (nucleus) / min-p truncations.

Each truncation keeps a support set of the distribution ``p = softmax(logits / temperature)`` and sampling draws
from ``p`` renormalised on what is kept. Applied in this order, each to the distribution the previous one left:

* top-k: the ``k`` most probable tokens (tokens tied with the k-th are kept too);
* top-p: the smallest set of most probable tokens whose probability sums to at least ``p`` (tokens tied with
  the least probable one kept are kept too);
* min-p: the tokens with probability at least ``min_p`` times the largest probability.

Tokens at or beyond ``vocab_size`` (the padding rows of a padded embedding) are never drawn.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float], min_p: Optional[float], vocab_size: int) -> None:
    """Raises ValueError naming the first argument outside its range."""
    if not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"`temperature` must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, numbers.Integral) and 1 <= top_k <= vocab_size):
        raise ValueError(f"`top_k` must be None or an int in [1, vocab_size={vocab_size}], got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"`top_p` must be None or a number in (0, 1], got {top_p!r}")
    if min_p is not None and not (isinstance(min_p, numbers.Real) and 0.0 <= min_p <= 1.0):
        raise ValueError(f"`min_p` must be None or a number in [0, 1], got {min_p!r}")


def mask_padded_vocab(logits: Array, vocab_size: int) -> Array:
    """``logits (..., padded_vocab)`` with ``-inf`` at ids ``>= vocab_size``."""
    if logits.shape[-1] == vocab_size:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)


def filter_logits(logits: Array, *, top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None) -> Array:
    """``logits (batch, vocab)`` float32 with ``-inf`` outside the support kept by top-k, then top-p, then min-p."""
    logits = logits.astype(jnp.float32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # (b, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)  # renormalised on what top-k kept
        ordered = -jnp.sort(-probs, axis=-1)  # (b, V), most probable first
        mass_before = jnp.cumsum(ordered, axis=-1) - ordered  # probability of the tokens ranked before each
        kept = mass_before < top_p  # the first token always; then until the mass reaches top_p
        cutoff = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)  # (b, 1)
        logits = jnp.where(probs < cutoff, -jnp.inf, logits)
    if min_p is not None:
        probs = jax.nn.softmax(logits, axis=-1)
        floor = min_p * jnp.max(probs, axis=-1, keepdims=True)  # (b, 1)
        logits = jnp.where(probs < floor, -jnp.inf, logits)
    return logits


def sample(
    logits: Array,
    key: Array,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    vocab_size: Optional[int] = None,
) -> Array:
    """One token per row of ``logits (batch, vocab)``: argmax when ``temperature == 0`` (the truncations
    cannot change it), otherwise a draw from the truncated ``softmax(logits / temperature)``. Returns int32."""
    if vocab_size is not None:
        logits = mask_padded_vocab(logits, vocab_size)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
