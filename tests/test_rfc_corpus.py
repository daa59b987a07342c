"""The RFC prose corpus builder on small synthetic RFCs packed as Debian's doc-rfc-* packages are."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

import debian_packages
from ssm_jax.data import rfc_corpus as rc
from ssm_jax.data.token_shards import TokenCorpus
from ssm_jax.data.tokenization import get_tokenizer

RNG = np.random.default_rng(0)
WORDS = "the protocol sender receiver message field octet value MUST SHOULD option header client server".split()


def _rfc(number: int, pages: int) -> str:
    """A paginated RFC: each page ends with a ``[Page N]`` footer, a form feed and the next page's header."""
    out = [f"Network Working Group{' ' * 40}A. Author", f"Request for Comments: {number}{' ' * 40}May 2001", ""]
    for page in range(1, pages + 1):
        for _ in range(12):
            out.append("   " + " ".join(RNG.choice(WORDS, 11)) + ".")
        out += [
            "",
            f"Author{' ' * 20}Standards Track{' ' * 20}[Page {page}]",
            "\f",
            f"RFC {number}{' ' * 10}Synthetic Protocol{' ' * 10}May 2001",
            "",
            "",
            "",
            "",
        ]
    return "\n".join(out) + "\n"


def _packages(tmp) -> dict[int, str]:
    """Two packages: 40 RFCs in blocks 0-49 / 50-99 / 100-149 / 150-199, one in both packages, gzip and plain."""
    texts = {n: _rfc(n, 2 + n % 3) for n in range(1, 200, 5)}
    std = {f"usr/share/doc/RFC/standard/rfc{n}.txt.gz": gzip.compress(texts[n].encode()) for n in texts if n < 100}
    std["usr/share/doc/RFC/standard/rfc11.html.gz"] = gzip.compress(b"<html>not text</html>")
    std["usr/share/doc/RFC/links/rfc11.txt.gz"] = std["usr/share/doc/RFC/standard/rfc11.txt.gz"]
    other = {f"usr/share/doc/RFC/informational/rfc{n}.txt": texts[n].encode() for n in texts if n >= 100}
    other["usr/share/doc/RFC/informational/rfc11.txt"] = texts[11].encode()  # the same RFC in another package
    other["usr/share/doc/RFC/queue/rfc9999.txt"] = b"a draft in the queue"
    (tmp / "doc-rfc-std_20230121-1_all.deb").write_bytes(debian_packages.deb(std))
    (tmp / "doc-rfc-others_20230121-1_all.deb").write_bytes(debian_packages.deb(other))
    return texts


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rfc")
    texts = _packages(tmp)
    sizes = {}
    for n, t in texts.items():
        sizes[n // 50] = sizes.get(n // 50, 0) + len(rc.clean_rfc(t))
    lo, hi = min(sizes.values()), max(sizes.values())
    manifest = rc.build_corpus(tmp, tmp / "corpus", num_heldout_units=2, seed=0, unit_min_bytes=lo, unit_max_bytes=hi, tokens_per_shard=5_000)
    return texts, tmp, manifest


def test_clean_rfc_removes_the_page_furniture_and_keeps_the_text():
    raw = _rfc(1234, 3)
    clean = rc.clean_rfc(raw)
    assert "[Page" not in clean and "\f" not in clean and "\n\n\n" not in clean
    assert "RFC 1234          Synthetic Protocol" not in clean
    assert clean.startswith("Network Working Group") and "Request for Comments: 1234" in clean
    body = [ln for ln in raw.splitlines() if ln.startswith("   ")]
    assert [ln for ln in clean.splitlines() if ln.startswith("   ")] == body  # every line of text, in order


def test_build_from_the_debian_packages(built):
    texts, tmp, manifest = built
    src = manifest["source"]
    counts = src["file_counts"]
    assert counts["kept"] == len(texts) and counts["duplicate"] == 1  # rfc11 in both packages; html, links, queue unread
    assert set(src["input_sha256"]) == {"doc-rfc-std_20230121-1_all.deb", "doc-rfc-others_20230121-1_all.deb"}
    assert all(len(v) == 64 for v in src["input_sha256"].values()) and src["version"] == rc.VERSION
    corpus = TokenCorpus(tmp / "corpus")
    tok = get_tokenizer("neox")
    docs = {d.doc_id: d for split in ("train", "validation") for d in corpus.documents(split)}
    assert set(docs) == {f"rfc{n // 50 * 50:05d}/rfc{n}" for n in texts}
    for n, text in texts.items():
        got = docs[f"rfc{n // 50 * 50:05d}/rfc{n}"].tokens
        np.testing.assert_array_equal(got, tok.encode(rc.clean_rfc(text)))
    groups = manifest["groups"]["validation"]
    assert len(groups) == 2 and all(g["name"].startswith("rfc") for g in groups)
    held = {d.doc_id.split("/")[0] for d in corpus.documents("validation")}
    assert held == {g["name"] for g in groups}
    assert not held & {d.doc_id.split("/")[0] for d in corpus.documents("train")}  # whole blocks held out
    assert json.loads((tmp / "corpus" / "manifest.json").read_text())["source"]["kind"].startswith("IETF RFCs")


def test_bad_sources_are_named(built, tmp_path):
    with pytest.raises(FileExistsError, match="remove"):
        rc.build_corpus(tmp_path / "missing", built[1] / "corpus")  # refused before the source is read
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        list(rc.iter_rfc_texts(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no doc-rfc-"):
        list(rc.iter_rfc_texts(tmp_path))
    (tmp_path / "doc-rfc-std_x_all.deb").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a Debian package"):
        list(rc.iter_rfc_texts(tmp_path))


def test_private_apt_config_adds_non_free_to_the_system_sources(tmp_path):
    sources = (
        "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/k.gpg\n\nTypes: deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n"
    )
    config = rc.private_apt_config(tmp_path, sources)
    written = (tmp_path / "sources.d" / "rfc.sources").read_text()
    assert written.count("Types: deb\n") == 1 and "deb-src" not in written
    assert "Components: main contrib non-free" in written and "Suites: bookworm bookworm-updates" in written
    assert "Signed-By: /usr/share/keyrings/k.gpg" in written
    text = config.read_text()
    assert f'Dir::State::Lists "{tmp_path / "lists"}"' in text and 'Dir::Etc::sourcelist "/dev/null"' in text
    with pytest.raises(ValueError, match="no Debian package source"):
        rc.private_apt_config(tmp_path, "Types: deb-src\nURIs: x\n")
