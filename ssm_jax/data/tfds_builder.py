"""A tensorflow-datasets builder for local long-document corpora (PG19, RedPajama-style dumps, ...).

Point :func:`build_local_corpus` at a directory holding

* ``*.txt`` files: one document per file, ``doc_id`` = the path relative to the directory; or
* ``*.jsonl`` / ``*.jsonl.gz`` files: one JSON object per line with a ``"text"`` field, ``doc_id`` =
  the object's ``"id"`` field if present, else ``"<relative path>:<line number>"``

(subdirectories are searched too; empty texts are skipped). Documents go to the ``validation`` split
when a hash of their ``doc_id`` falls below ``validation_fraction``, else to ``train``: the split is by
whole document, deterministic, and stable when documents are added. The dataset is written as
ArrayRecord files (``file_format='array_record'``), which tfds can write and read without TensorFlow
(needs the ``array_record`` package, a dependency of tensorflow-datasets' data-source support), and
read back with random access through tfds data sources: :func:`local_corpus_source` returns a source
usable as ``grain.MapDataset.source(...)``, :func:`load_local_corpus` a list of Documents.

Layout on disk: ``<data_dir>/local_text_corpus/<name>/<version>/``; ``name`` is the builder config name,
so one ``data_dir`` can hold several corpora.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
from typing import Any, Iterator

import tensorflow_datasets as tfds

from ssm_jax.data.corpora import Document

__all__ = [
    "SPLITS",
    "LocalTextCorpus",
    "iter_source_documents",
    "is_validation_document",
    "build_local_corpus",
    "local_corpus_source",
    "load_local_corpus",
]

SPLITS: tuple[str, ...] = ("train", "validation")
_BUILDER_NAME = "local_text_corpus"
_VERSION = "1.0.0"
_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


def iter_source_documents(source_dir: str | os.PathLike[str]) -> Iterator[Document]:
    """Yields the documents of ``source_dir`` in a deterministic order (sorted relative paths)."""
    root = pathlib.Path(source_dir)
    if not root.is_dir():
        raise ValueError(f"source_dir={str(source_dir)!r} is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES))
    if not paths:
        raise ValueError(f"source_dir={str(source_dir)!r} holds no files ending in {', '.join(_SUFFIXES)}")
    for path in paths:
        rel = path.relative_to(root).as_posix()
        if path.name.endswith(".txt"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(doc_id=rel, text=text)
            continue
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{rel}:{line_no}: expected a JSON object with a string field 'text'")
                if record["text"].strip():
                    doc_id = str(record["id"]) if "id" in record else f"{rel}:{line_no}"
                    yield Document(doc_id=doc_id, text=record["text"])


def is_validation_document(doc_id: str, validation_fraction: float) -> bool:
    """Whether ``doc_id`` belongs to the validation split (sha256 of the id, uniform in [0, 1))."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < validation_fraction


class LocalTextCorpus(tfds.core.GeneratorBasedBuilder):
    """tfds builder over a local directory of text / JSONL documents; features ``doc_id`` and ``text``.

    The source directory and validation fraction are needed only to prepare the data; reading back
    uses the files alone (see :func:`local_corpus_source`).
    """

    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "Documents from a local directory, split by a hash of doc_id."}

    def __init__(self, *, source_dir: str | os.PathLike[str] | None = None, validation_fraction: float = 0.05, **kwargs: Any) -> None:
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={validation_fraction!r} must be in [0, 1)")
        self._source_dir = source_dir
        self._validation_fraction = validation_fraction
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Long documents from a local directory of .txt / .jsonl files.",
            features=tfds.features.FeaturesDict({"doc_id": tfds.features.Text(), "text": tfds.features.Text()}),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # Nothing to download.
        if self._source_dir is None:
            raise ValueError("LocalTextCorpus needs source_dir to prepare the dataset")
        splits = SPLITS if self._validation_fraction > 0 else ("train",)
        return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, str]]]:
        want_validation = split == "validation"
        seen: set[str] = set()
        for doc in iter_source_documents(self._source_dir):
            if doc.doc_id in seen:
                raise ValueError(f"duplicate doc_id {doc.doc_id!r} in {self._source_dir}")
            seen.add(doc.doc_id)
            if is_validation_document(doc.doc_id, self._validation_fraction) == want_validation:
                yield doc.doc_id, {"doc_id": doc.doc_id, "text": doc.text}


def _dataset_dir(data_dir: str | os.PathLike[str], name: str) -> pathlib.Path:
    return pathlib.Path(data_dir) / _BUILDER_NAME / name / _VERSION


def build_local_corpus(
    source_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    name: str = "default",
    *,
    validation_fraction: float = 0.05,
) -> pathlib.Path:
    """Prepares the ArrayRecord dataset ``name`` from ``source_dir`` under ``data_dir``; returns its folder.

    With ``validation_fraction=0`` only the ``train`` split is written. Each split reads the source
    files once. An already prepared dataset of the same name is reused as is (tfds behaviour);
    delete its folder to rebuild.
    """
    if not name or "/" in name:
        raise ValueError(f"name={name!r} must be a non-empty string without '/'")
    builder = LocalTextCorpus(
        source_dir=source_dir,
        validation_fraction=validation_fraction,
        data_dir=os.fspath(data_dir),
        config=tfds.core.BuilderConfig(name=name, description=f"documents from {os.fspath(source_dir)}"),
        file_format="array_record",
    )
    try:
        builder.download_and_prepare()
    except ModuleNotFoundError as e:
        if e.name == "importlib_resources":
            raise ImportError(
                "tensorflow-datasets needs the package importlib_resources to prepare datasets on "
                "Python >= 3.9 but does not declare it (tensorflow/datasets#11212): pip install importlib_resources"
            ) from e
        raise
    except AssertionError as e:
        if "No examples were yielded" in str(e):
            raise ValueError(
                f"a split of {os.fspath(source_dir)!r} would be empty with validation_fraction="
                f"{validation_fraction}: {e}. Use more documents or another validation_fraction"
            ) from e
        raise
    return pathlib.Path(builder.data_dir)


class LocalCorpusSource:
    """Random-access view of one split: ``len(source)`` and ``source[i] -> Document`` (grain-compatible)."""

    def __init__(self, data_source: Any) -> None:
        self._source = data_source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Document:
        record = self._source[int(index)]
        return Document(doc_id=_as_str(record["doc_id"]), text=_as_str(record["text"]))


def _as_str(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def local_corpus_source(data_dir: str | os.PathLike[str], split: str, name: str = "default") -> LocalCorpusSource:
    """Opens ``split`` ("train" or "validation") of a prepared local corpus for random access."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of the accepted splits: {', '.join(SPLITS)}")
    path = _dataset_dir(data_dir, name)
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(f"no prepared local corpus {name!r} at {path}; run build_local_corpus first")
    builder = tfds.builder_from_directory(os.fspath(path))
    if split not in builder.info.splits:
        raise ValueError(f"split={split!r} was not prepared for {name!r}; available: {', '.join(builder.info.splits)}")
    return LocalCorpusSource(builder.as_data_source(split=split))


def load_local_corpus(data_dir: str | os.PathLike[str], split: str, name: str = "default") -> list[Document]:
    """All documents of ``split`` of a prepared local corpus, sorted by ``doc_id``."""
    source = local_corpus_source(data_dir, split, name)
    return sorted((source[i] for i in range(len(source))), key=lambda d: d.doc_id)
