"""The passkey retrieval task (arXiv 2410.07145 section 6): prompts for evaluation and examples for fine-tuning.

A prompt is, one part per line (parts that would be empty are left out)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
    The passkey is 12345. Remember it. 12345 is the passkey.
    ... filler continues ...
    What is the passkey? The passkey is

The filler is the five sentences above repeated in order. With ``n`` filler sentences and depth ``d`` in
[0, 1], the passkey line follows the first ``round(d * n)`` sentences, so it always sits at a sentence
boundary; ``d = 0`` puts it right after the instruction, ``d = 1`` right before the question.

Length. :func:`make_passkey_example` picks the largest ``n`` whose tokenised prompt has at most
``context_tokens`` tokens (exact tokenisation of the whole prompt, found by a galloping binary search).
So ``len(prompt_ids) <= context_tokens`` always, and the shortfall is smaller than the cost of one more
filler sentence, bounded by :func:`passkey_length_tolerance` (23 tokens for the byte tokenizer, a few
for GPT-NeoX).

Correctness. The model greedily generates a few tokens after the prompt; :func:`passkey_is_correct`
accepts the answer when the 5 digits appear as a whole number in the generated text.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Callable

import grain
import numpy as np

from ssm_jax.data.pipeline import to_iter_dataset, validate_common_args
from ssm_jax.data.tokenization import Tokenizer

__all__ = [
    "PASSKEY_INSTRUCTION",
    "FILLER_SENTENCES",
    "PASSKEY_LINE",
    "PASSKEY_QUESTION",
    "PasskeyExample",
    "build_passkey_prompt",
    "random_passkey",
    "passkey_length_tolerance",
    "make_passkey_example",
    "passkey_is_correct",
    "make_passkey_training_example",
    "make_passkey_map_dataset",
    "make_passkey_dataset",
]

PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
PASSKEY_LINE = "The passkey is {passkey}. Remember it. {passkey} is the passkey."
PASSKEY_QUESTION = "What is the passkey? The passkey is"
PASSKEY_DIGITS = 5


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
    """One evaluation prompt: token ids, the expected answer and the requested placement and length."""

    prompt_ids: np.ndarray  # int32 (prompt_length,), prompt_length <= context_tokens
    passkey: str
    depth: float
    context_tokens: int


def _check_passkey(passkey: str) -> str:
    if not (isinstance(passkey, str) and passkey.isdigit() and passkey.isascii()):
        raise ValueError(f"passkey={passkey!r} must be a string of ASCII digits")
    return passkey


def _check_depth(depth: float) -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")
    return float(depth)


def build_passkey_prompt(num_filler_sentences: int, depth: float, passkey: str) -> str:
    """The prompt text with ``num_filler_sentences`` filler sentences and the needle at ``depth``."""
    if num_filler_sentences < 0:
        raise ValueError(f"num_filler_sentences={num_filler_sentences} must be >= 0")
    depth = _check_depth(depth)
    _check_passkey(passkey)
    k = len(FILLER_SENTENCES)
    filler = [FILLER_SENTENCES[i % k] for i in range(num_filler_sentences)]
    n_before = round(depth * num_filler_sentences)
    parts = [
        PASSKEY_INSTRUCTION,
        " ".join(filler[:n_before]),
        PASSKEY_LINE.format(passkey=passkey),
        " ".join(filler[n_before:]),
        PASSKEY_QUESTION,
    ]
    return "\n".join(p for p in parts if p)


def random_passkey(rng: np.random.Generator) -> str:
    """A uniformly random 5-digit passkey without a leading zero."""
    return str(int(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS)))


def passkey_length_tolerance(tokenizer: Tokenizer) -> int:
    """Upper bound on ``context_tokens - len(prompt_ids)``: one filler sentence plus a line break."""
    return max(len(tokenizer.encode(" " + s)) for s in FILLER_SENTENCES) + 1


def _largest_fitting(fits: Callable[[int], bool], guess: int) -> int:
    """Largest ``n >= 0`` with ``fits(n)`` for a monotone predicate with ``fits(0)`` True."""
    guess = max(0, guess)
    if fits(guess):
        lo, step = guess, 1
        while fits(lo + step):
            lo += step
            step *= 2
        hi = lo + step
    else:
        hi, step = guess, 1
        while hi - step > 0 and not fits(hi - step):
            hi -= step
            step *= 2
        lo = max(0, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def make_passkey_example(
    tokenizer: Tokenizer,
    context_tokens: int,
    depth: float,
    rng: np.random.Generator,
    *,
    passkey: str | None = None,
) -> PasskeyExample:
    """A passkey prompt of at most ``context_tokens`` tokens with the needle at ``depth``.

    The passkey is drawn from ``rng`` unless given. Raises ValueError when even a prompt without
    filler does not fit in ``context_tokens``.
    """
    depth = _check_depth(depth)
    passkey = _check_passkey(passkey) if passkey is not None else random_passkey(rng)
    cache: dict[int, list[int]] = {}

    def ids(n: int) -> list[int]:
        if n not in cache:
            cache[n] = tokenizer.encode(build_passkey_prompt(n, depth, passkey))
        return cache[n]

    minimum = len(ids(0))
    if context_tokens < minimum:
        raise ValueError(f"context_tokens={context_tokens} is below the shortest passkey prompt ({minimum} tokens for this tokenizer)")
    per_sentence = len(tokenizer.encode(" " + " ".join(FILLER_SENTENCES))) / len(FILLER_SENTENCES)
    guess = int((context_tokens - minimum) / per_sentence)
    n = _largest_fitting(lambda m: len(ids(m)) <= context_tokens, guess)
    prompt = np.asarray(ids(n), dtype=np.int32)
    return PasskeyExample(prompt_ids=prompt, passkey=passkey, depth=depth, context_tokens=int(context_tokens))


def passkey_is_correct(generated_text: str, passkey: str) -> bool:
    """True when ``passkey`` appears in ``generated_text`` as a whole number (not inside more digits)."""
    _check_passkey(passkey)
    return re.search(rf"(?<!\d){re.escape(passkey)}(?!\d)", generated_text) is not None


def _answer_ids(tokenizer: Tokenizer, passkey: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(" " + passkey), dtype=np.int32)


def make_passkey_training_example(tokenizer: Tokenizer, *, seq_len: int, context_tokens: int, depth: float, passkey: str) -> dict[str, np.ndarray]:
    """A fine-tuning example: the prompt followed by the answer " {passkey}", padded with EOS.

    Returns the batch-row dict of the pipelines (``inputs``, ``targets``, ``segment_ids``,
    ``loss_mask``, ``is_continuation``) with shapes ``(seq_len,)``. ``loss_mask`` is 1 only on targets
    that are answer tokens containing a digit (the answer's separating space, a separate token for the
    byte tokenizer, and the EOS padding are masked). Needs ``context_tokens + len(answer) <= seq_len + 1``.
    """
    answer = _answer_ids(tokenizer, passkey)
    if context_tokens + len(answer) > seq_len + 1:
        raise ValueError(f"context_tokens={context_tokens} plus {len(answer)} answer tokens exceed seq_len+1={seq_len + 1}")
    example = make_passkey_example(tokenizer, context_tokens, depth, np.random.default_rng(0), passkey=passkey)
    prompt_len = len(example.prompt_ids)
    sequence = np.full((seq_len + 1,), tokenizer.eos_id, dtype=np.int32)
    sequence[:prompt_len] = example.prompt_ids
    sequence[prompt_len : prompt_len + len(answer)] = answer
    is_digit = np.array([any(c.isdigit() for c in tokenizer.decode([int(t)])) for t in answer], dtype=np.float32)
    loss_mask = np.zeros((seq_len,), np.float32)
    # targets[t] = sequence[t + 1], so answer token j (at prompt_len + j) is the target at t = prompt_len + j - 1.
    loss_mask[prompt_len - 1 : prompt_len - 1 + len(answer)] = is_digit
    return {
        "inputs": sequence[:-1].copy(),
        "targets": sequence[1:].copy(),
        "segment_ids": np.zeros((seq_len,), np.int32),
        "loss_mask": loss_mask,
        "is_continuation": np.zeros((), np.int32),
    }


class _PasskeySource:
    """Element ``i``: a training example drawn with ``np.random.default_rng([seed, i])``."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        seed: int,
        min_context_tokens: int,
        max_context_tokens: int,
        num_examples: int | None,
    ) -> None:
        self._tokenizer = tokenizer
        self._seq_len = seq_len
        self._seed = seed
        self._min = min_context_tokens
        self._max = max_context_tokens
        self._len = sys.maxsize if num_examples is None else num_examples

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"example index {index} out of range [0, {self._len})")
        rng = np.random.default_rng([self._seed, index])
        passkey = random_passkey(rng)
        answer_len = len(_answer_ids(self._tokenizer, passkey))
        shortest = len(self._tokenizer.encode(build_passkey_prompt(0, 0.0, passkey)))
        low = max(self._min, shortest)
        high = min(self._max, self._seq_len + 1 - answer_len)
        if high < low:
            raise ValueError(f"seq_len={self._seq_len} cannot hold a passkey prompt of >= {low} tokens plus {answer_len} answer tokens")
        context_tokens = int(rng.integers(low, high + 1))
        depth = float(rng.uniform(0.0, 1.0))
        return make_passkey_training_example(self._tokenizer, seq_len=self._seq_len, context_tokens=context_tokens, depth=depth, passkey=passkey)


def make_passkey_map_dataset(
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    min_context_tokens: int = 0,
    max_context_tokens: int | None = None,
    num_examples: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """Batched MapDataset of passkey fine-tuning examples with random lengths and depths.

    Example ``i`` draws its passkey, its prompt length (uniform in ``[min_context_tokens,
    max_context_tokens]``, clipped to what fits in ``seq_len + 1`` with the answer and to the shortest
    possible prompt) and its depth (uniform in [0, 1]) from ``default_rng([seed, i])``, so the data does
    not depend on sharding or on iteration order. ``num_examples=None`` gives an endless dataset.
    Shard ``s`` of ``shard_count`` reads examples ``s, s + shard_count, ...``.
    """
    validate_common_args(seq_len=seq_len, batch_size=batch_size, shard_index=shard_index, shard_count=shard_count, num_epochs=None)
    if max_context_tokens is None:
        max_context_tokens = seq_len + 1
    if min_context_tokens < 0 or max_context_tokens < min_context_tokens:
        raise ValueError(f"need 0 <= min_context_tokens <= max_context_tokens; got {min_context_tokens}, {max_context_tokens}")
    if num_examples is not None and num_examples // shard_count < batch_size:
        raise ValueError(f"num_examples={num_examples} gives fewer than batch_size={batch_size} examples per shard (shard_count={shard_count})")
    source = _PasskeySource(
        tokenizer,
        seq_len=seq_len,
        seed=seed,
        min_context_tokens=min_context_tokens,
        max_context_tokens=max_context_tokens,
        num_examples=num_examples,
    )
    source[0]  # Fails early, with a clear message, if seq_len cannot hold any example.
    per_shard = len(source) // shard_count
    ds = grain.MapDataset.source(source)[shard_index : per_shard * shard_count : shard_count]
    return ds.batch(batch_size, drop_remainder=True)


def make_passkey_dataset(
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    min_context_tokens: int = 0,
    max_context_tokens: int | None = None,
    num_examples: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
) -> grain.IterDataset:
    """:func:`make_passkey_map_dataset` as a resumable ``grain.IterDataset`` of dict batches."""
    ds = make_passkey_map_dataset(
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        min_context_tokens=min_context_tokens,
        max_context_tokens=max_context_tokens,
        num_examples=num_examples,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    return to_iter_dataset(ds, num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
