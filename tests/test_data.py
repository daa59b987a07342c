"""Tests for ssm_jax.data: tokenizers, corpora, grain pipelines, passkey task, tfds builder."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from ssm_jax.data import corpora, passkey, pipeline, tokenization
from ssm_jax.data.corpora import Document


@pytest.fixture(scope="module")
def byte_tok():
    return tokenization.get_tokenizer("byte")


@pytest.fixture(scope="module")
def neox_tok():
    return tokenization.get_tokenizer("neox")


@pytest.fixture(scope="module")
def tiny_docs():
    return corpora.load_corpus("tiny")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip(byte_tok):
    text = "Héllo, wörld — ∑ 🙂\nline two"
    ids = byte_tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert byte_tok.decode(ids) == text
    assert byte_tok.decode(ids + [byte_tok.eos_id]) == text  # EOS skipped
    assert (byte_tok.vocab_size, byte_tok.eos_id) == (257, 256)
    assert byte_tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 replaced, not raised


def test_neox_tokenizer(neox_tok):
    assert neox_tok.encode("Hello world") == [12092, 1533]
    assert neox_tok.vocab_size == 50277 and neox_tok.eos_id == 0
    assert neox_tok._tok.get_vocab_size(with_added_tokens=True) == 50277
    assert neox_tok._tok.token_to_id("|||EMAIL_ADDRESS|||") is None
    text = "To be, or not to be: that is the question.\n    Whether 'tis nobler 12345"
    ids = neox_tok.encode(text)
    assert max(ids) < 50277 and neox_tok.decode(ids) == text
    assert neox_tok.decode(ids + [neox_tok.eos_id]) == text
    assert neox_tok.encode_batch([text, "Hello world"]) == [ids, [12092, 1533]]


def test_get_tokenizer_errors():
    assert isinstance(tokenization.get_tokenizer("byte"), tokenization.ByteTokenizer)
    with pytest.raises(ValueError, match="byte, neox"):
        tokenization.get_tokenizer("gpt2")


# ----------------------------------------------------------------------------- corpora


def test_shakespeare_corpus():
    docs = corpora.load_corpus("shakespeare")
    ids = [d.doc_id for d in docs]
    assert len(docs) == 42 and len(set(ids)) == 42
    assert "hamlet" in ids and not any(i.endswith("_f") for i in ids)
    assert sum(len(d.text) for d in docs) > 4_500_000
    hamlet = docs[ids.index("hamlet")].text
    assert "To be, or not to be" in hamlet and hamlet.startswith("HAMLET")
    assert all("Project Gutenberg" not in d.text and d.text == d.text.strip() for d in docs)


def test_kjv_corpus():
    docs = corpora.load_corpus("kjv")
    assert len(docs) == 66 and docs[0].doc_id == "genesis" and docs[-1].doc_id == "revelation"
    assert "In the beginning God created the heaven and the earth." in docs[0].text[:200]
    assert docs[-1].text.endswith("Amen.")
    assert sum(len(d.text) for d in docs) > 4_000_000
    assert not any("[" in d.text for d in docs)


def test_tiny_corpus_is_deterministic_and_small(tiny_docs):
    assert len(tiny_docs) == corpora.TINY_NUM_DOCUMENTS
    assert all(10_000 < len(d.text) <= corpora.TINY_MAX_CHARS for d in tiny_docs)
    assert corpora.load_corpus("tiny") == tiny_docs
    with pytest.raises(ValueError, match="shakespeare, kjv, tiny"):
        corpora.load_corpus("wikitext")


def test_strip_gutenberg_boilerplate():
    text = (
        "The Project Gutenberg EBook of X\r\nlicence words\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
        "\r\nBody line one.\r\nBody line two.\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n"
    )
    assert corpora.strip_gutenberg_boilerplate(text) == "Body line one.\nBody line two."
    assert corpora.strip_gutenberg_boilerplate("  plain text \n") == "plain text"


def test_split_documents_by_document():
    docs = corpora.load_corpus("shakespeare")
    train, val = corpora.split_documents(docs, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 38
    assert {d.doc_id for d in train}.isdisjoint({d.doc_id for d in val})
    assert {d.doc_id for d in train} | {d.doc_id for d in val} == {d.doc_id for d in docs}
    assert corpora.split_documents(docs, 0.1, seed=0) == (train, val)
    # Independent of input order, dependent on seed.
    _, val_rev = corpora.split_documents(docs[::-1], 0.1, seed=0)
    assert {d.doc_id for d in val_rev} == {d.doc_id for d in val}
    _, val_other = corpora.split_documents(docs, 0.1, seed=1)
    assert {d.doc_id for d in val_other} != {d.doc_id for d in val}
    with pytest.raises(ValueError, match="validation_fraction"):
        corpora.split_documents(docs, 1.0, seed=0)


def test_unigram_entropy_bits(byte_tok, tiny_docs):
    two = [Document("a", "abab"), Document("b", "ba")]
    assert corpora.unigram_entropy_bits(two, byte_tok, include_eos=False) == pytest.approx(1.0)
    # 3 a, 3 b, 2 EOS out of 8 tokens.
    p = np.array([3, 3, 2]) / 8
    assert corpora.unigram_entropy_bits(two, byte_tok) == pytest.approx(float(-(p * np.log2(p)).sum()))
    h = corpora.unigram_entropy_bits(tiny_docs, byte_tok)
    assert 3.5 < h < 6.0  # English bytes: well below log2(257)


# ----------------------------------------------------------------------------- pipelines


def _raw_stream(docs, tok):
    tokens, _ = pipeline.concatenate_documents(pipeline.iterate_documents_tokens(docs, tok), tok.eos_id)
    return tokens


def test_iterate_documents_tokens_is_cached(byte_tok, tiny_docs):
    a = pipeline.iterate_documents_tokens(tiny_docs, byte_tok)
    b = pipeline.iterate_documents_tokens(list(tiny_docs), byte_tok)
    assert all(x is y for x, y in zip(a, b))
    assert a[0].dtype == np.int32 and a[0].tolist() == byte_tok.encode(tiny_docs[0].text)
    assert not a[0].flags.writeable


def test_packed_windows(byte_tok, tiny_docs):
    L, B = 256, 4
    ds = pipeline.make_dataset(tiny_docs, byte_tok, mode="packed", seq_len=L, batch_size=B, shuffle=False)
    batches = list(ds)
    tokens = _raw_stream(tiny_docs, byte_tok)
    assert len(batches) == ((len(tokens) - 1) // L) // B
    saw_boundary = 0
    for k, batch in enumerate(batches):
        assert batch["inputs"].shape == (B, L) and batch["inputs"].dtype == np.int32
        assert batch["targets"].dtype == np.int32 and batch["segment_ids"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32 and np.all(batch["loss_mask"] == 1)
        assert batch["is_continuation"].shape == (B,) and not batch["is_continuation"].any()
        for r in range(B):
            start = (k * B + r) * L
            np.testing.assert_array_equal(batch["inputs"][r], tokens[start : start + L])
            np.testing.assert_array_equal(batch["targets"][r], tokens[start + 1 : start + L + 1])
        seg = batch["segment_ids"]
        assert np.all(seg[:, 0] == 0)
        # The id increases by one exactly where the previous input was EOS.
        np.testing.assert_array_equal(np.diff(seg, axis=1), (batch["inputs"][:, :-1] == byte_tok.eos_id))
        saw_boundary += int((seg[:, -1] > 0).sum())
    assert saw_boundary >= len(tiny_docs) - 2  # boundaries are really exercised


def test_concat_mode_and_shuffled_epoch_covers_all_windows(byte_tok, tiny_docs):
    L, B = 200, 5
    plain = list(pipeline.make_dataset(tiny_docs, byte_tok, mode="concat", seq_len=L, batch_size=B, shuffle=False))
    shuf = list(pipeline.make_dataset(tiny_docs, byte_tok, mode="concat", seq_len=L, batch_size=B, seed=3))
    assert all(not b["segment_ids"].any() for b in plain)
    tokens = _raw_stream(tiny_docs, byte_tok)
    n_windows = (len(tokens) - 1) // L
    all_windows = {tokens[i * L : i * L + L].tobytes() for i in range(n_windows)}
    shuf_rows = [r.tobytes() for b in shuf for r in b["inputs"]]
    assert len(shuf) == len(plain) == n_windows // B
    assert len(set(shuf_rows)) == len(shuf_rows) and set(shuf_rows) <= all_windows  # each window once ...
    assert not np.array_equal(plain[0]["inputs"], shuf[0]["inputs"])  # ... in another order


def test_stream_mode_continuity(byte_tok, tiny_docs):
    L, B = 128, 3
    ds = pipeline.make_dataset(tiny_docs, byte_tok, mode="stream", seq_len=L, batch_size=B, seed=7, num_epochs=2)
    batches = list(ds)
    steps = len(batches) // 2
    texts = {d.text for d in tiny_docs}
    epoch_orders = []
    for epoch in range(2):
        ep = batches[epoch * steps : (epoch + 1) * steps]
        np.testing.assert_array_equal([b["is_continuation"].tolist() for b in ep], [[0] * B] + [[1] * B] * (steps - 1))
        rows = []
        for r in range(B):
            for k in range(steps - 1):
                assert ep[k + 1]["inputs"][r, 0] == ep[k]["targets"][r, -1]  # row r continues
            np.testing.assert_array_equal(ep[0]["inputs"][r, 1:], ep[0]["targets"][r, :-1])
            rows.append(np.concatenate([b["inputs"][r] for b in ep] + [ep[-1]["targets"][r, -1:]]))
        # Streams are consecutive pieces of one token sequence (sharing boundary tokens) ...
        for r in range(1, B):
            assert rows[r][0] == rows[r - 1][-1]
        joined = np.concatenate([rows[0]] + [row[1:] for row in rows[1:]])
        assert len(joined) > 0.98 * len(_raw_stream(tiny_docs, byte_tok))  # little is dropped
        # ... in which the EOS-separated complete pieces are whole documents, each at most once.
        cuts = np.flatnonzero(joined == byte_tok.eos_id)
        assert len(cuts) >= len(tiny_docs) - 1
        full = [byte_tok.decode(joined[a + 1 : b]) for a, b in zip(cuts[:-1], cuts[1:])]
        full.insert(0, byte_tok.decode(joined[: cuts[0]]))  # the epoch starts at a document start
        assert full and all(t in texts for t in full) and len(set(full)) == len(full)
        epoch_orders.append(full)
    assert epoch_orders[0] != epoch_orders[1]  # reshuffled document order per epoch


@pytest.mark.parametrize("mode", pipeline.MODES)
def test_resume_from_state_gives_identical_batches(byte_tok, tiny_docs, mode):
    kw = dict(mode=mode, seq_len=64, batch_size=4, seed=11, num_epochs=None)
    it = iter(pipeline.make_dataset(tiny_docs, byte_tok, **kw))
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)
    it2 = iter(pipeline.make_dataset(tiny_docs, byte_tok, **kw))
    it2.set_state(state)
    _assert_batches_equal(_take(it2, 4), expected)
    fresh = _take(iter(pipeline.make_dataset(tiny_docs, byte_tok, **kw)), 1)
    assert not np.array_equal(fresh[0]["inputs"], expected[0]["inputs"])


@pytest.mark.parametrize("mode", ["packed", "concat"])
def test_sharding_windows_disjoint(byte_tok, tiny_docs, mode):
    kw = dict(mode=mode, seq_len=100, batch_size=4, seed=5)
    shards = [list(pipeline.make_dataset(tiny_docs, byte_tok, shard_index=s, shard_count=3, **kw)) for s in range(3)]
    assert len({len(s) for s in shards}) == 1  # same number of batches on every host
    rows = [{r.tobytes() for b in s for r in b["inputs"]} for s in shards]
    assert all(len(r) == len(shards[0]) * 4 for r in rows)
    assert rows[0].isdisjoint(rows[1]) and rows[0].isdisjoint(rows[2]) and rows[1].isdisjoint(rows[2])


def test_sharding_streams(byte_tok, tiny_docs):
    kw = dict(mode="stream", seq_len=100, seed=5, shuffle=True)
    whole = list(pipeline.make_dataset(tiny_docs, byte_tok, batch_size=4, **kw))
    parts = [list(pipeline.make_dataset(tiny_docs, byte_tok, batch_size=2, shard_index=s, shard_count=2, **kw)) for s in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for k in range(len(whole)):
        np.testing.assert_array_equal(np.concatenate([parts[0][k]["inputs"], parts[1][k]["inputs"]]), whole[k]["inputs"])
    assert not np.array_equal(parts[0][0]["inputs"], parts[1][0]["inputs"])


def test_pipeline_argument_errors(byte_tok, tiny_docs):
    kw = dict(mode="packed", seq_len=64, batch_size=2)
    with pytest.raises(ValueError, match="packed, concat, stream"):
        pipeline.make_dataset(tiny_docs, byte_tok, **{**kw, "mode": "chunked"})
    with pytest.raises(ValueError, match="seq_len"):
        pipeline.make_dataset(tiny_docs, byte_tok, **{**kw, "seq_len": 0})
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.make_dataset(tiny_docs, byte_tok, **{**kw, "batch_size": 0})
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.make_dataset(tiny_docs, byte_tok, **kw, shard_index=2, shard_count=2)
    small = [Document("x", "a short document")]
    for mode in pipeline.MODES:
        with pytest.raises(ValueError, match="batch_size"):
            pipeline.make_dataset(small, byte_tok, mode=mode, seq_len=16, batch_size=4)


def test_neox_packed_pipeline(neox_tok, tiny_docs):
    ds = pipeline.make_dataset(tiny_docs, neox_tok, mode="packed", seq_len=512, batch_size=2, shuffle=False)
    batch = next(iter(ds))
    assert batch["inputs"].max() < neox_tok.vocab_size
    assert neox_tok.decode(batch["inputs"][0]).startswith(tiny_docs[0].text[:100])


# ----------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("name, max_tolerance", [("byte", 23), ("neox", 8)])
def test_passkey_prompt_length(name, max_tolerance):
    tok = tokenization.get_tokenizer(name)
    tol = passkey.passkey_length_tolerance(tok)
    assert tol <= max_tolerance
    rng = np.random.default_rng(0)
    for ctx in (300, 1000, 4000):
        for depth in (0.0, 0.37, 1.0):
            ex = passkey.make_passkey_example(tok, ctx, depth, rng)
            assert ex.prompt_ids.dtype == np.int32
            assert ctx - tol < len(ex.prompt_ids) <= ctx, (ctx, depth, len(ex.prompt_ids))
            text = tok.decode(ex.prompt_ids)
            assert text.startswith(passkey.PASSKEY_INSTRUCTION) and text.endswith(passkey.PASSKEY_QUESTION)
            assert text.count(passkey.PASSKEY_LINE.format(passkey=ex.passkey)) == 1
            assert len(ex.passkey) == 5 and ex.passkey.isdigit()
    with pytest.raises(ValueError, match="context_tokens"):
        passkey.make_passkey_example(tok, 20, 0.5, rng)
    with pytest.raises(ValueError, match="depth"):
        passkey.make_passkey_example(tok, 1000, 1.5, rng)


def test_largest_fitting_search():
    for limit in (0, 1, 7, 100):
        for guess in (0, 1, limit, limit + 1, 3 * limit + 5):
            calls = []
            fits = lambda n: calls.append(n) or n <= limit
            assert passkey._largest_fitting(fits, guess) == limit
            assert len(calls) <= 4 * (limit + 2).bit_length() + 4  # logarithmic, not linear


def test_passkey_depth_placement(neox_tok):
    rng = np.random.default_rng(1)
    fractions = []
    for depth in np.linspace(0.0, 1.0, 11):
        ex = passkey.make_passkey_example(neox_tok, 2000, float(depth), rng, passkey="54321")
        lines = neox_tok.decode(ex.prompt_ids).split("\n")
        needle = lines.index(passkey.PASSKEY_LINE.format(passkey="54321"))
        before = sum(l.count(".") for l in lines[1:needle])
        after = sum(l.count(".") for l in lines[needle + 1 : -1])
        total = before + after
        assert total > 100
        assert abs(before / total - depth) <= 1.0 / total + 1e-9
        fractions.append(before / total)
        if depth == 0.0:
            assert needle == 1  # right after the instruction
        if depth == 1.0:
            assert needle == len(lines) - 2  # right before the question
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0


def test_passkey_is_correct():
    assert passkey.passkey_is_correct(" 12345.", "12345")
    assert passkey.passkey_is_correct("The passkey is 12345", "12345")
    assert not passkey.passkey_is_correct(" 123456", "12345")
    assert not passkey.passkey_is_correct(" 1234", "12345")
    assert not passkey.passkey_is_correct(" 12 345", "12345")


@pytest.mark.parametrize("name", ["byte", "neox"])
def test_passkey_training_example(name):
    tok = tokenization.get_tokenizer(name)
    ex = passkey.make_passkey_training_example(tok, seq_len=600, context_tokens=500, depth=0.5, passkey="70815")
    mask = ex["loss_mask"]
    assert ex["inputs"].shape == ex["targets"].shape == mask.shape == (600,)
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
    masked = np.flatnonzero(mask)
    assert tok.decode(ex["targets"][masked]).strip() == "70815"
    assert np.all(np.diff(masked) == 1)  # one contiguous answer
    prompt = tok.decode(ex["inputs"][: masked[0] + 1])
    assert prompt.endswith(passkey.PASSKEY_QUESTION + (" " if name == "byte" else ""))
    assert np.all(ex["targets"][masked[-1] + 1 :] == tok.eos_id)  # EOS padding, masked out
    assert mask.sum() == len(masked) and set(np.unique(mask)) == {0.0, 1.0}


def test_passkey_dataset(neox_tok):
    kw = dict(seq_len=384, batch_size=4, seed=2)
    it = iter(passkey.make_passkey_dataset(neox_tok, **kw))
    first = _take(it, 2)
    state = it.get_state()
    expected = _take(it, 2)
    it2 = iter(passkey.make_passkey_dataset(neox_tok, **kw))
    it2.set_state(state)
    _assert_batches_equal(_take(it2, 2), expected)
    b = first[0]
    assert b["inputs"].shape == (4, 384) and b["loss_mask"].dtype == np.float32
    lengths = [int(np.flatnonzero(m)[0]) for m in b["loss_mask"]]
    assert len(set(lengths)) > 1  # random prompt lengths
    for r in range(4):
        answer = neox_tok.decode(b["targets"][r][b["loss_mask"][r] > 0]).strip()
        assert passkey.passkey_is_correct(neox_tok.decode(b["inputs"][r]), answer)
    s0 = next(iter(passkey.make_passkey_dataset(neox_tok, shard_index=0, shard_count=2, **kw)))
    s1 = next(iter(passkey.make_passkey_dataset(neox_tok, shard_index=1, shard_count=2, **kw)))
    np.testing.assert_array_equal(s0["inputs"][0], b["inputs"][0])  # example 0
    np.testing.assert_array_equal(s1["inputs"][0], b["inputs"][1])  # example 1
    with pytest.raises(ValueError, match="seq_len"):
        passkey.make_passkey_dataset(neox_tok, seq_len=40, batch_size=2)


# ----------------------------------------------------------------------------- tfds builder


def test_tfds_local_corpus_round_trip(tmp_path):
    from ssm_jax.data import tfds_builder

    src = tmp_path / "src"
    (src / "books").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    expected = {}
    for i in range(14):
        text = " ".join(rng.choice(words, size=200 + 10 * i)) + f" end of book {i}."
        (src / "books" / f"book{i:02d}.txt").write_text(text, encoding="utf-8")
        expected[f"books/book{i:02d}.txt"] = text
    with open(src / "web.jsonl", "w", encoding="utf-8") as f:
        for i in range(6):
            text = f"web page {i} " + " ".join(rng.choice(words, size=50))
            f.write(json.dumps({"text": text}) + "\n")
            expected[f"web.jsonl:{i + 1}"] = text
    (src / "ignored.csv").write_text("not,a,document")

    path = tfds_builder.build_local_corpus(src, tmp_path / "data", name="mini", validation_fraction=0.3)
    assert any(p.name.startswith("local_text_corpus-train.array_record") for p in path.iterdir())
    train = tfds_builder.load_local_corpus(tmp_path / "data", "train", name="mini")
    val = tfds_builder.load_local_corpus(tmp_path / "data", "validation", name="mini")
    assert train and val
    assert {d.doc_id for d in train}.isdisjoint({d.doc_id for d in val})
    assert {d.doc_id: d.text for d in train + val} == expected
    assert all(tfds_builder.is_validation_document(d.doc_id, 0.3) for d in val)
    source = tfds_builder.local_corpus_source(tmp_path / "data", "validation", name="mini")
    assert len(source) == len(val) and source[0] in val
    with pytest.raises(ValueError, match="train, validation"):
        tfds_builder.local_corpus_source(tmp_path / "data", "test", name="mini")
    assert "tensorflow" not in sys.modules
