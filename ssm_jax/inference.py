"""Inference: caches, one-token steps, streaming prefill of unbounded length, and generation.

Streaming feeds a sequence through the model in chunks and carries, per layer, the conv state (the
last raw pre-conv columns) and the SSM state (float32) from one chunk to the next -- never
zero-padding a chunk's convolution, a known bug of the reference evaluation code. Memory does not
grow with the stream length: one chunk's activations plus the O(1) cache (O(window) with the
sliding-window mitigation). Every function accepts ``mitigation=``.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm_jax import mitigations as mitigations_lib
from ssm_jax.model import Mamba2LM, MixerCache

Array = jax.Array
Cache = List[MixerCache]


def init_cache(model: Mamba2LM, batch_size: int, mitigation: Optional[mitigations_lib.Mitigation] = None) -> Cache:
    """An empty cache: zero conv and SSM states (and an empty input window for ``sliding_window``)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    cfg = model.config
    cache = model.init_cache(batch_size)
    mitigation = mitigations_lib.resolve(mitigation)
    if mitigation is not None and mitigation.window is not None:
        keep = mitigation.window - 1
        window = (
            jnp.zeros((batch_size, keep, cfg.nheads, cfg.headdim), cfg.jnp_dtype),
            jnp.zeros((batch_size, keep, cfg.nheads), jnp.float32),
            jnp.zeros((batch_size, keep, cfg.ngroups, cfg.d_state), cfg.jnp_dtype),
        )
        cache = [MixerCache(c.conv_state, c.ssm_state, window) for c in cache]
    return cache


# --------------------------------------------------------------------------------------------------
# Jitted pure functions of (graphdef, state): compiled once per model structure and input shape.
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _compiled(graphdef) -> dict:
    def forward(state, input_ids, cache, mitigation):
        model = nnx.merge(graphdef, state)
        return model.forward_with_cache(input_ids, cache, mitigation=mitigation)

    def chunk_loss(state, input_ids, targets, cache, mitigation):
        model = nnx.merge(graphdef, state)
        hidden, cache = model.hidden_states(input_ids, cache=cache, mitigation=mitigation)
        logits = model.logits_from_hidden(hidden)  # (b, t, V) float32
        logits = _mask_padded_vocab(logits, model.config.vocab_size)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
        return nll, cache

    def decode(state, first_logits, cache, rng, mitigation, num_tokens, temperature, top_k):
        model = nnx.merge(graphdef, state)
        vocab = model.config.vocab_size

        def one(carry, key):
            logits, cache = carry
            token = sample(logits, key, temperature=temperature, top_k=top_k, vocab_size=vocab)
            logits, cache = model.forward_with_cache(token[:, None], cache, mitigation=mitigation)
            return (logits[:, -1], cache), token

        (_, cache), tokens = jax.lax.scan(one, (first_logits, cache), jax.random.split(rng, num_tokens))
        return jnp.swapaxes(tokens, 0, 1), cache

    return dict(
        forward=jax.jit(forward),
        chunk_loss=jax.jit(chunk_loss),
        decode=jax.jit(decode, static_argnames=("num_tokens", "temperature", "top_k")),
    )


def _split(model: Mamba2LM):
    graphdef, state = nnx.split(model)
    return _compiled(graphdef), state


def chunk_loss_function(model: Mamba2LM):
    """The jitted per-chunk scorer that streaming uses, for callers that drive their own loop.

    Returns ``(fn, state)`` with ``fn(state, inputs (b, t), targets (b, t), cache, mitigation) ->
    (nll (b, t) float32 nats, new cache)``; compiled once per model structure and chunk shape.
    """
    fns, state = _split(model)
    return fns["chunk_loss"], state


def _mask_padded_vocab(logits: Array, vocab_size: int) -> Array:
    if logits.shape[-1] == vocab_size:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)


def _check_ids(input_ids) -> jax.Array:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"`input_ids` must be (batch, seqlen), got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"`input_ids` must be integers, got dtype {input_ids.dtype}")
    return input_ids.astype(jnp.int32)


def _check_chunk_len(chunk_len: int) -> None:
    if not isinstance(chunk_len, (int, np.integer)) or chunk_len < 1:
        raise ValueError(f"`chunk_len` must be a positive int, got {chunk_len!r}")


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def step(
    model: Mamba2LM, tokens, cache: Cache, *, mitigation: Optional[mitigations_lib.Mitigation] = None
) -> Tuple[Array, Cache]:
    """One token per row: ``tokens (batch,) -> (logits (batch, vocab), new cache)``."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"`tokens` must be (batch,), got shape {tokens.shape}")
    fns, state = _split(model)
    logits, cache = fns["forward"](state, tokens[:, None].astype(jnp.int32), cache, mitigations_lib.resolve(mitigation))
    return logits[:, 0], cache


def prefill(
    model: Mamba2LM,
    input_ids,
    *,
    cache: Optional[Cache] = None,
    chunk_len: int = 2048,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    on_chunk: Optional[Callable[[int, Cache], None]] = None,
) -> Tuple[Array, Cache]:
    """Streams ``input_ids (batch, seqlen)`` of any length through the model in chunks.

    Returns the logits of the last position ``(batch, vocab)`` and the cache after the sequence.
    ``on_chunk(end_position, cache)`` is called after every chunk (diagnostics record states there).
    """
    input_ids = _check_ids(input_ids)
    _check_chunk_len(chunk_len)
    mitigation = mitigations_lib.resolve(mitigation)
    fns, state = _split(model)
    if cache is None:
        cache = init_cache(model, input_ids.shape[0], mitigation)
    logits = None
    for start in range(0, input_ids.shape[1], chunk_len):
        chunk = input_ids[:, start : start + chunk_len]
        logits, cache = fns["forward"](state, chunk, cache, mitigation)
        if on_chunk is not None:
            on_chunk(start + chunk.shape[1], cache)
    return logits[:, -1], cache


def stream_losses(
    model: Mamba2LM,
    tokens,
    *,
    chunk_len: int = 2048,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    on_chunk: Optional[Callable[[int, Cache], None]] = None,
    progress: bool = False,
) -> np.ndarray:
    """Per-token negative log-likelihood ``(batch, seqlen - 1)`` (nats) of ``tokens (batch, seqlen)``,
    streamed in chunks with the conv and SSM state carried across chunk boundaries."""
    tokens = _check_ids(tokens)
    _check_chunk_len(chunk_len)
    if tokens.shape[1] < 2:
        raise ValueError("`tokens` needs at least 2 positions to score next-token predictions")
    mitigation = mitigations_lib.resolve(mitigation)
    fns, state = _split(model)
    cache = init_cache(model, tokens.shape[0], mitigation)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []
    starts = range(0, inputs.shape[1], chunk_len)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="streaming", unit="chunk")
    for start in starts:
        end = start + chunk_len
        nll, cache = fns["chunk_loss"](state, inputs[:, start:end], targets[:, start:end], cache, mitigation)
        losses.append(np.asarray(nll))
        if on_chunk is not None:
            on_chunk(min(end, inputs.shape[1]), cache)
    return np.concatenate(losses, axis=1)


def sample(logits: Array, key: Array, *, temperature: float = 0.0, top_k: Optional[int] = None,
           vocab_size: Optional[int] = None) -> Array:
    """Greedy (``temperature == 0``) or temperature / top-k sampling of ``logits (batch, vocab)``."""
    if vocab_size is not None:
        logits = _mask_padded_vocab(logits, vocab_size)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: Mamba2LM,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    rng: Optional[Array] = None,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    chunk_len: int = 2048,
) -> np.ndarray:
    """Streams the prompt, then decodes ``max_new_tokens`` tokens per row; returns ``(batch, max_new_tokens)``."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    if top_k is not None and not (1 <= top_k <= model.config.vocab_size):
        raise ValueError(f"`top_k` must be in [1, vocab_size={model.config.vocab_size}], got {top_k}")
    mitigation = mitigations_lib.resolve(mitigation)
    last_logits, cache = prefill(model, prompt_ids, chunk_len=chunk_len, mitigation=mitigation)
    fns, state = _split(model)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    tokens, _ = fns["decode"](
        state, last_logits, cache, rng, mitigation, num_tokens=int(max_new_tokens), temperature=float(temperature),
        top_k=top_k,
    )
    return np.asarray(tokens)
