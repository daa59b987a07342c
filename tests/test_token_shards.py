"""Token corpora in ArrayRecord shards: records, writer, reader, subsets and the token pipelines."""

from __future__ import annotations

import numpy as np
import pytest

from ssm_jax.data import make_token_map_dataset, unigram_entropy_bits, unigram_entropy_bits_of_tokens
from ssm_jax.data.corpora import Document
from ssm_jax.data.tokenization import ByteTokenizer
from ssm_jax.data.token_shards import (
    CorpusFormatError,
    TokenCorpus,
    TokenShardWriter,
    decode_record,
    encode_record,
    write_manifest,
    write_subset,
)

RNG = np.random.default_rng(1)
TOKENIZER = {"name": "test", "vocab_size": 50277, "eos_id": 0}


def _docs(n: int, lo: int = 1, hi: int = 400, vocab: int = 50277) -> list[tuple[str, np.ndarray]]:
    return [(f"dir{i // 3}/file{i}.c", RNG.integers(1, vocab, size=int(RNG.integers(lo, hi)))) for i in range(n)]


def _write(directory, splits_docs: dict, *, groups=None, compression="zstd", per_shard=500):
    splits = {}
    for split, docs in splits_docs.items():
        with TokenShardWriter(directory, split, tokens_per_shard=per_shard, compression=compression) as w:
            for doc_id, tokens in docs:
                w.add(doc_id, tokens)
        splits[split] = w.close()
    write_manifest(directory, tokenizer=TOKENIZER, token_dtype="uint16", splits=splits, source={"test": True}, groups=groups)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_records_round_trip(dtype):
    tokens = RNG.integers(0, 50277, size=1001)
    doc = decode_record(encode_record("fs/é.c", tokens, dtype), dtype)
    assert doc.doc_id == "fs/é.c" and doc.tokens.dtype == np.int32 and doc.tokens.tolist() == tokens.tolist()
    assert not doc.tokens.flags.writeable
    with pytest.raises(ValueError, match="must lie in"):
        encode_record("x", np.array([70000]), "uint16")
    with pytest.raises(ValueError, match="must be 1-D"):
        encode_record("x", np.ones((2, 2), int), "uint16")


@pytest.mark.parametrize("compression", ["zstd", "uncompressed"])
def test_write_and_read_splits_and_groups(tmp_path, compression):
    train, val = _docs(23), _docs(9)
    groups = {"validation": [{"name": "dir0", "documents": 3, "tokens": 0}, {"name": "rest", "documents": 6, "tokens": 0}]}
    _write(tmp_path, {"train": train, "validation": val}, groups=groups, compression=compression)
    corpus = TokenCorpus(tmp_path)
    assert corpus.splits == ("train", "validation")
    assert len(corpus.manifest["splits"]["train"]["shards"]) > 2
    got = corpus.documents("train")
    assert [d.doc_id for d in got] == [d for d, _ in train]
    assert all(np.array_equal(g.tokens, t) for g, (_, t) in zip(got, train))
    src = corpus.source("validation")
    assert len(src) == 9 and src[4].doc_id == val[4][0]
    (name0, docs0), (name1, docs1) = corpus.groups("validation")
    assert (name0, len(docs0), name1, len(docs1)) == ("dir0", 3, "rest", 6)
    assert corpus.num_tokens("train") == sum(t.size for _, t in train)
    with pytest.raises(ValueError, match="split='test' is not in"):
        corpus.source("test")
    with pytest.raises(ValueError, match="defines no groups for split 'train'"):
        corpus.groups("train")


def test_groups_must_cover_the_split(tmp_path):
    with pytest.raises(ValueError, match="do not cover"):
        _write(tmp_path, {"validation": _docs(4)}, groups={"validation": [{"name": "a", "documents": 3, "tokens": 0}]})


def test_a_replaced_shard_is_detected(tmp_path):
    _write(tmp_path / "a", {"train": _docs(12)})
    _write(tmp_path / "b", {"train": _docs(5)}, per_shard=10**6)
    corpus = TokenCorpus(tmp_path / "a")
    first = corpus.manifest["splits"]["train"]["shards"][0]["file"]
    (tmp_path / "a" / first).write_bytes((tmp_path / "b" / "train-00000-of-00001.array_record").read_bytes())
    with pytest.raises(CorpusFormatError, match="records, the manifest says"):
        TokenCorpus(tmp_path / "a").source("train")


def test_subset_keeps_whole_documents(tmp_path):
    train = _docs(40, 50, 60)
    val = _docs(12, 100, 101)
    groups = {"validation": [{"name": f"g{i}", "documents": 4, "tokens": 0} for i in range(3)]}
    _write(tmp_path / "full", {"train": train, "validation": val}, groups=groups)
    manifest = write_subset(tmp_path / "full", tmp_path / "sub", train_tokens=500, group_tokens=250, num_groups=2, compression="uncompressed")
    sub = TokenCorpus(tmp_path / "sub")
    kept = sub.documents("train")
    assert [d.doc_id for d in kept] == [d for d, _ in train[: len(kept)]]
    assert sum(d.tokens.size for d in kept[:-1]) < 500 <= sum(d.tokens.size for d in kept)
    g = sub.groups("validation")
    assert [name for name, _ in g] == ["g0", "g1"] and [len(docs) for _, docs in g] == [3, 3]  # 3 x 101 >= 250
    assert manifest["source"]["subset_of"]["num_groups"] == 2
    with pytest.raises(ValueError, match="fewer than num_groups=5"):
        write_subset(tmp_path / "full", tmp_path / "sub2", train_tokens=10, group_tokens=10, num_groups=5)
    with pytest.raises(ValueError, match="fewer than train_tokens"):
        write_subset(tmp_path / "full", tmp_path / "sub3", train_tokens=10**6, group_tokens=10, num_groups=1)


def test_token_pipeline_equals_the_text_pipeline():
    """Tokenising first and passing token arrays gives the same batches as passing the documents."""
    from ssm_jax.data import make_map_dataset

    tok = ByteTokenizer()
    docs = [Document(f"d{i}", "".join(chr(97 + int(c)) for c in RNG.integers(0, 26, size=int(RNG.integers(30, 90))))) for i in range(15)]
    kw = dict(mode="concat", seq_len=37, batch_size=3, seed=5, shuffle=True, num_epochs=1)
    a = make_map_dataset(docs, tok, **kw)
    b = make_token_map_dataset([np.array(tok.encode(d.text)) for d in docs], tok.eos_id, **kw)
    assert len(a) == len(b) > 2
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(ValueError, match="doc_tokens is empty"):
        make_token_map_dataset([], 0, **kw)


def test_unigram_entropy_of_tokens_matches_its_definition():
    tok = ByteTokenizer()
    docs = [Document("a", "aab"), Document("b", "bc")]
    # counts: a 2, b 2, c 1, EOS 2 -> 7 tokens
    p = np.array([2, 2, 1, 2]) / 7
    expected = float(-(p * np.log2(p)).sum())
    assert unigram_entropy_bits(docs, tok) == pytest.approx(expected)
    ids = [np.array(tok.encode(d.text)) for d in docs]
    assert unigram_entropy_bits_of_tokens(ids, tok.vocab_size, tok.eos_id) == pytest.approx(expected)
    q = np.array([2, 2, 1]) / 5
    assert unigram_entropy_bits_of_tokens(ids, tok.vocab_size) == pytest.approx(float(-(q * np.log2(q)).sum()))
