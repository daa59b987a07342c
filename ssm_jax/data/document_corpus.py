"""What every long-document token corpus builder shares: Debian package reading, held-out units, writing.

A builder (:mod:`ssm_jax.data.linux_corpus`, :mod:`ssm_jax.data.rfc_corpus`) turns its source into
``{path: text}`` documents whose paths group related documents in directories, then calls
:func:`write_corpus`. Whole directories are held out: walking down from the top, the first directories
whose text lies between ``unit_min_bytes`` and ``unit_max_bytes`` are candidate units (:func:`heldout_units`);
``num_heldout_units`` of them, chosen by a seeded hash of their path, form the ``validation`` split (all their
documents, in path order), one manifest group per unit, so an evaluation streams a unit as one long prompt
of related documents. The ``train`` split holds every other document, directory by directory in a seeded
hash order of the directories (documents of one directory together, in path order): any prefix of the split
is a sample of whole directories.

The output is a :mod:`ssm_jax.data.token_shards` corpus: uint16 GPT-NeoX token ids in ArrayRecord shards
and a ``manifest.json`` that records the builder's ``source`` record, the split and every count.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from ssm_jax.data.token_shards import TokenShardWriter, read_manifest, write_manifest
from ssm_jax.data.tokenization import get_tokenizer

__all__ = ["read_deb_data_member", "sha256_file", "heldout_units", "refuse_existing", "write_corpus", "builder_main"]


def read_deb_data_member(deb: str | os.PathLike[str]) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive)."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{os.fspath(deb)}: not a Debian package (no ar archive header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise ValueError(f"{os.fspath(deb)}: no data.tar member")
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii"))
            if name.startswith("data.tar"):
                return f.read(size)
            f.seek(size + size % 2, io.SEEK_CUR)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def refuse_existing(out: str | os.PathLike[str]) -> None:
    """FileExistsError when ``out`` already holds a corpus (builders call it before minutes of reading)."""
    if (pathlib.Path(out) / "manifest.json").exists():
        raise FileExistsError(f"{pathlib.Path(out) / 'manifest.json'} exists; remove {os.fspath(out)} to rebuild")


def _hash_key(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{name}".encode("utf-8")).digest()


def heldout_units(sizes: dict[str, int], *, num_units: int, seed: int, min_bytes: int, max_bytes: int) -> list[str]:
    """Held-out directories, in their seeded hash order, from ``{path: bytes}`` of the documents.

    Walking down from the top-level directories, a directory whose text (recursively) is at most
    ``max_bytes`` is a candidate unit when it holds at least ``min_bytes`` (the walk stops there), and a
    larger one is split into its subdirectories. ``num_units`` candidates with the smallest seeded hash are
    held out (fewer candidates: an error naming the sizes).
    """
    subtree: collections.Counter = collections.Counter()
    children: dict[str, set[str]] = collections.defaultdict(set)
    for path, size in sizes.items():
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            subtree[directory] += size
            children["/".join(parts[: depth - 1])].add(directory)
    candidates: list[str] = []
    stack = sorted(children[""])
    while stack:
        directory = stack.pop()
        if subtree[directory] <= max_bytes:
            if subtree[directory] >= min_bytes:
                candidates.append(directory)
        else:
            stack.extend(sorted(children[directory]))
    if len(candidates) < num_units:
        raise ValueError(f"only {len(candidates)} directories hold {min_bytes}-{max_bytes} bytes of kept text, fewer than num_units={num_units}")
    return sorted(candidates, key=lambda d: _hash_key(seed, d))[:num_units]


def _unit_of(path: str, units: set[str]) -> str | None:
    parts = path.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        if prefix in units:
            return prefix
    return None


def _tokenize_in_batches(tokenizer, paths: list[str], texts: dict[str, str], *, batch: int = 512, desc: str = "") -> Iterator[tuple[str, np.ndarray]]:
    from tqdm import tqdm

    with tqdm(total=len(paths), desc=desc, unit="doc", disable=None) as bar:
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            for path, ids in zip(chunk, tokenizer.encode_batch([texts[p] for p in chunk])):
                yield path, np.asarray(ids, np.int32)
            bar.update(len(chunk))


def write_corpus(
    texts: dict[str, str],
    out: str | os.PathLike[str],
    *,
    source: dict[str, Any],
    num_heldout_units: int,
    seed: int,
    unit_min_bytes: int,
    unit_max_bytes: int,
    tokens_per_shard: int = 16 * 2**20,
) -> dict:
    """Splits ``{path: text}`` (module docstring), tokenizes it with GPT-NeoX and writes the corpus under ``out``
    with ``source`` (plus the split settings) as the manifest's source record; returns the checked manifest."""
    refuse_existing(out)
    out = pathlib.Path(out)
    sizes = {p: len(t.encode("utf-8")) for p, t in texts.items()}
    units = heldout_units(sizes, num_units=num_heldout_units, seed=seed, min_bytes=unit_min_bytes, max_bytes=unit_max_bytes)
    unit_set = set(units)
    by_unit: dict[str, list[str]] = {u: [] for u in units}
    by_dir: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(texts):
        unit = _unit_of(path, unit_set)
        if unit is not None:
            by_unit[unit].append(path)
        else:
            by_dir[path.rsplit("/", 1)[0] if "/" in path else ""].append(path)
    train_paths = [p for d in sorted(by_dir, key=lambda d: _hash_key(seed, d)) for p in by_dir[d]]
    tokenizer = get_tokenizer("neox")
    splits, groups = {}, []
    with TokenShardWriter(out, "train", tokens_per_shard=tokens_per_shard) as writer:
        for path, ids in _tokenize_in_batches(tokenizer, train_paths, texts, desc="train"):
            writer.add(path, ids)
    splits["train"] = writer.close()
    with TokenShardWriter(out, "validation", tokens_per_shard=tokens_per_shard) as writer:
        for unit in units:
            n_tokens = 0
            for path, ids in _tokenize_in_batches(tokenizer, by_unit[unit], texts, desc=unit):
                writer.add(path, ids)
                n_tokens += ids.size
            groups.append({"name": unit, "documents": len(by_unit[unit]), "tokens": n_tokens})
    splits["validation"] = writer.close()
    record = dict(
        source,
        kept_bytes=sum(sizes.values()),
        split={"seed": seed, "unit_min_bytes": unit_min_bytes, "unit_max_bytes": unit_max_bytes, "num_heldout_units": num_heldout_units},
    )
    tok = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
    write_manifest(out, tokenizer=tok, token_dtype="uint16", splits=splits, source=record, groups={"validation": groups})
    return read_manifest(out)


def builder_main(
    argv: list[str] | None,
    *,
    doc: str,
    source_help: str,
    download_help: str,
    download: Callable[[pathlib.Path], str | os.PathLike[str]],
    build: Callable[..., dict],
    num_heldout_units: int,
    download_prefix: str,
) -> None:
    """The command line every builder shares: ``--out`` and exactly one of ``--source`` and ``--download``
    (``download(directory)`` fetches the source into a new temporary directory and returns it), then
    ``build(source, out, num_heldout_units=, seed=)`` and a line per split."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output corpus directory")
    parser.add_argument("--source", help=source_help)
    parser.add_argument("--download", action="store_true", help=download_help)
    parser.add_argument("--num_heldout_units", type=int, default=num_heldout_units)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if bool(args.source) == bool(args.download):
        parser.error("give exactly one of --source and --download")
    source = args.source or download(pathlib.Path(tempfile.mkdtemp(prefix=download_prefix)))
    manifest = build(source, args.out, num_heldout_units=args.num_heldout_units, seed=args.seed)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens, {len(info['shards'])} shards")
