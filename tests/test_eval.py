"""Evaluation (eval.py, ssm_jax.evaluators, ssm_jax.loading, ssm_jax.capacity): every evaluator end to end on
tiny models with the outputs checked against planted answers (known collapse points, known fit parameters, a
never-forgetting head, a model stub that answers the passkey only below a known length), first-token retention
against a direct computation, several checkpoints of one training run, and every error site of the config."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm_jax import Mamba2Config, Mamba2LM, capacity, diagnostics, evaluators, inference, loading, save_hf
from ssm_jax import mitigations as M
from ssm_jax.data import get_tokenizer
from ssm_jax.evaluators import buckets, config as eval_config, named_mitigations, passkey, states, streams
from ssm_jax.evaluators.base import EvalModel
from ssm_jax.io import write_json
from ssm_jax.model import rms_norm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(d_model=32, n_layer=2, vocab_size=257, d_state=8, headdim=16, chunk_size=16, ssd_impl="xla")


def load_config(name):
    spec = importlib.util.spec_from_file_location(f"eval_cfg_{name}", os.path.join(ROOT, "configs", "eval", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def eval_model(model, tokenizer_name, train_len, mitigations):
    """An EvalModel around an in-memory model (no checkpoint), on the tiny corpus."""
    loaded = loading.LoadedModel(
        model=model,
        tokenizer=get_tokenizer(tokenizer_name),
        tokenizer_name=tokenizer_name,
        train_len=train_len,
        kind="random",
        path="random",
        step=None,
        data={},
    )
    return EvalModel(loaded=loaded, data=streams.HeldOutData(corpus="tiny"), mitigations=mitigations, mitigation_params={})


@pytest.fixture(scope="module")
def tiny_model():
    return Mamba2LM(Mamba2Config(**TINY), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def pretrained_dir(tiny_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_tiny"))
    save_hf(tiny_model, path)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A train.py work directory of configs/tiny.py (T_train 64, the tiny corpus) with checkpoints at steps 1 and 2."""
    from ssm_jax import train_lib

    spec = importlib.util.spec_from_file_location("tiny_train_config", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.update(num_steps=2, batch_size=8)
    config.eval.update(every_steps=0, num_batches=1, batch_size=8)
    config.checkpoint.update(every_steps=1, max_to_keep=3, async_save=False)
    config.optim.update(warmup_steps=1, lr=3e-2)  # two large steps: the checkpoints differ clearly
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    train_lib.train_and_evaluate(config, workdir)
    return workdir


# --------------------------------------------------------------------------------------------------
# Capacity: the collapse rule, T_forget / T_recall and the fits recover planted answers
# --------------------------------------------------------------------------------------------------


def synthetic_losses(length, collapse_at=None, seed=0):
    """Per-position loss: high at the start, decaying to a plateau; +12 ramped in after ``collapse_at``; noisy."""
    t = np.arange(1, length + 1)
    loss = 1.5 + 3.0 / np.sqrt(t) + 0.05 * np.random.default_rng(seed).standard_normal(length)
    if collapse_at is not None:
        loss = np.where(t >= collapse_at, loss + 12.0 * np.clip((t - collapse_at) / 50.0, 0, 1), loss)
    return loss


def verdict(per_position, train_len):
    width = diagnostics.collapse_bucket_width(train_len)
    return diagnostics.collapse_verdict(diagnostics.bucket_means(per_position, width), train_len)


def test_collapse_rule_finds_the_planted_collapse():
    train_len, length = 1024, 8192  # buckets of 128
    for collapse_at in (None, 1700, 5000):
        report = verdict(np.stack([synthetic_losses(length, collapse_at, seed) for seed in range(3)]), train_len)
        assert report.collapsed == (collapse_at is not None)
        # The first bucket (the loss at a document start, 1.5 + 3 / sqrt(t)) is left out of the reference.
        assert report.reference == pytest.approx(1.5 + 3.0 / np.sqrt(np.arange(129, 257)).mean(), abs=0.02)
        if collapse_at is not None:
            # The loss crosses 2x the reference (~3.7) within ~20 positions of the planted onset.
            assert collapse_at - 128 < report.first_position <= collapse_at + 128 and report.max_ratio > 2
        else:
            assert report.first_position is None and report.max_ratio < 1.0


def test_t_forget_and_t_recall_from_synthetic_runs():
    # Models with T_train < 1024 collapse (their loss explodes at 3 T_train), the others do not.
    runs = [{"train_len": t, "collapsed": verdict(synthetic_losses(8192, 3 * t if t < 1024 else None), t).collapsed} for t in (256, 512, 1024, 2048)]
    assert [r["collapsed"] for r in runs] == [True, True, False, False]
    assert capacity.t_forget(runs) == {"t_forget": 1024, "bound": "exact", "monotone": True}
    assert capacity.t_forget(runs[2:])["bound"] == "upper"
    assert capacity.t_forget(runs[:2])["t_forget"] is None
    assert capacity.t_forget(runs[:2] + [dict(runs[3], collapsed=True)] + runs[2:3])["monotone"] is False
    assert capacity.t_recall({512: 1.0, 1024: 0.96, 2048: 0.95, 4096: 0.2}) == 1024
    assert capacity.t_recall({512: 0.5}) is None


def test_fits_recover_known_parameters():
    x = np.array([1.0, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0])
    lin = capacity.fit_linear(x, 5.172 * x - 4.469)
    assert lin["a"] == pytest.approx(5.172, abs=1e-9) and lin["b"] == pytest.approx(-4.469, abs=1e-9)
    exp = capacity.fit_exponential(x, capacity.paper_t_recall(x))
    assert exp["a"] == pytest.approx(4.756, rel=1e-4)
    assert exp["b"] == pytest.approx(1.365, rel=1e-5)
    assert exp["c"] == pytest.approx(-0.742, abs=1e-3)
    # Tiny-model scale (N_S of a few thousand elements): a huge base is still found (the search is over log b).
    xs = np.array([0.002, 0.004, 0.008, 0.016, 0.032])
    ys = capacity.exponential_law(xs, 0.3, np.exp(60.0), 0.05)
    fit = capacity.fit_exponential(xs, ys)
    assert np.log(fit["b"]) == pytest.approx(60.0, rel=1e-4) and fit["a"] == pytest.approx(0.3, rel=1e-3)
    # With 1% noise the fitted curve stays within the noise of the truth.
    noisy = ys * (1 + 0.01 * np.random.default_rng(0).standard_normal(xs.size))
    fit = capacity.fit_exponential(xs, noisy)
    pred = capacity.exponential_law(xs, fit["a"], fit["b"], fit["c"])
    assert fit["rmse"] <= np.sqrt(np.mean((noisy - ys) ** 2)) and np.allclose(pred, ys, rtol=0.03)
    with pytest.raises(ValueError):
        capacity.fit_exponential([1, 2], [1, 2])


def write_fake_run(directory, state_size, train_len, collapsed, accuracy_by_length):
    """An evaluation output directory holding what the loss and passkey modes write (the capacity inputs)."""
    model = {"state_size": state_size, "train_len": train_len}
    write_json(
        os.path.join(directory, "loss_vs_position.json"),
        {"model": model, "length": 16 * train_len, "sources": {"documents": {"curves": {"none": {"collapse": {"collapsed": collapsed}}}}}},
    )
    lengths = sorted(accuracy_by_length)
    write_json(
        os.path.join(directory, "passkey.json"),
        {"model": model, "context_lengths": lengths, "results": {"none": {"accuracy_by_length": [accuracy_by_length[n] for n in lengths]}}},
    )


def test_capacity_mode_end_to_end_recovers_planted_laws(tmp_path):
    # Planted: T_forget(K) = 2 N_S(M) + 1 and T_recall(K) = 3 (1.5 ** N_S - 1) + 2, on grids of lengths.
    for n_s in [1.0, 2.0, 3.0, 4.0]:
        true_forget = int((2 * n_s + 1) * 1024)
        true_recall = int(round((3 * (1.5**n_s - 1) + 2) * 1024))
        for train_len in sorted({true_forget // 2, true_forget, true_forget * 2}):
            lengths = [true_recall // 2, true_recall, true_recall * 2]
            write_fake_run(
                str(tmp_path / f"ns{n_s}_t{train_len}"),
                int(n_s * 1e6),
                train_len,
                collapsed=train_len < true_forget,
                accuracy_by_length={n: 1.0 if n <= true_recall else 0.1 for n in lengths},
            )
    config = load_config("capacity")
    config.capacity.runs = str(tmp_path / "ns*")
    config.output_dir = str(tmp_path / "study")
    results = evaluators.evaluate(config)
    study = json.load(open(tmp_path / "study" / "capacity.json"))
    assert [p["t_forget_k"] for p in study["points"]] == pytest.approx([3, 5, 7, 9])
    assert all(p["t_forget_bound"] == "exact" for p in study["points"])
    assert study["fits"]["forget"]["a"] == pytest.approx(2.0, abs=1e-6)
    assert study["fits"]["forget"]["b"] == pytest.approx(1.0, abs=1e-6)
    fit = study["fits"]["recall"]
    assert fit["a"] == pytest.approx(3.0, rel=2e-3) and fit["b"] == pytest.approx(1.5, rel=1e-3)
    assert fit["c"] == pytest.approx(2.0, abs=5e-3)
    assert study["paper_fits"]["forget"] == {"a": 5.172, "b": -4.469}
    assert os.path.getsize(tmp_path / "study" / "capacity.png") > 10_000
    assert "T_forget = 2.000 N_S + 1.000" in results["summary"] and results["model"] is None


# --------------------------------------------------------------------------------------------------
# Streams, buckets, mitigations
# --------------------------------------------------------------------------------------------------


def test_bucket_edges():
    edges = buckets.log_bucket_edges(100_000, 40, include=(257,))
    assert edges[0] == 1 and edges[-1] == 100_001 and 257 in edges
    assert np.all(np.diff(edges) > 0)
    widths = np.diff(edges)
    assert widths[-1] > 100 * widths[0]  # log-spaced
    assert np.array_equal(buckets.log_bucket_edges(3, 10), [1, 2, 3, 4])


def test_streams_are_seeded_and_consecutive():
    tok = get_tokenizer("byte")
    data = streams.HeldOutData(corpus="tiny", validation_fraction=0.25)
    a = streams.make_stream("documents", tok, data, num_rows=2, seed=3)
    b = streams.make_stream("documents", tok, data, num_rows=2, seed=3)
    first = np.concatenate([a.take([0, 1], 5000), a.take([0, 1], 40000)], axis=1)  # > held-out text: repeats
    np.testing.assert_array_equal(first, b.take([0, 1], 45000))
    assert not np.array_equal(first[0], first[1])  # each row its own document order
    assert (first == tok.eos_id).sum() >= 4
    held_out = streams.heldout_documents(data)
    assert len(held_out) == 2 and tok.decode(first[0, :200]) in "".join(d.text for d in held_out) + "\n"
    nl = streams.make_stream("newlines", tok, data, num_rows=1, seed=0)
    assert set(nl.take([0], 100).ravel()) == {10}
    # Unset config fields fall back to the training config's, then to the defaults.
    resolved = streams.resolve_data(load_config("default").data, {"corpus": "kjv", "split_seed": 5})
    assert resolved == streams.HeldOutData(corpus="kjv", validation_fraction=0.1, split_seed=5)


def test_bucketed_streaming_equals_per_token_losses(tiny_model):
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 301), 0, 257), np.int32)
    rows = streams.DocumentStream([tokens[0], tokens[1]], eos_id=256, num_rows=2, seed=0).take([0, 1], 301)
    stream = streams.DocumentStream([tokens[0], tokens[1]], eos_id=256, num_rows=2, seed=0)  # the same rows again
    edges = buckets.log_bucket_edges(300, 12)
    mit = M.forget_more(0.99, 0.5)
    b = buckets.stream_bucketed_losses(
        tiny_model, stream, 300, num_prompts=2, log_edges=edges, fine_width=32, batch_size=1, chunk_len=64, mitigation=mit
    )
    ref = inference.stream_losses(tiny_model, rows, chunk_len=300, mitigation=mit)  # (2, 300)
    t = np.arange(1, 301)
    for i in range(len(edges) - 1):
        sel = (t >= edges[i]) & (t < edges[i + 1])
        np.testing.assert_allclose(b.log_mean()[:, i], ref[:, sel].mean(axis=1), rtol=2e-5)
    np.testing.assert_array_equal(b.log_counts, np.diff(edges))
    np.testing.assert_allclose(b.fine_mean(), np.stack([diagnostics.bucket_means(r, 32) for r in ref]), rtol=2e-5)


def test_build_mitigations(tiny_model):
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 65), 0, 257), np.int32)
    built, described = named_mitigations.build_mitigations(
        ["none", "forget_more", "dt_scale", "state_norm", "sliding_window", "forget_more+dt_scale"],
        tiny_model,
        train_len=64,
        params={"dt_scale": {"scale": 0.25}},
        calibration_tokens=lambda: tokens,
    )
    assert built["none"] is None
    assert built["dt_scale"].dt_scale == 0.25 and built["sliding_window"].window == 64
    assert np.shape(built["state_norm"].max_norm) == (2, tiny_model.config.nheads)
    assert float(np.min(built["state_norm"].max_norm)) > 0
    combo = built["forget_more+dt_scale"]
    assert float(combo.alpha_scale) == pytest.approx(0.9999) and float(combo.dt_scale) == 0.25
    assert described["state_norm"]["state_norm"]["calibration_len"] == 64
    with pytest.raises(ValueError, match="unknown mitigation"):
        named_mitigations.build_mitigations(["forget_less"], tiny_model, train_len=64)


# --------------------------------------------------------------------------------------------------
# Evaluators end to end
# --------------------------------------------------------------------------------------------------


def test_loss_and_passkey_modes_end_to_end_from_pretrained_dir(pretrained_dir):
    assert loading.checkpoint_kind(pretrained_dir) == "pretrained"
    config = load_config("default")
    config.checkpoint = pretrained_dir
    config.train_len = 64
    config.output_dir = os.path.join(pretrained_dir, "out")
    config.mitigations = "none,forget_more,state_norm,sliding_window"
    config.data.corpus = "tiny"
    config.loss.sources = "documents,newlines"
    config.loss.length = "8x"
    config.loss.chunk_len = 256
    config.loss.num_prompts = config.loss.batch_size = 2
    config.passkey.context_lengths = "100,300,1x"  # 64 and 100 are below the shortest byte prompt
    config.passkey.num_depths = 4
    config.passkey.max_new_tokens = 3
    results = evaluators.evaluate(config)
    out = config.output_dir
    for name in (
        "config.json",
        "loss_vs_position.json",
        "loss_vs_position_fine.npz",
        "loss_vs_position_documents.png",
        "loss_vs_position_newlines.png",
        "passkey.json",
        "passkey.png",
        "summary.md",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert set(results["files"]) == set(os.listdir(out))

    lv = json.load(open(os.path.join(out, "loss_vs_position.json")))
    assert lv["model"]["tokenizer"] == "byte" and lv["model"]["state_size"] == 2 * 4 * 16 * 8
    assert lv["length"] == 512 and lv["model"]["heldout"]["corpus"] == "tiny" and lv["complete"]
    # A context-free model of the held-out documents: their unigram entropy, in nats.
    tok = get_tokenizer("byte")
    docs = streams.heldout_documents(streams.HeldOutData(corpus="tiny"))
    counts = np.bincount(np.concatenate([tok.encode(d.text) for d in docs] + [[tok.eos_id] * len(docs)]))
    p = counts[counts > 0] / counts.sum()
    want_unigram = float(-(p * np.log(p)).sum())
    assert lv["unigram_loss"] == pytest.approx({"documents": want_unigram, "newlines": want_unigram}, rel=1e-9)
    assert lv["sources"]["newlines"]["unigram_loss"] == pytest.approx(want_unigram, rel=1e-9)
    edges = np.asarray(lv["bucket_edges"])
    assert edges[0] == 1 and edges[-1] == 513 and np.all(np.diff(edges) > 0) and 65 in edges
    fine = np.load(os.path.join(out, "loss_vs_position_fine.npz"))
    assert int(fine["fine_width"]) == lv["fine_width"] == 32 and fine["documents__none"].shape == (2, 16)
    for source in ("documents", "newlines"):
        curves = lv["sources"][source]["curves"]
        assert list(curves) == ["none", "forget_more", "state_norm", "sliding_window"]
        for name, c in curves.items():
            pos, loss = np.asarray(c["positions"]), np.asarray(c["loss"], float)
            assert np.all(np.diff(pos) > 0) and pos[0] >= 1 and pos[-1] <= 512
            assert np.all(np.isfinite(loss)) and np.all(loss > 0) and np.all(loss < 2 * np.log(257))
            np.testing.assert_allclose(c["perplexity"], np.exp(loss), rtol=1e-6)
            assert np.array_equal(c["count"], np.diff(edges))
            assert len(c["per_prompt_loss"]) == 2
            # The verdict is the rule applied to the fixed buckets written to the npz.
            want = diagnostics.collapse_verdict(
                fine[f"{source}__{name}"].mean(axis=0), 64, width=32, unigram_loss=lv["unigram_loss"][source]
            ).to_json()
            assert c["collapse"] == pytest.approx(want)
    # the mitigation changes the curve; the windowed state equals the full state before the window fills
    none, fm = (np.asarray(lv["sources"]["documents"]["curves"][k]["loss"]) for k in ("none", "forget_more"))
    sw = np.asarray(lv["sources"]["documents"]["curves"]["sliding_window"]["loss"])
    assert not np.allclose(none, fm)
    np.testing.assert_allclose(sw[edges[1:] <= 65], none[edges[1:] <= 65], rtol=1e-4)

    pk = json.load(open(os.path.join(out, "passkey.json")))
    assert pk["context_lengths"] == [300] and pk["skipped_context_lengths"] == [64, 100]
    r = pk["results"]["none"]
    acc = np.asarray(r["accuracy"])
    assert acc.shape == (4, 1) and np.all((acc >= 0) & (acc <= 1))
    assert len(r["samples"]) == 4 and all(s["prompt_len"] <= 300 for s in r["samples"])
    assert all(len(s["passkey"]) == 5 for s in r["samples"])
    assert [s["depth_bucket"] for s in r["samples"]] == [0, 1, 2, 3]
    assert all(d / 4 <= s["depth"] < (d + 1) / 4 for d, s in enumerate(r["samples"]))
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| documents | forget_more |" in summary and "## Passkey retrieval" in summary
    assert results["model"]["kind"] == "pretrained" and results["summary"] == summary


def direct_retention(model, tokens, positions):
    """First-token retention from each layer's own dt and A over the whole prompt at once (no streaming):
    ``{t: (layers, heads)}``, the mean over prompts of ``exp(sum_{j=2..t} dt_j A)`` (1-based j)."""
    cfg = model.config
    residual = jnp.take(model.embedding[...], jnp.asarray(tokens), axis=0)  # (b, T, d_model)
    out = {t: [] for t in positions}
    for block in model.layers:
        inputs = block.mixer.ssm_inputs(rms_norm(residual, block.norm_weight[...], cfg.norm_eps, jnp.float32))
        log_alpha = np.asarray(inputs.dt * inputs.A, np.float64)  # (b, T, heads)
        for t in positions:
            out[t].append(np.exp(log_alpha[:, 1:t].sum(axis=1)).mean(axis=0))  # (heads,)
        residual, _ = block(residual)
    return {t: np.stack(v) for t, v in out.items()}  # (layers, heads)


def test_states_mode_finds_a_never_forgetting_head_and_its_retention(tiny_model, tmp_path):
    """A head with alpha ~ 1 and a large dt accumulates without bound: the states mode must name it (and only
    it) as the fastest-growing head and an outlier, report its growth consistently, give it a first-token
    retention ~1 where the other heads forget, match the retention computed directly from dt and A, and write
    the figures."""
    sick = nnx.clone(tiny_model)
    sick.layers[1].mixer.A_log[...] = sick.layers[1].mixer.A_log[...].at[3].set(-20.0)  # A ~ -2e-9: alpha ~ 1
    sick.layers[1].mixer.dt_bias[...] = sick.layers[1].mixer.dt_bias[...].at[3].set(2.0)
    path = str(tmp_path / "sick")
    save_hf(sick, path)
    config = load_config("collapse_study")
    config.checkpoint = path
    config.train_len = 32
    config.output_dir = str(tmp_path / "out")
    config.modes = "states"
    config.data.corpus = "tiny"
    config.states.length = "16x"
    config.states.num_prompts = 2
    results = evaluators.evaluate(config)
    st = json.load(open(os.path.join(config.output_dir, "states.json")))
    assert st["length"] == 512 and st["every"] == 4 and st["positions"][-1] == 512
    assert st["most_grown_head"] == [1, 3]
    norm = np.asarray(st["norm"])  # (records, layers, heads), averaged over the 2 prompts
    assert norm.shape == (128, 2, 4)
    growth = np.asarray(st["norm_growth"])
    inside = np.asarray(st["positions"]) <= 32
    np.testing.assert_allclose(growth, norm[~inside].max(0) / norm[inside].max(0), rtol=1e-6)
    assert growth[1, 3] > 4.0 and st["max_norm_growth"] == pytest.approx(growth[1, 3])
    assert np.delete(growth.ravel(), 1 * 4 + 3).max() < 4.0  # the healthy heads stay in range
    sustained = np.asarray(st["sustained_norm_growth"])
    late = np.asarray(st["positions"]) > 256
    np.testing.assert_allclose(sustained, np.median(norm[late], 0) / np.median(norm[inside], 0), rtol=1e-6)
    assert sustained[1, 3] > 10.0 and np.delete(sustained.ravel(), 1 * 4 + 3).max() < 4.0
    assert [(o["layer"], o["head"]) for o in st["outliers"]] == [(1, 3)]

    tokens = streams.make_stream(
        "documents", get_tokenizer("byte"), streams.HeldOutData(corpus="tiny"), num_rows=2, seed=config.seed + states.PROMPT_SEED_OFFSET
    ).take([0, 1], 512)
    want = direct_retention(sick, tokens, (32, 512))
    for key, t in (("1x", 32), ("16x", 512)):
        got = st["retention"][key]
        assert got["position"] == t
        np.testing.assert_allclose(got["retention"], want[t], rtol=1e-4, atol=1e-30)
    assert st["retention"]["16x"]["retention"][1][3] > 0.999 > np.max(np.delete(want[512].ravel(), 1 * 4 + 3))
    for name in (
        "states_state_norm.png",
        "states_state_norm_heatmap.png",
        "states_retention.png",
        "states_state_histograms.png",
        "states_traces.png",
    ):
        assert os.path.getsize(os.path.join(config.output_dir, name)) > 0, name
    assert "(layer 1, head 3)" in results["summary"] and "retention at 16x T_train" in results["summary"]


def test_passkey_batching_with_planted_answers(monkeypatch, tiny_model):
    """A stub model that reads the passkey from its prompt and answers it only for prompts shorter than 600
    tokens: accuracy must be exactly 1 below and 0 above, whatever the batching and padding."""
    tok = get_tokenizer("byte")
    calls = []

    def fake_generate(model, prompt_ids, max_new_tokens, **kwargs):
        calls.append(prompt_ids.shape)
        out = []
        for row in np.asarray(prompt_ids):
            key = re.search(r"The passkey is (\d{5})", tok.decode(row.tolist())).group(1)
            answer = f" {key}." if len(row) < 600 else " 00000"
            out.append((tok.encode(answer) + [32] * max_new_tokens)[:max_new_tokens])
        return np.asarray(out)

    monkeypatch.setattr(passkey.inference, "generate", fake_generate)
    em = eval_model(tiny_model, "byte", 512, {"none": None})
    res = passkey.sweep(em, context_lengths=[300, 500, 1000, 2000], num_depths=10, trials=3, batch_size=8, seed=1)
    r = res["results"]["none"]
    np.testing.assert_array_equal(r["accuracy_by_length"], [1, 1, 0, 0])
    assert np.asarray(r["accuracy"]).shape == (10, 4) and r["t_recall"] == 500
    assert all(shape[0] == 8 for shape in calls)  # one batch shape: partial batches are filled
    assert len(calls) == 4 * 4  # 30 prompts per length (one token length each) -> 4 batches of 8
    # The same seed gives the same prompts.
    again = passkey.sweep(em, context_lengths=[300], num_depths=10, trials=3, seed=1)
    assert [s["passkey"] for s in again["results"]["none"]["samples"]] == [s["passkey"] for s in r["samples"][:30]]


def test_passkey_with_neox_tokenizer():
    model = Mamba2LM(Mamba2Config(**dict(TINY, vocab_size=50277, n_layer=1)), rngs=nnx.Rngs(0))
    res = passkey.sweep(eval_model(model, "neox", 128, {"dt_scale": M.dt_scale(0.5)}), context_lengths=[40, 160], num_depths=3, seed=0)
    assert res["max_new_tokens"] == 6 and res["context_lengths"] == [160] and res["skipped_context_lengths"] == [40]
    r = res["results"]["dt_scale"]
    assert np.all((np.asarray(r["accuracy"]) >= 0) & (np.asarray(r["accuracy"]) <= 1))
    assert {s["prompt_len"] for s in r["samples"]} <= set(range(150, 161))  # NeoX: within a few tokens
    assert all(isinstance(s["generated"], str) for s in r["samples"])


# --------------------------------------------------------------------------------------------------
# A train.py work directory: loading, and several checkpoints of one run
# --------------------------------------------------------------------------------------------------


def test_loading_a_workdir_reads_its_training_facts(trained_run):
    from ssm_jax import train_lib

    assert train_lib.load_model_from_workdir is loading.load_model_from_workdir  # kept for existing callers
    assert loading.checkpoint_kind(trained_run) == "workdir" and loading.resolve_step(trained_run, -1) == 2
    first = loading.load_model(trained_run, step=1)
    assert (first.kind, first.step, first.tokenizer_name, first.train_len) == ("workdir", 1, "byte", 64)
    assert first.data == {"corpus": "tiny", "validation_fraction": 0.1, "split_seed": 0, "local_name": "default"}
    assert loading.load_model(trained_run, train_len=128).train_len == 128


def test_several_checkpoints_of_one_run(trained_run, tmp_path):
    config = load_config("default")
    config.checkpoint = trained_run
    config.steps = "1,-1"
    config.output_dir = str(tmp_path / "steps")
    config.modes = "loss_vs_position"
    config.mitigations = "none"
    config.loss.length = "4x"
    config.loss.chunk_len = 256
    config.loss.num_prompts = config.loss.batch_size = 2
    results = evaluators.evaluate(config)
    index = json.load(open(tmp_path / "steps" / "index.json"))
    assert index["steps"] == [1, 2] and [r["output_dir"] for r in index["runs"]] == ["step_1", "step_2"]
    curves = {}
    for entry in index["runs"]:
        lv = json.load(open(tmp_path / "steps" / entry["output_dir"] / "loss_vs_position.json"))
        assert lv["model"]["step"] == entry["step"] and lv["train_len"] == 64 and lv["length"] == 256
        assert lv["model"]["heldout"] == {
            "corpus": "tiny",
            "validation_fraction": 0.1,
            "split_seed": 0,
            "local_data_dir": "",
            "local_name": "default",
            "tokens_dir": "",
        }
        collapse = lv["sources"]["documents"]["curves"]["none"]["collapse"]
        assert entry["headline"]["documents/none"] == {k: collapse[k] for k in entry["headline"]["documents/none"]}
        curves[entry["step"]] = np.asarray(lv["sources"]["documents"]["curves"]["none"]["loss"])
        assert os.path.isfile(tmp_path / "steps" / entry["output_dir"] / "summary.md")
    assert np.abs(curves[1] - curves[2]).max() > 1e-3  # two different checkpoints were evaluated
    assert "| 1 | documents/none |" in results["summary"] and "| 2 | documents/none |" in results["summary"]
    assert open(tmp_path / "steps" / "summary.md").read() == results["summary"]


# --------------------------------------------------------------------------------------------------
# The config: every field validated, every error site names its field; the command line
# --------------------------------------------------------------------------------------------------


def test_configs_and_helpers(tmp_path):
    write_fake_run(str(tmp_path), 1000, 64, collapsed=False, accuracy_by_length={64: 1.0})
    for name in ("default", "loss_vs_position", "passkey", "capacity", "collapse_study"):
        c = load_config(name)
        c.checkpoint, c.capacity.runs = "random", str(tmp_path)
        eval_config.validate_config(c)  # every shipped config is valid
    assert eval_config.parse_length(load_config("loss_vs_position").loss.length, 256) >= 1_000_000
    assert eval_config.parse_lengths("0.5x, 1x,4096,1x", 256) == [128, 256, 4096]
    assert eval_config.parse_steps("1000, 2000,-1") == [1000, 2000, -1]
    assert loading.tokenizer_name_for_vocab(272) == "byte" and loading.tokenizer_name_for_vocab(50288) == "neox"
    collapse_study = load_config("collapse_study")
    for train_len in (128, 256, 1024, 4096, 16384):  # the byte study's T_train and the token study's
        eval_config.validate_for_model(collapse_study, train_len, streams.HeldOutData())


# (overrides, the field the error names, part of the reason). Placeholders: <file> an existing file, <empty_dir>
# an empty directory, <missing> a path that does not exist, <workdir> a train.py run with steps 1 and 2, <run> an
# evaluation directory with curves for "none" only, <local_model> / <pg19_model> a from_pretrained directory whose
# training config names a local corpus that is not there / a corpus we do not have. The others use checkpoint
# "random" with T_train 32, the tiny corpus and mode loss_vs_position.
ERROR_SITES = [
    # what to evaluate
    ({"modes": "loss_vs_position,bogus"}, "modes", "unknown mode 'bogus'"),
    ({"modes": ""}, "modes", "lists no mode"),
    ({"checkpoint": ""}, "checkpoint", "is required by the modes"),
    ({"checkpoint": "<missing>"}, "checkpoint", "is not a directory"),
    ({"checkpoint": "<file>"}, "checkpoint", "is not a directory"),
    ({"checkpoint": "<empty_dir>"}, "checkpoint", "holds neither checkpoints/"),
    ({"steps": "last"}, "steps", "distinct checkpoint steps"),
    ({"steps": "1,1"}, "steps", "distinct checkpoint steps"),
    ({"steps": "-2"}, "steps", "distinct checkpoint steps"),
    ({"steps": "5"}, "steps", "a random checkpoint takes only '-1'"),
    ({"checkpoint": "<workdir>", "steps": "1,999"}, "steps", "no checkpoint for step 999"),
    ({"random_model.headdim": 48}, "random_model", "must be a multiple of headdim"),
    ({"tokenizer": "gpt2"}, "tokenizer", "must be one of"),
    ({"tokenizer": "neox"}, "tokenizer", "the tokenizer has 50277 ids"),
    ({"random_model.vocab_size": 1000}, "tokenizer", "cannot tell the tokenizer"),
    ({"train_len": -1}, "train_len", "integer >= 0"),
    ({"dtype": "float64"}, "dtype", "must be one of"),
    ({"output_dir": "<file>"}, "output_dir", "not a directory"),
    ({"seed": -1}, "seed", "integer >= 0"),
    # mitigations
    ({"mitigations": "none,forget_less"}, "mitigations", "'forget_less' is not a mitigation"),
    ({"mitigations": ""}, "mitigations", "'' is not a mitigation"),
    ({"forget_more.alpha_scale": 1.5}, "forget_more.alpha_scale", "(0, 1]"),
    ({"forget_more.b_scale": 0.0}, "forget_more.b_scale", "> 0"),
    ({"dt_scale.scale": -1.0}, "dt_scale.scale", "> 0"),
    ({"state_norm.margin": 0.0}, "state_norm.margin", "> 0"),
    ({"state_norm.reduce": "mean"}, "state_norm.reduce", "must be one of 'max', 'final'"),
    ({"state_norm.num_prompts": 0}, "state_norm.num_prompts", "integer >= 1"),
    ({"sliding_window.window": -1}, "sliding_window.window", "integer >= 0"),
    # data
    ({"data.corpus": "wiki"}, "data.corpus", "must be one of"),
    ({"data.corpus": "local"}, "data.local_data_dir", "build_local_corpus"),
    ({"data.validation_fraction": 1.5}, "data.validation_fraction", "[0, 1)"),
    ({"data.split_seed": -2}, "data.split_seed", "integer >= -1"),
    ({"checkpoint": "<local_model>", "data.corpus": ""}, "data.local_data_dir", "the local corpus the model trained"),
    ({"checkpoint": "<pg19_model>", "data.corpus": ""}, "data.corpus", "the training config names corpus 'pg19'"),
    ({"data.validation_fraction": 0.95}, "data.validation_fraction", "leaves no training document"),
    # loss
    ({"loss.sources": "documents,tweets"}, "loss.sources", "unknown source 'tweets'"),
    ({"loss.length": "abc"}, "loss.length", "a length >= 1"),
    ({"loss.length": "0"}, "loss.length", "a length >= 1"),
    ({"loss.length": "8x,16x"}, "loss.length", "a length >= 1"),
    ({"loss.num_prompts": 0}, "loss.num_prompts", "integer >= 1"),
    ({"loss.batch_size": 0}, "loss.batch_size", "integer >= 1"),
    ({"loss.chunk_len": 0}, "loss.chunk_len", "integer >= 1"),
    ({"loss.num_buckets": 0}, "loss.num_buckets", "integer >= 1"),
    ({"loss.bucket_width": -1}, "loss.bucket_width", "integer >= 0"),
    ({"loss.bucket_width": 32}, "loss.bucket_width", "spans 1 bucket(s)"),
    ({"loss.length": "32"}, "loss.length", "needs at least 33"),
    ({"loss.collapse_factor": 1.0}, "loss.collapse_factor", "> 1"),
    ({"loss.unigram_loss": -0.5}, "loss.unigram_loss", ">= 0"),
    # passkey
    ({"modes": "passkey", "passkey.context_lengths": ""}, "passkey.context_lengths", "lengths >= 1"),
    ({"modes": "passkey", "passkey.context_lengths": "1x,abc"}, "passkey.context_lengths", "lengths >= 1"),
    ({"modes": "passkey", "passkey.context_lengths": "0.001x"}, "passkey.context_lengths", "below 1 token"),
    ({"modes": "passkey", "passkey.context_lengths": "0.5x,1x"}, "passkey.context_lengths", "every length [16, 32] (T_train=32) is too short"),
    ({"passkey.num_depths": 0}, "passkey.num_depths", "integer >= 1"),
    ({"passkey.trials": 0}, "passkey.trials", "integer >= 1"),
    ({"passkey.batch_size": 0}, "passkey.batch_size", "integer >= 1"),
    ({"passkey.max_new_tokens": -1}, "passkey.max_new_tokens", "integer >= 0"),
    ({"passkey.chunk_len": 0}, "passkey.chunk_len", "integer >= 1"),
    # states
    ({"states.length": "-2x"}, "states.length", "a length >= 1"),
    ({"modes": "states", "states.length": "1x"}, "states.length", "accepted >= 64"),
    ({"modes": "states", "states.every": 5}, "states.every", "must divide T_train=32"),
    ({"states.every": -1}, "states.every", "integer >= 0"),
    ({"states.outlier_ratio": 0.0}, "states.outlier_ratio", "> 0"),
    ({"states.num_prompts": 0}, "states.num_prompts", "integer >= 1"),
    # capacity
    ({"capacity.mitigation": "forget_less"}, "capacity.mitigation", "'forget_less' is not a mitigation"),
    ({"capacity.source": "tweets"}, "capacity.source", "must be one of"),
    ({"modes": "capacity"}, "capacity.runs", "lists no evaluation directories"),
    ({"modes": "capacity", "capacity.runs": "<empty_dir>"}, "capacity.runs", "neither loss_vs_position.json"),
    (
        {"modes": "capacity", "capacity.runs": "<run>", "capacity.mitigation": "dt_scale"},
        "capacity.runs",
        "no collapse verdict for config.capacity.source='documents', config.capacity.mitigation='dt_scale'",
    ),
]


def _placeholder(value, tmp_path, request):
    if not isinstance(value, str) or not value.startswith("<"):
        return value
    path = str(tmp_path / value.strip("<>"))
    if value == "<file>":
        open(path, "w").close()
    elif value == "<empty_dir>":
        os.makedirs(path)
    elif value == "<workdir>":
        return request.getfixturevalue("trained_run")
    elif value == "<run>":
        write_fake_run(path, 1000, 32, collapsed=False, accuracy_by_length={64: 1.0})
    elif value in ("<local_model>", "<pg19_model>"):  # a model whose training config names its corpus
        shutil.copytree(request.getfixturevalue("pretrained_dir"), path)
        data = {"corpus": "local", "local_data_dir": str(tmp_path / "gone")} if value == "<local_model>" else {"corpus": "pg19"}
        with open(os.path.join(path, "ssm_jax_train.json"), "w") as f:
            json.dump({"data": dict(data, seq_len=32)}, f)
    return path


@pytest.mark.parametrize("overrides, field, why", ERROR_SITES, ids=[f"{field}:{why[:24]}" for _, field, why in ERROR_SITES])
def test_every_error_site_names_its_field(overrides, field, why, tmp_path, request):
    config = load_config("default")
    config.update(checkpoint="random", train_len=32, output_dir=str(tmp_path / "out"), mitigations="none", modes="loss_vs_position")
    config.data.corpus = "tiny"
    for key, value in overrides.items():
        node = config
        *parents, name = key.split(".")
        for part in parents:
            node = node[part]
        node[name] = _placeholder(value, tmp_path, request)
    with pytest.raises(ValueError) as err:
        evaluators.evaluate(config)
    message = str(err.value)
    assert f"config.{field}=" in message and why in message, message
    assert not os.path.exists(tmp_path / "out" / "summary.md")  # nothing was evaluated


def test_eval_py_command_line(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "eval.py"),
        f"--config={ROOT}/configs/eval/default.py",
        "--config.checkpoint=random",
        "--config.train_len=32",
        f"--config.output_dir={out}",
        "--config.modes=loss_vs_position",
        "--config.mitigations=none,dt_scale",
        "--config.loss.length=128",
        "--config.loss.chunk_len=128",
        "--config.data.corpus=tiny",
        "--config.random_model.n_layer=1",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# Evaluation summary" in proc.stdout and "| documents | dt_scale |" in proc.stdout
    lv = json.load(open(out / "loss_vs_position.json"))
    assert lv["model"]["kind"] == "random" and lv["model"]["n_layer"] == 1 and lv["length"] == 128
    # A bad field reaches the user named, before any model is built.
    proc = subprocess.run(cmd + ["--config.loss.length=-3"], cwd=str(tmp_path), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "config.loss.length='-3': must be a length >= 1" in proc.stderr
    proc = subprocess.run(cmd + ["stray"], cwd=str(tmp_path), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "unexpected arguments: ['stray']" in proc.stderr


def test_stream_benchmark_tiny(tmp_path):
    out = tmp_path / "stream.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "stream_1m.py"),
        "--tiny",
        "--tokens",
        "3000",
        "--chunk_len",
        "1024",
        "--mitigations",
        "none,forget_more",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| forget_more |" in proc.stdout
    data = json.load(open(out))
    assert [r["mitigation"] for r in data["results"]] == ["none", "forget_more"]
    for r in data["results"]:
        assert r["tokens_streamed"] == 3000 and r["seconds"] > 0 and not r["extrapolated"]
        assert 0 < r["mean_loss"] < 2 * np.log(257)


def test_windowed_curves_stream_fewer_rows_where_the_band_is_large():
    from ssm_jax.evaluators.loss_vs_position import WINDOW_BAND_BYTES, windowed_rows_per_call

    assert windowed_rows_per_call(16, 2048, None, 16) == 16  # no window: the configured batch
    assert windowed_rows_per_call(16, 2048, 1024, 16) == 16  # T_train 1,024: 0.2 GB a row, all fit
    # T_train 8,192 (the study's 72 GiB failure): one row at a time, under the budget
    rows = windowed_rows_per_call(16, 2048, 8192, 16)
    assert rows == 1 and 4 * (2048 + 8192) * 8192 * 16 * rows <= WINDOW_BAND_BYTES
    assert windowed_rows_per_call(16, 2048, 4096, 16) == 5  # 1.5 GiB a row
    assert windowed_rows_per_call(2, 1 << 20, 1 << 20, 64) == 1  # never zero rows


def test_a_stopped_loss_evaluation_keeps_its_finished_curves(tiny_model, tmp_path, monkeypatch):
    """The JSON and npz are rewritten after every curve: a stop during the second curve leaves the first."""
    from ssm_jax.evaluators import loss_vs_position

    real, calls = loss_vs_position.stream_bucketed_losses, []

    def stop_on_the_second(*args, **kwargs):
        calls.append(kwargs["label"])
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped at the deadline")
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_vs_position, "stream_bucketed_losses", stop_on_the_second)
    config = eval_config.base_config()
    config.output_dir = str(tmp_path)
    config.loss.update(length="4x", num_prompts=2, batch_size=2, chunk_len=64, num_buckets=8, sources="documents")
    model = eval_model(tiny_model, "byte", 64, {"none": None, "forget_more": M.forget_more()})
    with pytest.raises(KeyboardInterrupt):
        loss_vs_position.run(model, config)
    assert calls == ["documents/none", "documents/forget_more"]
    partial = json.load(open(tmp_path / "loss_vs_position.json"))
    assert partial["complete"] is False and list(partial["sources"]["documents"]["curves"]) == ["none"]
    assert list(np.load(tmp_path / "loss_vs_position_fine.npz")) == ["fine_width", "documents__none"]
