"""Tokenizers used by ssm-jax: a byte-level tokenizer and the GPT-NeoX-20B BPE tokenizer.

Both expose the same small interface (:class:`Tokenizer`) so that the pipelines, the passkey task and
the evaluation code never care which one they hold:

* ``name``: a short stable string (used as a cache key for tokenised corpora);
* ``vocab_size``: number of ids, every id is in ``[0, vocab_size)``;
* ``eos_id``: the end-of-document id appended after every document in the pipelines;
* ``encode(text) -> list[int]`` and ``encode_batch(texts) -> list[list[int]]``;
* ``decode(ids) -> str`` which drops special ids (EOS, padding) so decoded text is plain text.

The GPT-NeoX-20B tokenizer is the one the public Mamba-2 checkpoints were trained with (50,277 ids,
``<|endoftext|>`` = 0). Its definition ships with this package as ``gpt_neox_20b_tokenizer.json``
(see ``LICENSE_gpt_neox_20b_tokenizer.txt`` for its origin), so nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Iterable, Protocol, Sequence, runtime_checkable

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "NeoXTokenizer",
    "TOKENIZER_NAMES",
    "get_tokenizer",
]

NEOX_TOKENIZER_FILE = pathlib.Path(__file__).with_name("gpt_neox_20b_tokenizer.json")
NEOX_VOCAB_SIZE = 50277
NEOX_EOS_TOKEN = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """The interface every ssm-jax tokenizer provides."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Maps text to token ids (no EOS is added)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several texts; equal to ``[encode(t) for t in texts]``, possibly faster."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Maps ids back to text, dropping special ids such as EOS."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS (``vocab_size`` 257).

    Lossless for any text, needs no vocabulary file, and makes tests independent of BPE details.
    """

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of ``text`` as ints in ``[0, 256)``."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes each text independently."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes bytes as UTF-8 (invalid sequences become U+FFFD); ids >= 256 (EOS) are skipped."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class NeoXTokenizer:
    """The GPT-NeoX-20B byte-level BPE tokenizer (vocab 50,277; ``<|endoftext|>`` = 0 is EOS).

    Loaded with the Hugging Face ``tokenizers`` library from the JSON file bundled with ssm-jax.
    ``encode`` adds no special tokens; note that the literal string ``<|endoftext|>`` in the input
    text is recognised as the special token (id 0), as in the original tokenizer.
    """

    name = "neox"
    vocab_size = NEOX_VOCAB_SIZE

    def __init__(self, path: str | pathlib.Path = NEOX_TOKENIZER_FILE) -> None:
        import tokenizers  # Imported here so that the byte tokenizer works without it.

        self._tok = tokenizers.Tokenizer.from_file(str(path))
        size = self._tok.get_vocab_size(with_added_tokens=True)
        if size != NEOX_VOCAB_SIZE:
            raise ValueError(f"tokenizer file {path} has {size} ids; the GPT-NeoX-20B tokenizer has {NEOX_VOCAB_SIZE}")
        eos = self._tok.token_to_id(NEOX_EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer file {path} lacks the EOS token {NEOX_EOS_TOKEN!r}")
        self.eos_id: int = eos

    def encode(self, text: str) -> list[int]:
        """Returns the BPE ids of ``text`` (no BOS/EOS added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several texts in parallel (Rust threads inside ``tokenizers``)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, skipping special tokens (EOS and padding)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return "NeoXTokenizer()"


TOKENIZER_NAMES: tuple[str, ...] = ("byte", "neox")


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer called ``name`` ("byte" or "neox"); instances are shared (stateless)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "neox":
        return NeoXTokenizer()
    raise ValueError(f"unknown tokenizer name={name!r}; accepted names: {', '.join(TOKENIZER_NAMES)}")
