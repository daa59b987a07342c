"""Token streams of unbounded length for evaluation: held-out documents, other corpora, the newlines prompt.

* ``documents``: the held-out documents of the corpus the model trained on (the same split as training),
  each followed by EOS. For a token corpus whose held-out split is grouped (``python -m
  ssm_jax.data.linux_corpus`` groups the files of each held-out directory), prompt row ``r`` reads group
  ``r mod G`` from its first document on: one long coherent stream per directory, as the paper streams
  long documents. Otherwise each row reads the documents in a seeded random order, repeated in a fresh
  order when the held-out text is shorter than the prompt.
* ``shakespeare``, ``kjv``: every document of a bundled natural-language corpus, tokenised with the model's
  tokenizer, in a seeded random order per row: held-out text of another kind for models trained on
  something else (for the default model, which trains on Shakespeare, that source includes its training
  documents).
* ``newlines``: the tokens of ``"\\n"`` repeated, the paper's stress prompt for state collapse.

A stream hands out consecutive pieces of each row (:meth:`take`), so a prompt of a million tokens is
never held in memory at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "SOURCES",
    "HeldOutData",
    "resolve_data",
    "heldout_documents",
    "heldout_token_documents",
    "source_token_documents",
    "token_corpus",
    "group_stream_tokens",
    "DocumentStream",
    "GroupStream",
    "RepeatStream",
    "make_stream",
]

SOURCES = ("documents", "newlines", "shakespeare", "kjv")
BUNDLED_SOURCES = ("shakespeare", "kjv")  # sources that are a whole bundled corpus


@dataclasses.dataclass(frozen=True)
class HeldOutData:
    """Where the held-out documents come from: a corpus split as in training (see ``ssm_jax.data``)."""

    corpus: str = "shakespeare"  # a bundled corpus, "local" (build_local_corpus) or "tokens" (a token corpus)
    validation_fraction: float = 0.1  # 0: every document of a bundled corpus
    split_seed: int = 0
    local_data_dir: str = ""
    local_name: str = "default"
    tokens_dir: str = ""  # the token corpus directory (manifest.json) of corpus="tokens"


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
        tokens_dir=str(pick("tokens_dir", "", "")),
    )


def heldout_documents(data: HeldOutData) -> List[Any]:
    """The validation documents (text) of a bundled corpus split as in training (all documents when the
    fraction is 0), or the ``validation`` split of a local corpus. A token corpus has no text: see
    :func:`heldout_token_documents`."""
    from ssm_jax.data import load_corpus, split_documents

    if data.corpus == "tokens":
        raise ValueError(f"corpus 'tokens' ({data.tokens_dir}) holds token ids, not text: use heldout_token_documents")
    if data.corpus == "local":
        from ssm_jax.data import load_local_corpus

        return load_local_corpus(data.local_data_dir, "validation", data.local_name or "default")
    docs = load_corpus(data.corpus)
    if data.validation_fraction <= 0:
        return docs
    return split_documents(docs, data.validation_fraction, data.split_seed)[1]


def token_corpus(data: HeldOutData, tokenizer: Any) -> Any:
    """The token corpus of ``data`` (a :class:`ssm_jax.data.TokenCorpus`), checked against the model's
    tokenizer and for a ``validation`` split."""
    from ssm_jax.data import TokenCorpus

    corpus = TokenCorpus(data.tokens_dir)
    if corpus.tokenizer["vocab_size"] != tokenizer.vocab_size or corpus.tokenizer["eos_id"] != tokenizer.eos_id:
        raise ValueError(
            f"data.tokens_dir={data.tokens_dir!r} was tokenised with {corpus.tokenizer}, which is not the "
            f"model's tokenizer (vocab_size {tokenizer.vocab_size}, eos_id {tokenizer.eos_id})"
        )
    if "validation" not in corpus.splits:
        raise ValueError(f"data.tokens_dir={data.tokens_dir!r} has no validation split (splits: {corpus.splits})")
    return corpus


def group_stream_tokens(corpus: Any) -> Union[int, None]:
    """The longest prompt a :class:`GroupStream` of ``corpus`` can give every row (the shortest held-out
    group, EOS included), or None when the corpus defines no held-out groups (rows never run out)."""
    runs = corpus.manifest.get("groups", {}).get("validation")
    return min(r["tokens"] + r["documents"] for r in runs) if runs else None


def heldout_token_documents(data: HeldOutData, tokenizer: Any) -> List[np.ndarray]:
    """The held-out documents of ``data`` as token arrays (no EOS), tokenised with ``tokenizer`` where they
    are text; a token corpus gives its ``validation`` split."""
    if data.corpus == "tokens":
        return [doc.tokens for doc in token_corpus(data, tokenizer).documents("validation")]
    from ssm_jax.data import iterate_documents_tokens

    return iterate_documents_tokens(heldout_documents(data), tokenizer)


def source_token_documents(source: str, tokenizer: Any, data: HeldOutData) -> List[np.ndarray]:
    """The documents a text source streams, as token arrays: the held-out documents for ``documents`` and
    ``newlines`` (whose unigram loss is the held-out text's), a whole bundled corpus otherwise."""
    if source in BUNDLED_SOURCES:
        from ssm_jax.data import iterate_documents_tokens, load_corpus

        return iterate_documents_tokens(load_corpus(source), tokenizer)
    if source in ("documents", "newlines"):
        return heldout_token_documents(data, tokenizer)
    raise ValueError(f"unknown source {source!r}; accepted: {', '.join(SOURCES)}")


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


class GroupStream:
    """Row ``r`` streams group ``r mod G``: its documents in stored order, each followed by EOS.

    A group is a long coherent text (the files of one held-out directory); a prompt that would read past
    the end of its group is an error naming the group, not a silent wrap into other text.
    """

    def __init__(self, groups: Sequence[Tuple[str, Sequence[np.ndarray]]], eos_id: int, num_rows: int):
        if not groups:
            raise ValueError("GroupStream needs at least one group")
        eos = np.array([eos_id], np.int32)
        self._names = [name for name, _ in groups]
        self._tokens = [
            np.concatenate([piece for doc in docs for piece in (np.asarray(doc, np.int32), eos)]) if docs else np.zeros((0,), np.int32)
            for _, docs in groups
        ]  # per group: (tokens,)
        self._offsets = [0] * num_rows

    def take(self, rows: Sequence[int], n: int) -> np.ndarray:
        """The next ``n`` tokens of each row in ``rows``: ``(len(rows), n)`` int32."""
        out = np.empty((len(rows), n), np.int32)
        for i, row in enumerate(rows):
            g = row % len(self._tokens)
            start = self._offsets[row]
            if start + n > self._tokens[g].size:
                raise ValueError(
                    f"prompt row {row} needs {start + n} tokens of held-out group {self._names[g]!r}, "
                    f"which holds {self._tokens[g].size} (EOS included); accepted: prompts of at most "
                    f"{min(t.size for t in self._tokens)} tokens on this corpus"
                )
            out[i] = self._tokens[g][start : start + n]
            self._offsets[row] = start + n
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


def make_stream(source: str, tokenizer: Any, data: HeldOutData, *, num_rows: int, seed: int) -> Union[DocumentStream, GroupStream, RepeatStream]:
    """A token stream for ``source`` (one of :data:`SOURCES`) with ``num_rows`` rows."""
    if source == "newlines":
        return RepeatStream(tokenizer.encode("\n"))
    if source == "documents" and data.corpus == "tokens":
        corpus = token_corpus(data, tokenizer)
        if corpus.manifest.get("groups", {}).get("validation"):
            groups = [(name, [d.tokens for d in docs]) for name, docs in corpus.groups("validation")]
            return GroupStream(groups, tokenizer.eos_id, num_rows)
    return DocumentStream(source_token_documents(source, tokenizer, data), tokenizer.eos_id, num_rows, seed)
