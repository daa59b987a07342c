"""A long-document corpus of GPT-NeoX tokens from the IETF RFCs (Debian's ``doc-rfc-*`` packages): English prose.

Why this corpus: the state-collapse study (docs/RESULTS.md) found no collapse on Linux-kernel code and could
not tell whether code needs less memory than prose or the models need more training. Answering that needs a
prose corpus of the same kind of size, and the machines the study runs on reach only package registries.
Debian's ``doc-rfc-*`` packages (section non-free, version ``20230121-1``) ship 7,836 RFCs as plain text:
382 MB of formal technical English once page furniture is removed (97M GPT-NeoX tokens, 3.9 bytes per
token), with ASCII diagrams, protocol grammars and examples inside it, many documents over 50K tokens. It is
prose, but technical prose; its losses and any collapse length in tokens are those of this text, not of books
or the web. It is also smaller than the Linux corpus: with 32 blocks held out, 83M tokens are left for training.

Licence: each RFC may be copied and distributed intact (the IETF Trust's terms, and the packages' copyright
files); derivative works are restricted, which is why Debian files the packages as non-free. The corpus is
built locally for research measurements; no text is committed to this repository.

Rebuild (one command; ``--download`` fetches the recorded packages with ``apt-get download`` through a private
apt configuration that adds the ``non-free`` component to this system's own Debian sources, else pass the
directory holding the ``.deb`` files)::

    python -m ssm_jax.data.rfc_corpus --out data/rfc --download

What is kept: every ``usr/share/doc/RFC/<category>/rfcN.txt[.gz]`` (not the HTML, PDF or JSON copies, the
``links/`` symlinks or the draft queue), with the page furniture of the paginated format removed (form
feeds, the ``[Page N]`` footer lines and the ``RFC N ... Month Year`` header lines) and runs of blank lines
cut to two. An RFC in two packages or categories is kept once (the first in path order; identical texts
after cleaning are dropped as duplicates).

Documents and splits (:mod:`ssm_jax.data.document_corpus`): each RFC is one document, its path
``rfcBBBBB/rfcN`` with ``BBBBB`` its number rounded down to a block of ``BLOCK`` (consecutive RFCs, so often
of one period and area); whole blocks are held out for evaluation.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import os
import pathlib
import re
import subprocess
import sys
import tarfile
from typing import Iterator

from ssm_jax.data.document_corpus import builder_main, read_deb_data_member, refuse_existing, sha256_file, write_corpus

__all__ = ["PACKAGES", "VERSION", "RfcText", "iter_rfc_texts", "clean_rfc", "select_rfcs", "build_corpus", "private_apt_config", "main"]

PACKAGES = (
    "doc-rfc-std",
    "doc-rfc-std-proposed",
    "doc-rfc-old-std",
    "doc-rfc-experimental",
    "doc-rfc-informational",
    "doc-rfc-fyi-bcp",
    "doc-rfc-misc",
    "doc-rfc-others",
)
VERSION = "20230121-1"
LICENSE = "IETF Trust: copying and distribution of each RFC intact; derivative works restricted (Debian non-free)"
BLOCK = 50  # RFC numbers per directory of the corpus: the unit of held-out text
# A held-out block streams one prompt of at least 262,144 tokens (64x T_train up to 4,096) at the measured 3.9
# bytes per NeoX token of this text; 32 blocks of 1.3-2.2 MB hold out about 15% of it.
UNIT_MIN_BYTES = 1_300_000
UNIT_MAX_BYTES = 2_200_000
NUM_HELDOUT_UNITS = 32
_MEMBER = re.compile(r"(?:\./)?usr/share/doc/RFC/(?P<category>[\w-]+)/rfc(?P<number>\d+)\.txt(?:\.gz)?")
_SKIPPED_CATEGORIES = ("links", "queue")
_FOOTER = re.compile(r"^.*\[Page \d+\]\s*$")
_HEADER = re.compile(r"^RFC \d+ .*\b(?:January|February|March|April|May|June|July|August|September|October|November|December) \d{4}\s*$")


class RfcText:
    """One RFC file of a package: its number, category and raw bytes."""

    __slots__ = ("number", "category", "data")

    def __init__(self, number: int, category: str, data: bytes) -> None:
        self.number = number
        self.category = category
        self.data = data


def iter_rfc_texts(source: str | os.PathLike[str]) -> Iterator[RfcText]:
    """The plain-text RFCs of a directory of ``doc-rfc-*`` packages (``.deb`` files) or of an unpacked tree
    (a directory holding ``usr/share/doc/RFC``)."""
    path = pathlib.Path(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"source={os.fspath(source)!r} is not a directory (give the directory of the doc-rfc-*.deb files or an unpacked tree)"
        )
    debs = sorted(path.glob("doc-rfc-*.deb"))
    if debs:
        for deb in debs:
            with tarfile.open(fileobj=io.BytesIO(read_deb_data_member(deb))) as data:
                for member in data:
                    text = _member_text(member.name, member.isfile(), lambda m=member: data.extractfile(m).read())
                    if text is not None:
                        yield text
        return
    tree = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    found = False
    for p in tree:
        text = _member_text(p.relative_to(path).as_posix(), True, p.read_bytes)
        if text is not None:
            found = True
            yield text
    if not found:
        raise ValueError(f"source={os.fspath(source)!r} holds no doc-rfc-*.deb files and no usr/share/doc/RFC/<category>/rfcN.txt files")


def _member_text(name: str, is_file: bool, read) -> RfcText | None:
    match = _MEMBER.fullmatch(name)
    if not (is_file and match) or match["category"] in _SKIPPED_CATEGORIES:
        return None
    data = read()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return RfcText(int(match["number"]), match["category"], data)


def clean_rfc(text: str) -> str:
    """The RFC without its page furniture: form feeds, ``[Page N]`` footers and ``RFC N ... Month Year``
    headers removed, trailing spaces stripped, runs of blank lines cut to two."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\f", "\n").split("\n")]
    lines = [ln for ln in lines if not (_FOOTER.match(ln) or _HEADER.match(ln))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def select_rfcs(texts: Iterator[RfcText]) -> tuple[dict[str, str], collections.Counter]:
    """Cleans and deduplicates: ``({"rfcBBBBB/rfcN": text}, counts)``. The first copy of a number (in number,
    then category order) is kept; a later copy or an identical text is a ``duplicate``."""
    kept: dict[str, str] = {}
    seen: set[bytes] = set()
    counts: collections.Counter = collections.Counter()
    for t in sorted(texts, key=lambda t: (t.number, t.category)):
        path = f"rfc{t.number // BLOCK * BLOCK:05d}/rfc{t.number}"
        text = clean_rfc(t.data.decode("utf-8", errors="replace"))
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if path in kept or digest in seen:
            reason = "duplicate"
        elif not text.strip():
            reason = "empty"
        else:
            reason = "kept"
            kept[path] = text
            seen.add(digest)
        counts[reason] += 1
        counts[reason + "_bytes"] += len(t.data)
    return kept, counts


def build_corpus(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    num_heldout_units: int = NUM_HELDOUT_UNITS,
    seed: int = 0,
    unit_min_bytes: int = UNIT_MIN_BYTES,
    unit_max_bytes: int = UNIT_MAX_BYTES,
    tokens_per_shard: int = 16 * 2**20,
) -> dict:
    """Builds the token corpus of ``source`` (see the module docstring) under ``out``; returns the manifest."""
    refuse_existing(out)  # before minutes of reading
    source_path = pathlib.Path(source)
    print(f"reading {source_path} ...", file=sys.stderr)
    texts, counts = select_rfcs(iter_rfc_texts(source_path))
    if not texts:
        raise ValueError(f"source={os.fspath(source)!r} holds no RFC text")
    debs = sorted(source_path.glob("doc-rfc-*.deb"))
    record = {
        "packages": list(PACKAGES),
        "version": VERSION,
        "license": LICENSE,
        "input": source_path.name,
        "input_sha256": {d.name: sha256_file(d) for d in debs} or None,
        "kind": "IETF RFCs: technical English prose with diagrams, grammars and examples",
        "filters": {
            "member": _MEMBER.pattern,
            "skipped_categories": list(_SKIPPED_CATEGORIES),
            "footer": _FOOTER.pattern,
            "header": _HEADER.pattern,
            "block": BLOCK,
        },
        "file_counts": dict(sorted(counts.items())),
    }
    return write_corpus(
        texts,
        out,
        source=record,
        num_heldout_units=num_heldout_units,
        seed=seed,
        unit_min_bytes=unit_min_bytes,
        unit_max_bytes=unit_max_bytes,
        tokens_per_shard=tokens_per_shard,
    )


def private_apt_config(directory: pathlib.Path, sources_text: str) -> pathlib.Path:
    """An apt configuration under ``directory`` whose sources are this system's Debian sources (deb822
    ``.sources`` text) with the ``non-free`` component added, and whose lists and cache live in ``directory``
    (the system's apt state is not touched). Returns the config file for ``APT_CONFIG``."""
    stanzas = []
    for stanza in re.split(r"\n\s*\n", sources_text.strip()):
        fields = dict(re.findall(r"(?m)^(Types|URIs|Suites|Components|Signed-By):\s*(.+)$", stanza))
        if fields.get("Types", "").split() and "deb" in fields["Types"].split() and fields.get("URIs"):
            components = fields.get("Components", "main").split()
            fields["Components"] = " ".join(components + [c for c in ("contrib", "non-free") if c not in components])
            fields["Types"] = "deb"
            stanzas.append("\n".join(f"{k}: {v}" for k, v in fields.items()))
    if not stanzas:
        raise ValueError("no Debian package source (a deb822 stanza with Types: deb and URIs) in this system's apt sources")
    (directory / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (directory / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (directory / "sources.d").mkdir(exist_ok=True)
    (directory / "sources.d" / "rfc.sources").write_text("\n\n".join(stanzas) + "\n")
    config = directory / "apt.conf"
    config.write_text(
        f'Dir::Etc::sourcelist "/dev/null";\nDir::Etc::sourceparts "{directory / "sources.d"}";\n'
        f'Dir::State::Lists "{directory / "lists"}";\nDir::Cache "{directory / "cache"}";\n'
    )
    return config


def _download(directory: pathlib.Path) -> pathlib.Path:
    """``apt-get download`` of the recorded packages into ``directory`` through :func:`private_apt_config`."""
    sources = sorted(pathlib.Path("/etc/apt/sources.list.d").glob("*.sources"))
    if not sources:
        raise RuntimeError("--download needs a Debian system with deb822 apt sources (/etc/apt/sources.list.d/*.sources); otherwise pass --source")
    config = private_apt_config(directory / "apt", "\n\n".join(p.read_text() for p in sources))
    env = dict(os.environ, APT_CONFIG=str(config))
    subprocess.run(["apt-get", "update"], env=env, check=True)
    subprocess.run(["apt-get", "download", *(f"{p}={VERSION}" for p in PACKAGES)], cwd=directory, env=env, check=True)
    return directory


def main(argv: list[str] | None = None) -> None:
    builder_main(
        argv,
        doc=__doc__,
        source_help="the directory of the doc-rfc-*.deb files, or an unpacked tree",
        download_help=f"apt-get download the {len(PACKAGES)} doc-rfc packages ({VERSION}) first",
        download=_download,
        build=build_corpus,
        num_heldout_units=NUM_HELDOUT_UNITS,
        download_prefix="doc-rfc-",
    )


if __name__ == "__main__":
    main()
