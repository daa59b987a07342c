"""Tokenised long-document corpora stored as ArrayRecord shards, read back through grain.

A corpus directory holds, per split, shards named ``<split>-<index>-of-<count>.array_record`` and one
``manifest.json``::

    manifest.json
    train-00000-of-00019.array_record
    ...
    validation-00000-of-00003.array_record

Each record is one document, in the order the writer received them::

    uint32 little-endian n | doc_id (n bytes of UTF-8) | tokens (little-endian ``token_dtype``)

The manifest states the format version, the tokenizer (name, vocabulary size, EOS id), the token dtype,
per split the shard files with their document and token counts, optional ``groups`` (named runs of
consecutive documents of one split, e.g. the files of one held-out directory that an evaluation streams
as one long prompt) and a free-form ``source`` record of where the text came from (package, version,
checksums, filters). Reading checks the manifest against the files and names the file at fault.

Tokenising a corpus of hundreds of millions of tokens takes minutes, so it is done once
(``ssm_jax.data.linux_corpus`` builds one) and training reads the token ids directly: the training
pipelines accept token arrays (:func:`ssm_jax.data.pipeline.make_token_dataset`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "FORMAT",
    "MANIFEST",
    "TokenDocument",
    "TokenShardWriter",
    "TokenCorpus",
    "CorpusFormatError",
    "write_manifest",
    "read_manifest",
    "encode_record",
    "decode_record",
    "write_subset",
]

FORMAT = "ssm_jax.token_shards/1"
MANIFEST = "manifest.json"
TOKEN_DTYPES = ("uint16", "uint32")
# ArrayRecord groups of one record: every document is read without decoding its neighbours.
COMPRESSIONS = ("zstd", "uncompressed")


class CorpusFormatError(ValueError):
    """A token corpus directory that does not match its manifest (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class TokenDocument:
    """One tokenised document: its identifier and its token ids (read-only int32 array, no EOS)."""

    doc_id: str
    tokens: np.ndarray


def encode_record(doc_id: str, tokens: np.ndarray, token_dtype: str) -> bytes:
    """The record bytes of one document (see the module docstring)."""
    name = doc_id.encode("utf-8")
    ids = np.asarray(tokens)
    if ids.ndim != 1:
        raise ValueError(f"tokens of {doc_id!r} must be 1-D, got shape {ids.shape}")
    limit = np.iinfo(np.dtype(token_dtype)).max
    if ids.size and (ids.min() < 0 or ids.max() > limit):
        raise ValueError(f"tokens of {doc_id!r} must lie in [0, {limit}] for token_dtype={token_dtype!r}")
    return struct.pack("<I", len(name)) + name + ids.astype(np.dtype(token_dtype).newbyteorder("<")).tobytes()


def decode_record(record: bytes, token_dtype: str) -> TokenDocument:
    """Inverse of :func:`encode_record`; the tokens come back as a read-only int32 array."""
    (n,) = struct.unpack_from("<I", record, 0)
    doc_id = record[4 : 4 + n].decode("utf-8")
    body = record[4 + n :]
    dtype = np.dtype(token_dtype).newbyteorder("<")
    if len(body) % dtype.itemsize:
        raise CorpusFormatError(f"record of {doc_id!r} holds {len(body)} token bytes, not a multiple of {dtype.itemsize}")
    tokens = np.frombuffer(body, dtype=dtype).astype(np.int32)
    tokens.setflags(write=False)
    return TokenDocument(doc_id=doc_id, tokens=tokens)


def _shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


class TokenShardWriter:
    """Writes the documents of one split into shards of about ``tokens_per_shard`` tokens.

    ``compression`` is ArrayRecord's per-record compression: ``"zstd"`` (the default, about 0.7 bytes per
    token on kernel source) or ``"uncompressed"`` (2 bytes per uint16 token; for files that are compressed
    as a whole afterwards, e.g. with xz for a transfer, which then does better than zstd per record).

    Shards are written under temporary names and renamed to ``<split>-i-of-n`` by :meth:`close`, which
    returns the split's manifest entry. Use as a context manager or call :meth:`close` yourself.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        split: str,
        *,
        token_dtype: str = "uint16",
        tokens_per_shard: int = 16 * 2**20,
        compression: str = "zstd",
    ) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype={token_dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        if not split or "-" in split or "/" in split:
            raise ValueError(f"split={split!r} must be a non-empty name without '-' or '/'")
        if tokens_per_shard < 1:
            raise ValueError(f"tokens_per_shard={tokens_per_shard!r} must be >= 1")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r} is not one of {', '.join(COMPRESSIONS)}")
        # Groups of one record: every document is read without decoding its neighbours.
        self._options = f"group_size:1,{compression}"
        self._writer_cls = ArrayRecordWriter
        self._dir = pathlib.Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._split = split
        self._dtype = token_dtype
        self._per_shard = tokens_per_shard
        self._shards: list[dict[str, Any]] = []  # {"tmp": path, "documents": n, "tokens": n}
        self._writer = None
        self._closed = False

    def _open_shard(self) -> None:
        tmp = self._dir / f".{self._split}-{len(self._shards):05d}.tmp"
        self._writer = self._writer_cls(os.fspath(tmp), self._options)
        self._shards.append({"tmp": tmp, "documents": 0, "tokens": 0})

    def add(self, doc_id: str, tokens: np.ndarray) -> None:
        """Appends one document (its tokens without EOS)."""
        if self._closed:
            raise RuntimeError("TokenShardWriter.add after close")
        if self._writer is None or self._shards[-1]["tokens"] >= self._per_shard:
            if self._writer is not None:
                self._writer.close()
            self._open_shard()
        self._writer.write(encode_record(doc_id, tokens, self._dtype))
        self._shards[-1]["documents"] += 1
        self._shards[-1]["tokens"] += int(np.asarray(tokens).size)

    def close(self) -> dict[str, Any]:
        """Finishes the shards and returns ``{"shards": [...], "documents": n, "tokens": n}``."""
        if not self._closed:
            if self._writer is not None:
                self._writer.close()
            self._closed = True
        count = len(self._shards)
        entries = []
        for i, shard in enumerate(self._shards):
            name = _shard_name(self._split, i, count)
            if shard["tmp"].exists():
                os.replace(shard["tmp"], self._dir / name)
            entries.append({"file": name, "documents": shard["documents"], "tokens": shard["tokens"]})
        return {"shards": entries, "documents": sum(e["documents"] for e in entries), "tokens": sum(e["tokens"] for e in entries)}

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_manifest(
    directory: str | os.PathLike[str],
    *,
    tokenizer: Mapping[str, Any],
    token_dtype: str,
    splits: Mapping[str, Mapping[str, Any]],
    source: Mapping[str, Any],
    groups: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> pathlib.Path:
    """Writes ``manifest.json`` atomically; ``groups[split]`` is a list of ``{"name", "documents", "tokens"}``
    runs of consecutive documents covering the split in order."""
    for key in ("name", "vocab_size", "eos_id"):
        if key not in tokenizer:
            raise ValueError(f"tokenizer must have a {key!r} entry, got {dict(tokenizer)}")
    manifest = {
        "format": FORMAT,
        "tokenizer": dict(tokenizer),
        "token_dtype": token_dtype,
        "splits": {k: dict(v) for k, v in splits.items()},
        "groups": {k: list(v) for k, v in (groups or {}).items()},
        "source": dict(source),
    }
    for split, runs in manifest["groups"].items():
        if split not in manifest["splits"]:
            raise ValueError(f"groups given for split {split!r}, which is not written")
        if sum(r["documents"] for r in runs) != manifest["splits"][split]["documents"]:
            raise ValueError(f"groups of split {split!r} do not cover its {manifest['splits'][split]['documents']} documents")
    path = pathlib.Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a corpus directory, checked for its format and for the shard files it names."""
    root = pathlib.Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no token corpus manifest here (build one with ssm_jax.data.linux_corpus)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusFormatError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT!r}")
    if manifest.get("token_dtype") not in TOKEN_DTYPES:
        raise CorpusFormatError(f"{path}: token_dtype {manifest.get('token_dtype')!r} is not one of {TOKEN_DTYPES}")
    for split, info in manifest.get("splits", {}).items():
        for shard in info.get("shards", []):
            if not (root / shard["file"]).is_file():
                raise CorpusFormatError(f"{root / shard['file']}: shard of split {split!r} named in {path} is missing")
    return manifest


class TokenCorpus:
    """Random access to the documents of a token corpus directory.

    ``corpus.source(split)`` is a grain-compatible source (``len`` and ``[i] -> TokenDocument``);
    :meth:`documents` reads a whole split, :meth:`groups` the named runs of documents of a split.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = pathlib.Path(directory)
        self.manifest = read_manifest(self.directory)
        self.token_dtype: str = self.manifest["token_dtype"]
        self.tokenizer: dict[str, Any] = self.manifest["tokenizer"]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def _split_info(self, split: str) -> dict[str, Any]:
        if split not in self.manifest["splits"]:
            raise ValueError(f"split={split!r} is not in {self.directory / MANIFEST}; available: {', '.join(self.splits)}")
        return self.manifest["splits"][split]

    def num_tokens(self, split: str) -> int:
        return int(self._split_info(split)["tokens"])

    def source(self, split: str) -> "_SplitSource":
        """The documents of ``split`` for random access (``grain.MapDataset.source(...)`` accepts it)."""
        import grain

        info = self._split_info(split)
        paths = [os.fspath(self.directory / s["file"]) for s in info["shards"]]
        records = grain.sources.ArrayRecordDataSource(paths) if paths else []
        if len(records) != info["documents"]:
            raise CorpusFormatError(
                f"{self.directory}: split {split!r} holds {len(records)} records, the manifest "
                f"says {info['documents']} (a shard is truncated or was replaced)"
            )
        return _SplitSource(records, self.token_dtype)

    def documents(self, split: str) -> list[TokenDocument]:
        """Every document of ``split`` in stored order."""
        src = self.source(split)
        return [src[i] for i in range(len(src))]

    def groups(self, split: str) -> list[tuple[str, list[TokenDocument]]]:
        """``[(name, documents)]``: the split's named runs of consecutive documents, in stored order."""
        runs = self.manifest.get("groups", {}).get(split)
        if not runs:
            raise ValueError(f"{self.directory / MANIFEST} defines no groups for split {split!r}")
        src = self.source(split)
        out, start = [], 0
        for run in runs:
            out.append((run["name"], [src[i] for i in range(start, start + run["documents"])]))
            start += run["documents"]
        return out


class _SplitSource:
    """``len`` and ``[i] -> TokenDocument`` over the ArrayRecord records of one split."""

    def __init__(self, records: Any, token_dtype: str) -> None:
        self._records = records
        self._dtype = token_dtype

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> TokenDocument:
        return decode_record(self._records[int(index)], self._dtype)


def write_subset(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    train_tokens: int,
    group_tokens: int,
    num_groups: int,
    eval_split: str = "validation",
    compression: str = "zstd",
) -> dict[str, Any]:
    """Writes a smaller corpus: whole documents from the start of ``train`` until at least ``train_tokens``,
    and the first ``num_groups`` groups of ``eval_split``, each cut after the first document that brings it to
    ``group_tokens`` (whole documents; a group that is shorter is an error).

    The result is a corpus directory of the same format whose manifest records the parent's manifest
    source, the subset's parameters and how many tokens it kept: e.g. the part of a corpus that travels to
    a remote machine for one study.
    """
    corpus = TokenCorpus(src)
    if train_tokens < 1 or group_tokens < 1 or num_groups < 1:
        raise ValueError(f"train_tokens={train_tokens}, group_tokens={group_tokens} and num_groups={num_groups} must all be >= 1")
    dst = pathlib.Path(dst)
    splits, groups = {}, {}
    with TokenShardWriter(dst, "train", token_dtype=corpus.token_dtype, compression=compression) as writer:
        train = corpus.source("train")
        total = 0
        for i in range(len(train)):
            if total >= train_tokens:
                break
            doc = train[i]
            writer.add(doc.doc_id, doc.tokens)
            total += doc.tokens.size
        if total < train_tokens:
            raise ValueError(f"{src}: split 'train' holds {total} tokens, fewer than train_tokens={train_tokens}")
    splits["train"] = writer.close()
    available = corpus.groups(eval_split)
    if len(available) < num_groups:
        raise ValueError(f"{src}: split {eval_split!r} has {len(available)} groups, fewer than num_groups={num_groups}")
    runs = []
    with TokenShardWriter(dst, eval_split, token_dtype=corpus.token_dtype, compression=compression) as writer:
        for name, docs in available[:num_groups]:
            kept, total = 0, 0
            for doc in docs:
                if total >= group_tokens:
                    break
                writer.add(doc.doc_id, doc.tokens)
                kept += 1
                total += doc.tokens.size + 1  # + the EOS that follows each document in a stream
            if total < group_tokens:
                raise ValueError(f"{src}: group {name!r} of {eval_split!r} holds {total} tokens, fewer than group_tokens={group_tokens}")
            runs.append({"name": name, "documents": kept, "tokens": total - kept})
    splits[eval_split] = writer.close()
    groups[eval_split] = runs
    source = dict(corpus.manifest["source"])
    source["subset_of"] = {
        "directory": os.fspath(src),
        "train_tokens": train_tokens,
        "group_tokens": group_tokens,
        "num_groups": num_groups,
        "eval_split": eval_split,
    }
    write_manifest(dst, tokenizer=corpus.tokenizer, token_dtype=corpus.token_dtype, splits=splits, source=source, groups=groups)
    return read_manifest(dst)
