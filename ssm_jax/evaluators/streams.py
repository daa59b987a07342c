"""Token streams of unbounded length for evaluation: held-out documents, and the paper's newlines prompt.

* ``documents``: the held-out documents of a corpus (the same split as training), each followed by EOS,
  in a seeded random order per prompt row; when the held-out text is shorter than the prompt it is
  repeated in a fresh order. Streaming far past the training length needs long prompts, and whole
  documents keep each document's own long-range structure.
* ``newlines``: the tokens of ``"\\n"`` repeated, the paper's stress prompt for state collapse.

A stream hands out consecutive pieces of each row (:meth:`take`), so a prompt of a million tokens is
never held in memory at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np

__all__ = ["SOURCES", "HeldOutData", "resolve_data", "heldout_documents", "DocumentStream", "RepeatStream",
           "make_stream"]

SOURCES = ("documents", "newlines")


@dataclasses.dataclass(frozen=True)
class HeldOutData:
    """Where the held-out documents come from: a corpus split as in training (see ``ssm_jax.data``)."""

    corpus: str = "shakespeare"  # a bundled corpus, or "local" (prepared with build_local_corpus)
    validation_fraction: float = 0.1  # 0: every document of a bundled corpus
    split_seed: int = 0
    local_data_dir: str = ""
    local_name: str = "default"


def resolve_data(config: Any, trained_on: Mapping[str, Any]) -> HeldOutData:
    """The held-out data: ``config.data`` fields where set ("" / -1: unset), else the training config's."""

    def pick(name: str, unset: Any, default: Any) -> Any:
        value = config.get(name, unset)
        return trained_on.get(name, default) if value == unset else value

    return HeldOutData(
        corpus=str(pick("corpus", "", "shakespeare")),
        validation_fraction=float(pick("validation_fraction", -1.0, 0.1)),
        split_seed=int(pick("split_seed", -1, 0)),
        local_data_dir=str(pick("local_data_dir", "", "")),
        local_name=str(pick("local_name", "", "default")),
    )


def heldout_documents(data: HeldOutData) -> List[Any]:
    """The validation documents of a bundled corpus split as in training (all documents when the fraction
    is 0), or the ``validation`` split of a local corpus."""
    from ssm_jax.data import load_corpus, split_documents

    if data.corpus == "local":
        from ssm_jax.data import load_local_corpus

        return load_local_corpus(data.local_data_dir, "validation", data.local_name or "default")
    docs = load_corpus(data.corpus)
    if data.validation_fraction <= 0:
        return docs
    return split_documents(docs, data.validation_fraction, data.split_seed)[1]


class DocumentStream:
    """Endless rows of documents (each followed by EOS) in a seeded random order per row and pass."""

    def __init__(self, doc_tokens: Sequence[np.ndarray], eos_id: int, num_rows: int, seed: int):
        self._docs = [np.asarray(d, np.int32) for d in doc_tokens if len(d)]
        if not self._docs:
            raise ValueError("DocumentStream needs at least one non-empty document (the held-out split is empty)")
        self._eos = np.array([eos_id], np.int32)
        self._rngs = [np.random.default_rng([seed, row]) for row in range(num_rows)]
        self._buffers = [np.zeros((0,), np.int32) for _ in range(num_rows)]
        self._orders: List[List[int]] = [[] for _ in range(num_rows)]

    def _next_doc(self, row: int) -> np.ndarray:
        if not self._orders[row]:
            self._orders[row] = list(self._rngs[row].permutation(len(self._docs)))
        return np.concatenate([self._docs[self._orders[row].pop(0)], self._eos])

    def take(self, rows: Sequence[int], n: int) -> np.ndarray:
        """The next ``n`` tokens of each row in ``rows``: ``(len(rows), n)`` int32."""
        out = np.empty((len(rows), n), np.int32)
        for i, row in enumerate(rows):
            pieces, have = [self._buffers[row]], len(self._buffers[row])
            while have < n:
                doc = self._next_doc(row)
                pieces.append(doc)
                have += len(doc)
            buf = np.concatenate(pieces)
            out[i] = buf[:n]
            self._buffers[row] = buf[n:]
        return out


class RepeatStream:
    """The same token pattern repeated forever in every row (the ``newlines`` prompt)."""

    def __init__(self, pattern: Sequence[int]):
        self._pattern = np.asarray(pattern, np.int32)
        if self._pattern.size == 0:
            raise ValueError("RepeatStream needs a non-empty pattern")
        self._offset: Dict[int, int] = {}

    def take(self, rows: Sequence[int], n: int) -> np.ndarray:
        """The next ``n`` tokens of each row in ``rows``: ``(len(rows), n)`` int32."""
        out = np.empty((len(rows), n), np.int32)
        k = self._pattern.size
        for i, row in enumerate(rows):
            start = self._offset.get(row, 0)
            out[i] = self._pattern[(start + np.arange(n)) % k]
            self._offset[row] = (start + n) % k
        return out


def make_stream(source: str, tokenizer: Any, data: HeldOutData, *, num_rows: int,
                seed: int) -> Union[DocumentStream, RepeatStream]:
    """A token stream for ``source`` (one of :data:`SOURCES`) with ``num_rows`` rows."""
    if source == "documents":
        from ssm_jax.data import iterate_documents_tokens

        docs = heldout_documents(data)
        return DocumentStream(iterate_documents_tokens(docs, tokenizer), tokenizer.eos_id, num_rows, seed)
    if source == "newlines":
        return RepeatStream(tokenizer.encode("\n"))
    raise ValueError(f"unknown source {source!r}; accepted: {', '.join(SOURCES)}")
