"""Inference: caches, one-token steps, streaming prefill of unbounded length, and generation.

Streaming feeds a sequence through the model in chunks and carries, per layer, the conv state (the
last raw pre-conv columns) and the SSM state (float32) from one chunk to the next -- never
zero-padding a chunk's convolution, a known bug of the reference evaluation code. Memory does not
grow with the stream length: one chunk's activations plus the O(1) cache (O(window) with the
sliding-window mitigation). Every function accepts ``mitigation=``. A one-token call (``step``, each decoding
step) runs the SSD as one recurrent state update under ``ssd_impl="auto"``, not as a chunked kernel padded to a
whole chunk for one position.

Prompts of different lengths are left-padded and the padding is masked out of the model (``valid``): a
padded position feeds zeros to the conv and has ``dt = 0``, so each row's conv and SSM state after the
prompt are those of the row alone, with no attention mask and no per-row loop. Generation stops a row at
its end-of-sequence token and pads it after that.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm_jax import mitigations as mitigations_lib
from ssm_jax.model import Mamba2LM, MixerCache
from ssm_jax.sampling import check_sampling_args, mask_padded_vocab, sample

_mask_padded_vocab = mask_padded_vocab  # the name ssm_jax.diagnostics calls it by

Array = jax.Array
Cache = List[MixerCache]
Prompts = Union[np.ndarray, jax.Array, Sequence[Sequence[int]]]


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
    def forward(state, input_ids, cache, mitigation, valid=None):
        model = nnx.merge(graphdef, state)
        return model.forward_with_cache(input_ids, cache, valid=valid, mitigation=mitigation)

    def chunk_loss(state, input_ids, targets, cache, mitigation):
        model = nnx.merge(graphdef, state)
        hidden, cache = model.hidden_states(input_ids, cache=cache, mitigation=mitigation)
        logits = model.logits_from_hidden(hidden)  # (b, t, V) float32
        logits = mask_padded_vocab(logits, model.config.vocab_size)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
        return nll, cache

    def decode_step(state, logits, cache, key, done, mitigation, options):
        """One token per row from ``logits (b, V)``; finished rows (``done``) get the pad token. Returns the
        tokens, the logits after them, the cache and the updated ``done``."""
        model = nnx.merge(graphdef, state)
        token = sample(
            logits,
            key,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            min_p=options.min_p,
            vocab_size=model.config.vocab_size,
        )  # (b,)
        token = jnp.where(done, options.pad_token_id, token)
        if options.eos_token_id is not None:
            done = done | (token == options.eos_token_id)
        logits, cache = model.forward_with_cache(token[:, None], cache, mitigation=mitigation)
        return token, logits[:, -1], cache, done

    def decode(state, logits, cache, done, keys, num_steps, mitigation, options):
        """One block of decoding: ``num_steps <= len(keys)`` steps (a traced count, so every request shares one
        compiled block) in a loop that ends early once every row is done. Returns the block's tokens
        ``(b, len(keys))`` (``pad_token_id`` after the steps taken) and the loop state to continue from."""
        b, block = logits.shape[0], keys.shape[0]

        def cond(carry):
            i, _, _, done, _ = carry
            return (i < num_steps) & ~jnp.all(done)

        def body(carry):
            i, logits, cache, done, out = carry
            token, logits, cache, done = decode_step(state, logits, cache, keys[i], done, mitigation, options)
            return i + 1, logits, cache, done, out.at[:, i].set(token)

        out = jnp.full((b, block), options.pad_token_id, jnp.int32)
        _, logits, cache, done, out = jax.lax.while_loop(cond, body, (jnp.int32(0), logits, cache, done, out))
        return out, logits, cache, done

    return dict(
        forward=jax.jit(forward),
        chunk_loss=jax.jit(chunk_loss),
        decode_step=jax.jit(decode_step, static_argnames=("options",)),
        decode=jax.jit(decode, static_argnames=("options",)),
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


def _check_ids(input_ids, argument: str = "input_ids") -> jax.Array:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"`{argument}` must be (batch, seqlen), got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"`{argument}` must be integers, got dtype {input_ids.dtype}")
    return input_ids.astype(jnp.int32)


def _check_chunk_len(chunk_len: int) -> None:
    if not isinstance(chunk_len, (int, np.integer)) or chunk_len < 1:
        raise ValueError(f"`chunk_len` must be a positive int, got {chunk_len!r}")


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def step(model: Mamba2LM, tokens, cache: Cache, *, mitigation: Optional[mitigations_lib.Mitigation] = None) -> Tuple[Array, Cache]:
    """One token per row: ``tokens (batch,) -> (logits (batch, vocab), new cache)``."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"`tokens` must be (batch,), got shape {tokens.shape}")
    fns, state = _split(model)
    logits, cache = fns["forward"](state, tokens[:, None].astype(jnp.int32), cache, mitigations_lib.resolve(mitigation))
    return logits[:, 0], cache


def pad_prompts(prompts: Prompts, pad_token_id: int = 0, argument: str = "prompts") -> Tuple[Array, Optional[Array]]:
    """A batch of prompts as ``(input_ids (batch, length) int32, valid (batch, length) bool or None)``.

    A ``(batch, length)`` array is used as it is (``valid`` None). A list of 1-D int sequences is left-padded
    with ``pad_token_id`` to the longest and ``valid`` marks the real tokens (None when no row needed padding).
    ``argument`` names the caller's argument in errors.
    """
    if not isinstance(prompts, (list, tuple)):
        return _check_ids(prompts, argument), None
    if not prompts:
        raise ValueError(f"`{argument}` is an empty list; give at least one sequence")
    rows = [np.asarray(p) for p in prompts]
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"`{argument}[{i}]` must be a non-empty 1-D sequence of token ids, got shape {row.shape}")
        if not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"`{argument}[{i}]` must hold integer token ids, got dtype {row.dtype}")
    length = max(row.size for row in rows)
    ids = np.full((len(rows), length), pad_token_id, np.int32)  # (b, L)
    valid = np.zeros((len(rows), length), bool)  # (b, L): True at real tokens, which end every row
    for i, row in enumerate(rows):
        ids[i, length - row.size :] = row
        valid[i, length - row.size :] = True
    return jnp.asarray(ids), (None if valid.all() else jnp.asarray(valid))


def prefill(
    model: Mamba2LM,
    input_ids: Prompts,
    *,
    cache: Optional[Cache] = None,
    chunk_len: int = 2048,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    on_chunk: Optional[Callable[[int, Cache], None]] = None,
) -> Tuple[Array, Cache]:
    """Streams ``input_ids`` of any length through the model in chunks.

    ``input_ids``: a ``(batch, seqlen)`` array, or a list of 1-D sequences of different lengths (left-padded,
    the padding leaving every row's state as if the row were alone; only with a fresh cache). Returns the
    logits after each row's last token ``(batch, vocab)`` and the cache after the sequence.
    ``on_chunk(end_position, cache)`` is called after every chunk (diagnostics record states there).
    """
    input_ids, valid = pad_prompts(input_ids, argument="input_ids")
    if valid is not None and cache is not None:
        raise ValueError(
            "prompts of different lengths need a fresh cache (`cache=None`): left padding after "
            "earlier tokens would not leave their conv and SSM state untouched"
        )
    return _stream(model, input_ids, valid, cache, chunk_len, mitigations_lib.resolve(mitigation), on_chunk)


def _stream(model, input_ids, valid, cache, chunk_len, mitigation, on_chunk=None) -> Tuple[Array, Cache]:
    """``prefill`` on checked ``input_ids (b, L)`` and ``valid (b, L)`` or None."""
    _check_chunk_len(chunk_len)
    if input_ids.shape[1] < 1:
        raise ValueError("`input_ids` has no positions (seqlen = 0)")
    fns, state = _split(model)
    if cache is None:
        cache = init_cache(model, input_ids.shape[0], mitigation)
    logits = None
    for start in range(0, input_ids.shape[1], chunk_len):
        chunk = input_ids[:, start : start + chunk_len]
        chunk_valid = None if valid is None else valid[:, start : start + chunk_len]
        logits, cache = fns["forward"](state, chunk, cache, mitigation, chunk_valid)
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


# Decoding runs in blocks of this many steps: one compiled block serves every ``max_new_tokens`` (a loop over
# ``keys.shape[0]`` steps would compile anew for each length), at one host round trip per block.
DECODE_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class _DecodeOptions:
    """The static settings of a decoding loop (hashable: a compile-time argument)."""

    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    min_p: Optional[float]
    eos_token_id: Optional[int]
    pad_token_id: int


def generate(
    model: Mamba2LM,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    rng: Optional[Array] = None,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    on_token: Optional[Callable[[np.ndarray], None]] = None,
    chunk_len: int = 2048,
) -> np.ndarray:
    """Streams the prompts, then decodes up to ``max_new_tokens`` tokens per row.

    Args:
      prompts: a ``(batch, length)`` int array, or a list of 1-D int sequences of different lengths (left-padded
        and masked: greedy output equals generating each prompt alone).
      max_new_tokens: tokens to decode per row.
      eos_token_id: a row that produces it stops; its later positions hold ``pad_token_id``. Decoding ends once
        every row has stopped. None: every row decodes ``max_new_tokens`` tokens.
      pad_token_id: fills rows after their end (and pads ragged prompts); default ``eos_token_id``, else 0.
      temperature, top_k, top_p, min_p: sampling (:mod:`ssm_jax.sampling`); ``temperature=0`` is greedy.
      rng: PRNG key of the sampling (default ``PRNGKey(0)``).
      mitigation: a state-collapse mitigation applied while streaming and decoding.
      on_token: called after every decoding step with the ``(batch,)`` tokens just produced (``pad_token_id``
        for rows already stopped), for interactive output; the loop then runs step by step from Python.
      chunk_len: prompt streaming chunk length.

    Returns:
      ``(batch, max_new_tokens)`` int32 NumPy array.
    """
    vocab = model.config.vocab_size
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    check_sampling_args(temperature, top_k, top_p, min_p, vocab)
    if eos_token_id is not None and not (isinstance(eos_token_id, (int, np.integer)) and 0 <= eos_token_id < vocab):
        raise ValueError(f"`eos_token_id` must be None or a token id in [0, vocab_size={vocab}), got {eos_token_id!r}")
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    if not (isinstance(pad, (int, np.integer)) and 0 <= pad < model.config.padded_vocab_size):
        raise ValueError(f"`pad_token_id` must be a token id in [0, {model.config.padded_vocab_size}), got {pad!r}")
    input_ids, valid = pad_prompts(prompts, int(pad))
    _check_token_range(input_ids, valid, vocab)
    mitigation = mitigations_lib.resolve(mitigation)
    last_logits, cache = _stream(model, input_ids, valid, None, chunk_len, mitigation)
    options = _DecodeOptions(
        float(temperature),
        None if top_k is None else int(top_k),
        None if top_p is None else float(top_p),
        None if min_p is None else float(min_p),
        None if eos_token_id is None else int(eos_token_id),
        int(pad),
    )
    n = int(max_new_tokens)
    keys = jax.random.split(jax.random.PRNGKey(0) if rng is None else rng, n)  # (n, 2): one per step
    fns, state = _split(model)
    logits, done = last_logits, jnp.zeros((input_ids.shape[0],), bool)
    if on_token is None:
        keys = jnp.concatenate([keys, jnp.zeros((-n % DECODE_BLOCK, 2), keys.dtype)])  # whole blocks of keys
        blocks = []
        for start in range(0, n, DECODE_BLOCK):
            steps = min(DECODE_BLOCK, n - start)
            tokens, logits, cache, done = fns["decode"](
                state, logits, cache, done, keys[start : start + DECODE_BLOCK], jnp.int32(steps), mitigation, options=options
            )
            blocks.append(tokens[:, :steps])
            if eos_token_id is not None and start + steps < n and bool(jnp.all(done)):
                blocks.append(jnp.full((tokens.shape[0], n - start - steps), options.pad_token_id, jnp.int32))
                break
        return np.asarray(jnp.concatenate(blocks, axis=1))
    out = np.full((input_ids.shape[0], n), options.pad_token_id, np.int32)
    for i in range(n):
        token, logits, cache, done = fns["decode_step"](state, logits, cache, keys[i], done, mitigation, options=options)
        out[:, i] = np.asarray(token)
        on_token(out[:, i].copy())
        if eos_token_id is not None and bool(jnp.all(done)):
            break
    return out


def _check_token_range(input_ids: Array, valid: Optional[Array], vocab_size: int) -> None:
    """Prompt ids must index the vocabulary (the embedding lookup would clamp them silently)."""
    ids = np.asarray(input_ids)
    real = ids if valid is None else ids[np.asarray(valid)]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise ValueError(f"`prompts` hold token ids outside [0, vocab_size={vocab_size}): min {real.min()}, max {real.max()}")
