"""grain input pipelines for language-model training on documents: packed, concat and stream modes.

Every pipeline yields dict batches of numpy arrays with fixed shapes (``B`` = batch size, ``L`` =
``seq_len``)::

    inputs          (B, L) int32    tokens fed to the model
    targets         (B, L) int32    the next tokens: targets[b, t] is the token after inputs[b, t]
    segment_ids     (B, L) int32    the model resets its state where the id changes along t
    loss_mask       (B, L) float32  1 where the target counts in the loss
    is_continuation (B,)   int32    1 if row b continues row b of the previous batch (stream mode)

Tokens. Each document is tokenised once (cached per process, see :func:`iterate_documents_tokens`),
followed by one EOS, and the documents are concatenated. A window is ``L + 1`` consecutive tokens,
``inputs = window[:-1]`` and ``targets = window[1:]``; consecutive windows start ``L`` tokens apart
(they share one boundary token), so every token after the first is a target exactly once per epoch.

Modes:

* ``"packed"``: with ``shuffle`` the windows come in a seeded random order, a new one each epoch
  (incomplete final batches are dropped); ``segment_ids`` start at 0 in each row and increase by
  one at every position whose input is the first token of a new document (i.e. right after an EOS
  input), so a model honouring ``segment_ids`` carries no state across documents. ``loss_mask`` is 1
  everywhere: the position whose input is the EOS predicts the first token of the next document; that
  target is still predicted from within the old segment, exactly like the first token of any
  document after an EOS, so we keep it rather than drop one target per document.
* ``"concat"``: the same windows with ``segment_ids`` all zero: the model reads across documents
  (joined only by EOS), for long-context training.
* ``"stream"``: for truncated back-propagation through time. All documents are concatenated (with
  EOS) in a seeded order per epoch and cut into ``shard_count * batch_size`` consecutive streams of
  ``steps * L + 1`` tokens (neighbouring streams share their boundary token; the remainder, less than
  one window per stream, is dropped); this shard reads streams ``shard_index * B`` to
  ``shard_index * B + B - 1``. Batch ``k`` of an epoch holds, in row ``b``, the ``k``-th consecutive
  window of stream ``b``, so row ``b`` of batch ``k + 1`` continues exactly where row ``b`` of batch
  ``k`` ended (``inputs[k+1][b, 0] == targets[k][b, -1]``) and the model may carry row ``b``'s final
  state into batch ``k + 1``.
  ``is_continuation`` is 0 for the first batch of each epoch (the carried state must be reset to zero)
  and 1 otherwise. ``segment_ids`` are zero (the stream is read across documents), ``shuffle`` only
  changes the document order, batches are never reordered.

Sharding gives each process a disjoint part of the data (a strided slice of the windows, or its own
streams) with the same number of batches on every process. Resuming is exact: the iterator's
``get_state()`` / ``set_state()`` (grain) restore the position, and all randomness is a function of
``seed``, the epoch and the element index.
"""

from __future__ import annotations

import collections
import hashlib
import sys
import threading
from typing import Sequence

import grain
import numpy as np

from ssm_jax.data.corpora import Document
from ssm_jax.data.tokenization import Tokenizer

__all__ = [
    "MODES",
    "iterate_documents_tokens",
    "concatenate_documents",
    "make_map_dataset",
    "make_token_map_dataset",
    "make_dataset",
    "make_token_dataset",
    "to_iter_dataset",
    "validate_common_args",
]

MODES: tuple[str, ...] = ("packed", "concat", "stream")

_CACHE_SIZE = 8
_token_cache: "collections.OrderedDict[tuple[str, str], tuple[np.ndarray, ...]]" = collections.OrderedDict()
_cache_lock = threading.Lock()


def _docs_fingerprint(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        for part in (d.doc_id, d.text):
            data = part.encode("utf-8", errors="surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def iterate_documents_tokens(docs: Sequence[Document], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Returns one read-only int32 token array per document (no EOS), e.g. for long-context evaluation.

    Results are cached per process (keyed by the tokenizer's ``name`` and a hash of the documents) so
    that building several pipelines over the same corpus tokenises it once.
    """
    docs = list(docs)
    name = getattr(tokenizer, "name", None)
    key = (name, _docs_fingerprint(docs)) if name else None
    if key is not None:
        with _cache_lock:
            if key in _token_cache:
                _token_cache.move_to_end(key)
                return list(_token_cache[key])
    arrays = []
    for ids in tokenizer.encode_batch([d.text for d in docs]):
        arr = np.asarray(ids, dtype=np.int32)
        arr.setflags(write=False)
        arrays.append(arr)
    if key is not None:
        with _cache_lock:
            _token_cache[key] = tuple(arrays)
            while len(_token_cache) > _CACHE_SIZE:
                _token_cache.popitem(last=False)
    return arrays


def concatenate_documents(doc_tokens: Sequence[np.ndarray], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Joins token arrays, each followed by ``eos_id``.

    Returns ``(tokens, is_doc_start)``: the int32 token stream and a bool array of the same length
    that is True at the first token of every document.
    """
    pieces: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.int32)
    for arr in doc_tokens:
        pieces.append(np.asarray(arr, dtype=np.int32))
        pieces.append(eos)
    tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    is_doc_start = np.zeros(tokens.shape, dtype=bool)
    offsets = np.cumsum([0] + [len(a) + 1 for a in doc_tokens[:-1]]) if len(doc_tokens) else []
    is_doc_start[np.asarray(offsets, dtype=np.int64)] = True
    return tokens, is_doc_start


class _WindowSource:
    """Random-access source of the ``(len(tokens) - 1) // seq_len`` windows (packed/concat modes)."""

    def __init__(self, tokens: np.ndarray, is_doc_start: np.ndarray, seq_len: int, packed: bool) -> None:
        self._tokens = tokens
        self._is_doc_start = is_doc_start
        self._seq_len = seq_len
        self._packed = packed
        self._len = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window index {index} out of range [0, {self._len})")
        L = self._seq_len
        start = index * L
        window = self._tokens[start : start + L + 1]
        if self._packed:
            new_doc = self._is_doc_start[start + 1 : start + L].astype(np.int32)
            segment_ids = np.concatenate([np.zeros((1,), np.int32), np.cumsum(new_doc, dtype=np.int32)])
        else:
            segment_ids = np.zeros((L,), np.int32)
        return {
            "inputs": window[:-1].copy(),
            "targets": window[1:].copy(),
            "segment_ids": segment_ids,
            "loss_mask": np.ones((L,), np.float32),
            "is_continuation": np.zeros((), np.int32),
        }


class _StreamSource:
    """Random-access source of whole batches for stream mode (element ``k`` = batch ``k``)."""

    def __init__(
        self,
        doc_tokens: Sequence[np.ndarray],
        eos_id: int,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool,
        num_epochs: int | None,
        shard_index: int,
        shard_count: int,
    ) -> None:
        self._docs = tuple(doc_tokens)
        self._eos_id = eos_id
        self._seq_len = seq_len
        self._batch_size = batch_size
        self._seed = seed
        self._shuffle = shuffle
        self._shard_index = shard_index
        self._num_streams = batch_size * shard_count
        total = sum(len(a) + 1 for a in self._docs)
        self.steps_per_epoch = max(0, (total - 1) // (self._num_streams * seq_len))
        # Stream g holds tokens [g * span, (g + 1) * span] (span + 1 tokens): consecutive streams share
        # one boundary token, so every token of the used prefix is a target exactly once.
        self.span = self.steps_per_epoch * seq_len
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"stream mode: {total} tokens are fewer than batch_size*shard_count*seq_len+1="
                f"{self._num_streams * seq_len + 1}, needed for one window per stream "
                f"(batch_size={batch_size}, shard_count={shard_count}, seq_len={seq_len}); "
                "use more documents or a smaller seq_len, batch_size or shard_count"
            )
        self._len = sys.maxsize if num_epochs is None else self.steps_per_epoch * num_epochs
        self._layouts: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def document_order(self, epoch: int) -> np.ndarray:
        """The order in which documents are concatenated in ``epoch``."""
        if not self._shuffle:
            return np.arange(len(self._docs))
        return np.random.default_rng([self._seed, epoch]).permutation(len(self._docs))

    def streams(self, epoch: int) -> np.ndarray:
        """This shard's streams in ``epoch``: int32 ``(batch_size, span + 1)``."""
        key = 0 if not self._shuffle else epoch
        with self._lock:
            if key in self._layouts:
                self._layouts.move_to_end(key)
                return self._layouts[key]
        order = self.document_order(epoch)
        tokens, _ = concatenate_documents([self._docs[i] for i in order], self._eos_id)
        first = self._shard_index * self._batch_size
        starts = (first + np.arange(self._batch_size)) * self.span
        mine = tokens[starts[:, None] + np.arange(self.span + 1)[None, :]]
        mine.setflags(write=False)
        with self._lock:
            self._layouts[key] = mine
            while len(self._layouts) > 2:
                self._layouts.popitem(last=False)
        return mine

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"batch index {index} out of range [0, {self._len})")
        epoch, step = divmod(index, self.steps_per_epoch)
        L, B = self._seq_len, self._batch_size
        window = self.streams(epoch)[:, step * L : step * L + L + 1]
        return {
            "inputs": window[:, :-1].copy(),
            "targets": window[:, 1:].copy(),
            "segment_ids": np.zeros((B, L), np.int32),
            "loss_mask": np.ones((B, L), np.float32),
            "is_continuation": np.full((B,), int(step > 0), np.int32),
        }


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def validate_common_args(*, seq_len: int, batch_size: int, shard_index: int, shard_count: int, num_epochs: int | None) -> None:
    """Raises ValueError naming the first invalid argument shared by all pipeline builders."""
    _check_int("seq_len", seq_len, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("shard_count", shard_count, 1)
    _check_int("shard_index", shard_index, 0)
    if shard_index >= shard_count:
        raise ValueError(f"shard_index={shard_index} must be < shard_count={shard_count}")
    if num_epochs is not None:
        _check_int("num_epochs", num_epochs, 1)


def make_map_dataset(docs: Sequence[Document], tokenizer: Tokenizer, **kwargs) -> grain.MapDataset:
    """Builds the batched ``grain.MapDataset`` of one process (see the module docstring for modes).

    The documents are tokenised (cached, :func:`iterate_documents_tokens`) and passed with ``kwargs``
    (``mode``, ``seq_len``, ``batch_size``, ``seed``, ``shuffle``, ``num_epochs``, ``shard_index``,
    ``shard_count``) to :func:`make_token_map_dataset`, which documents them.
    """
    docs = list(docs)
    if not docs:
        raise ValueError("docs is empty; need at least one document")
    return make_token_map_dataset(iterate_documents_tokens(docs, tokenizer), tokenizer.eos_id, **kwargs)


def make_token_map_dataset(
    doc_tokens: Sequence[np.ndarray],
    eos_id: int,
    *,
    mode: str,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.MapDataset:
    """The batched ``grain.MapDataset`` of one process over already tokenised documents (no EOS in them),
    e.g. a :class:`ssm_jax.data.token_shards.TokenCorpus` split.

    ``num_epochs=None`` repeats forever. With a finite ``num_epochs``, ``len(result)`` is the number of
    batches; incomplete final batches are dropped. Raises ValueError for invalid arguments or when
    the documents hold too few tokens for one batch on this shard.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of the accepted modes: {', '.join(MODES)}")
    validate_common_args(
        seq_len=seq_len,
        batch_size=batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
    )
    doc_tokens = list(doc_tokens)
    if not doc_tokens:
        raise ValueError("doc_tokens is empty; need at least one document")

    if mode == "stream":
        source = _StreamSource(
            doc_tokens,
            eos_id,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            shard_index=shard_index,
            shard_count=shard_count,
        )
        return grain.MapDataset.source(source)

    tokens, is_doc_start = concatenate_documents(doc_tokens, eos_id)
    windows = _WindowSource(tokens, is_doc_start, seq_len, packed=(mode == "packed"))
    per_shard = len(windows) // shard_count
    if per_shard < batch_size:
        raise ValueError(
            f"{mode} mode: {len(tokens)} tokens give {len(windows)} windows of seq_len+1={seq_len + 1} "
            f"tokens, {per_shard} per shard for shard_count={shard_count}, fewer than "
            f"batch_size={batch_size}; use more documents or a smaller seq_len, batch_size or shard_count"
        )
    ds = grain.MapDataset.source(windows)
    ds = ds[shard_index : per_shard * shard_count : shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.batch(batch_size, drop_remainder=True)


def make_dataset(
    docs: Sequence[Document],
    tokenizer: Tokenizer,
    *,
    mode: str,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int = 0,
    shard_count: int = 1,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
) -> grain.IterDataset:
    """Builds the training pipeline as a ``grain.IterDataset`` of dict batches.

    ``iter(result)`` gives an iterator with ``get_state()`` / ``set_state(state)`` for exact resume.
    ``num_threads`` and ``prefetch_buffer_size`` (in batches) control grain's background reading.
    See :func:`make_map_dataset` for the other arguments.
    """
    ds = make_map_dataset(
        docs,
        tokenizer,
        mode=mode,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    return to_iter_dataset(ds, num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)


def make_token_dataset(
    doc_tokens: Sequence[np.ndarray],
    eos_id: int,
    *,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
    **kwargs,
) -> grain.IterDataset:
    """:func:`make_token_map_dataset` as a ``grain.IterDataset`` (see :func:`make_dataset`)."""
    ds = make_token_map_dataset(doc_tokens, eos_id, **kwargs)
    return to_iter_dataset(ds, num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)


def to_iter_dataset(ds: grain.MapDataset, *, num_threads: int = 2, prefetch_buffer_size: int = 8) -> grain.IterDataset:
    """Converts a batched MapDataset to an IterDataset with modest background prefetching."""
    _check_int("num_threads", num_threads, 0)
    _check_int("prefetch_buffer_size", prefetch_buffer_size, 0)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
