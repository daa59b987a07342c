"""Data for ssm-jax: tokenizers, bundled corpora, grain training pipelines, the passkey task and a
tensorflow-datasets builder for local long-document corpora.

Modules (one job each):

* :mod:`ssm_jax.data.tokenization`: ``ByteTokenizer``, ``NeoXTokenizer``, ``get_tokenizer``;
* :mod:`ssm_jax.data.corpora`: ``Document``, ``load_corpus``, ``split_documents``, ``unigram_entropy_bits``;
* :mod:`ssm_jax.data.pipeline`: ``make_dataset`` (packed / concat / stream modes), ``make_token_dataset`` (the
  same over token arrays), ``iterate_documents_tokens``;
* :mod:`ssm_jax.data.token_shards`: ``TokenCorpus`` (tokenised corpora in ArrayRecord shards), ``write_subset``;
* :mod:`ssm_jax.data.linux_corpus`: builds the Linux-kernel token corpus (``python -m ssm_jax.data.linux_corpus``);
* :mod:`ssm_jax.data.passkey`: passkey prompts, scoring and fine-tuning data;
* :mod:`ssm_jax.data.tfds_builder`: ``build_local_corpus``, ``load_local_corpus``, ``local_corpus_source``
  (imported on first use, because importing tensorflow-datasets takes about a second).
"""

from __future__ import annotations

import importlib
from typing import Any

from ssm_jax.data.corpora import (
    CORPUS_NAMES,
    Document,
    load_corpus,
    split_documents,
    strip_gutenberg_boilerplate,
    unigram_entropy_bits,
    unigram_entropy_bits_of_tokens,
)
from ssm_jax.data.passkey import (
    PasskeyExample,
    build_passkey_prompt,
    make_passkey_dataset,
    make_passkey_example,
    make_passkey_map_dataset,
    make_passkey_training_example,
    passkey_is_correct,
    passkey_length_tolerance,
    random_passkey,
)
from ssm_jax.data.pipeline import (
    MODES,
    concatenate_documents,
    iterate_documents_tokens,
    make_dataset,
    make_map_dataset,
    make_token_dataset,
    make_token_map_dataset,
)
from ssm_jax.data.token_shards import CorpusFormatError, TokenCorpus, TokenDocument
from ssm_jax.data.tokenization import (
    TOKENIZER_NAMES,
    ByteTokenizer,
    NeoXTokenizer,
    Tokenizer,
    get_tokenizer,
)

_LAZY = {
    "LocalTextCorpus": "ssm_jax.data.tfds_builder",
    "build_local_corpus": "ssm_jax.data.tfds_builder",
    "load_local_corpus": "ssm_jax.data.tfds_builder",
    "local_corpus_source": "ssm_jax.data.tfds_builder",
}

__all__ = [
    "ByteTokenizer",
    "CORPUS_NAMES",
    "CorpusFormatError",
    "Document",
    "MODES",
    "NeoXTokenizer",
    "PasskeyExample",
    "TOKENIZER_NAMES",
    "TokenCorpus",
    "TokenDocument",
    "Tokenizer",
    "build_passkey_prompt",
    "concatenate_documents",
    "get_tokenizer",
    "iterate_documents_tokens",
    "load_corpus",
    "make_dataset",
    "make_map_dataset",
    "make_token_dataset",
    "make_token_map_dataset",
    "make_passkey_dataset",
    "make_passkey_example",
    "make_passkey_map_dataset",
    "make_passkey_training_example",
    "passkey_is_correct",
    "passkey_length_tolerance",
    "random_passkey",
    "split_documents",
    "strip_gutenberg_boilerplate",
    "unigram_entropy_bits",
    "unigram_entropy_bits_of_tokens",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Imports the tfds builder names on first access."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ssm_jax.data' has no attribute {name!r}")
