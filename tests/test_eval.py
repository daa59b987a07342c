"""Evaluation (eval.py, ssm_jax.eval_lib, ssm_jax.capacity): every mode end to end on tiny models, with the
outputs' contents checked against planted answers (known collapse points, known fit parameters, a model
stub that answers the passkey only below a known length)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from ssm_jax import Mamba2Config, Mamba2LM, capacity, eval_lib, inference, save_hf
from ssm_jax import mitigations as M
from ssm_jax.data import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(d_model=32, n_layer=2, vocab_size=257, d_state=8, headdim=16, chunk_size=16, ssd_impl="xla")


def load_config(name):
    spec = importlib.util.spec_from_file_location(f"eval_cfg_{name}", os.path.join(ROOT, "configs", "eval", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def tiny_model():
    return Mamba2LM(Mamba2Config(**TINY), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def pretrained_dir(tiny_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_tiny"))
    save_hf(tiny_model, path)
    return path


# --------------------------------------------------------------------------------------------------
# Capacity: the collapse rule, T_forget / T_recall and the fits recover planted answers
# --------------------------------------------------------------------------------------------------


def synthetic_losses(length, collapse_at=None, seed=0):
    """Per-position loss: high at the start, decaying to a plateau; x4 after ``collapse_at``; noisy."""
    t = np.arange(1, length + 1)
    loss = 1.5 + 3.0 / np.sqrt(t) + 0.05 * np.random.default_rng(seed).standard_normal(length)
    if collapse_at is not None:
        loss = np.where(t >= collapse_at, loss + 12.0 * np.clip((t - collapse_at) / 50.0, 0, 1), loss)
    return loss


def test_collapse_rule_finds_the_planted_collapse_and_agrees_with_diagnostics():
    from ssm_jax import diagnostics

    train_len, length = 256, 4096
    width = capacity.smoothing_width(train_len)
    for collapse_at in (None, 700, 2500):
        per_pos = np.stack([synthetic_losses(length, collapse_at, seed) for seed in range(3)])
        report = capacity.detect_collapse_bucketed(capacity.bucket_per_position_losses(per_pos, width), width,
                                                   train_len)
        assert report.collapsed == (collapse_at is not None)
        reference = diagnostics.detect_collapse(per_pos, train_len)
        assert reference.collapsed == report.collapsed
        if collapse_at is not None:
            # The loss crosses 2x the reference (~4.5) within ~40 positions of the planted onset.
            assert collapse_at <= report.first_position + width and report.first_position <= collapse_at + 60
            assert report.max_ratio > 2
        else:
            assert report.first_position is None and report.max_ratio < 1.0
    with pytest.raises(ValueError, match="more than"):
        capacity.detect_collapse_bucketed(np.ones(8), 32, 256)


def test_t_forget_and_t_recall_from_synthetic_runs():
    # Models with T_train < 1024 collapse (their loss explodes at 3 T_train), the others do not.
    runs = []
    for train_len in (256, 512, 1024, 2048):
        width = capacity.smoothing_width(train_len)
        curve = capacity.bucket_per_position_losses(
            synthetic_losses(8192, 3 * train_len if train_len < 1024 else None), width)
        runs.append({"train_len": train_len,
                     "collapsed": capacity.detect_collapse_bucketed(curve, width, train_len).collapsed})
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
    os.makedirs(directory, exist_ok=True)
    model = {"state_size": state_size, "train_len": train_len}
    eval_lib.write_json(os.path.join(directory, "loss_vs_position.json"), {
        "model": model, "length": 16 * train_len,
        "sources": {"documents": {"curves": {"none": {"collapse": {"collapsed": collapsed}}}}}})
    lengths = sorted(accuracy_by_length)
    eval_lib.write_json(os.path.join(directory, "passkey.json"), {
        "model": model, "context_lengths": lengths,
        "results": {"none": {"accuracy_by_length": [accuracy_by_length[n] for n in lengths]}}})


def test_capacity_mode_end_to_end_recovers_planted_laws(tmp_path):
    # Planted: T_forget(K) = 2 N_S(M) + 1 and T_recall(K) = 3 (1.5 ** N_S - 1) + 2, on grids of lengths.
    sizes_m = [1.0, 2.0, 3.0, 4.0]
    for n_s in sizes_m:
        true_forget = int((2 * n_s + 1) * 1024)
        true_recall = int(round((3 * (1.5 ** n_s - 1) + 2) * 1024))
        for train_len in sorted({true_forget // 2, true_forget, true_forget * 2}):
            lengths = [true_recall // 2, true_recall, true_recall * 2]
            write_fake_run(str(tmp_path / f"ns{n_s}_t{train_len}"), int(n_s * 1e6), train_len,
                           collapsed=train_len < true_forget,
                           accuracy_by_length={n: 1.0 if n <= true_recall else 0.1 for n in lengths})
    config = load_config("capacity")
    config.capacity.runs = str(tmp_path / "ns*")
    config.output_dir = str(tmp_path / "study")
    results = eval_lib.run(config)
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
    assert "T_forget = 2.000 N_S + 1.000" in results["summary"]


# --------------------------------------------------------------------------------------------------
# Loss vs position
# --------------------------------------------------------------------------------------------------


def test_bucket_edges():
    edges = eval_lib.log_bucket_edges(100_000, 40, include=(257,))
    assert edges[0] == 1 and edges[-1] == 100_001 and 257 in edges
    assert np.all(np.diff(edges) > 0)
    widths = np.diff(edges)
    assert widths[-1] > 100 * widths[0]  # log-spaced
    assert np.array_equal(eval_lib.log_bucket_edges(3, 10), [1, 2, 3, 4])


def test_streams_are_seeded_and_consecutive():
    tok = get_tokenizer("byte")
    a = eval_lib.make_stream("documents", tok, num_rows=2, seed=3, corpus="tiny", validation_fraction=0.25)
    b = eval_lib.make_stream("documents", tok, num_rows=2, seed=3, corpus="tiny", validation_fraction=0.25)
    first = np.concatenate([a.take([0, 1], 5000), a.take([0, 1], 40000)], axis=1)  # > held-out text: repeats
    np.testing.assert_array_equal(first, b.take([0, 1], 45000))
    assert not np.array_equal(first[0], first[1])  # each row its own document order
    assert (first == tok.eos_id).sum() >= 4
    held_out = eval_lib.heldout_documents("tiny", 0.25, 0)
    assert len(held_out) == 2 and tok.decode(first[0, :200]) in "".join(d.text for d in held_out) + "\n"
    nl = eval_lib.make_stream("newlines", tok, num_rows=1, seed=0)
    assert set(nl.take([0], 100).ravel()) == {10}


def test_bucketed_streaming_equals_per_token_losses(tiny_model):
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 301), 0, 257), np.int32)
    stream = eval_lib.DocumentStream([tokens[0], tokens[1]], eos_id=256, num_rows=2, seed=0)
    rows = stream.take([0, 1], 301)  # what the streamer will see (same seed)
    stream = eval_lib.DocumentStream([tokens[0], tokens[1]], eos_id=256, num_rows=2, seed=0)
    edges = eval_lib.log_bucket_edges(300, 12)
    mit = M.forget_more(0.99, 0.5)
    b = eval_lib.stream_bucketed_losses(tiny_model, stream, 300, num_prompts=2, log_edges=edges, fine_width=32,
                                        batch_size=1, chunk_len=64, mitigation=mit)
    ref = inference.stream_losses(tiny_model, rows, chunk_len=300, mitigation=mit)  # (2, 300)
    t = np.arange(1, 301)
    for i in range(len(edges) - 1):
        sel = (t >= edges[i]) & (t < edges[i + 1])
        np.testing.assert_allclose(b.log_mean()[:, i], ref[:, sel].mean(axis=1), rtol=2e-5)
    np.testing.assert_array_equal(b.log_counts, np.diff(edges))
    np.testing.assert_allclose(b.fine_mean()[:, 0], ref[:, :32].mean(axis=1), rtol=2e-5)
    np.testing.assert_allclose(b.fine_mean()[:, -1], ref[:, 288:].mean(axis=1), rtol=2e-5)


def test_build_mitigations(tiny_model):
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 65), 0, 257), np.int32)
    built, described = eval_lib.build_mitigations(
        ["none", "forget_more", "dt_scale", "state_norm", "sliding_window", "forget_more+dt_scale"], tiny_model,
        train_len=64, params={"dt_scale": {"scale": 0.25}}, calibration_tokens=lambda: tokens)
    assert built["none"] is None
    assert built["dt_scale"].dt_scale == 0.25 and built["sliding_window"].window == 64
    assert np.shape(built["state_norm"].max_norm) == (2, tiny_model.config.nheads)
    assert float(np.min(built["state_norm"].max_norm)) > 0
    combo = built["forget_more+dt_scale"]
    assert float(combo.alpha_scale) == pytest.approx(0.9999) and float(combo.dt_scale) == 0.25
    assert described["state_norm"]["state_norm"]["calibration_len"] == 64
    with pytest.raises(ValueError, match="unknown mitigation"):
        eval_lib.build_mitigations(["forget_less"], tiny_model, train_len=64)


def test_loss_and_passkey_modes_end_to_end_from_pretrained_dir(pretrained_dir):
    assert eval_lib.checkpoint_kind(pretrained_dir) == "pretrained"
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
    results = eval_lib.run(config)
    out = config.output_dir
    for name in ("config.json", "loss_vs_position.json", "loss_vs_position_fine.npz", "loss_vs_position_documents.png",
                 "loss_vs_position_newlines.png", "passkey.json", "passkey.png", "summary.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name

    lv = json.load(open(os.path.join(out, "loss_vs_position.json")))
    assert lv["model"]["tokenizer"] == "byte" and lv["model"]["state_size"] == 2 * 4 * 16 * 8
    assert lv["length"] == 512 and lv["corpus"] == "tiny"
    edges = np.asarray(lv["bucket_edges"])
    assert edges[0] == 1 and edges[-1] == 513 and np.all(np.diff(edges) > 0) and 65 in edges
    for source in ("documents", "newlines"):
        curves = lv["sources"][source]["curves"]
        assert list(curves) == ["none", "forget_more", "state_norm", "sliding_window"]
        for c in curves.values():
            pos, loss = np.asarray(c["positions"]), np.asarray(c["loss"], float)
            assert np.all(np.diff(pos) > 0) and pos[0] >= 1 and pos[-1] <= 512
            assert np.all(np.isfinite(loss)) and np.all(loss > 0) and np.all(loss < 2 * np.log(257))
            np.testing.assert_allclose(c["perplexity"], np.exp(loss), rtol=1e-6)
            assert np.array_equal(c["count"], np.diff(edges))
            assert c["collapse"]["threshold"] == pytest.approx(2 * c["collapse"]["max_loss_within_train"])
            assert len(c["per_prompt_loss"]) == 2
    # the mitigation changes the curve; the windowed state equals the full state before the window fills
    none, fm = (np.asarray(lv["sources"]["documents"]["curves"][k]["loss"]) for k in ("none", "forget_more"))
    sw = np.asarray(lv["sources"]["documents"]["curves"]["sliding_window"]["loss"])
    assert not np.allclose(none, fm)
    np.testing.assert_allclose(sw[edges[1:] <= 65], none[edges[1:] <= 65], rtol=1e-4)
    fine = np.load(os.path.join(out, "loss_vs_position_fine.npz"))
    assert int(fine["fine_width"]) == 8 and fine["documents__none"].shape == (2, 64)

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
    assert results["model"]["kind"] == "pretrained"


def test_states_mode_finds_a_planted_never_forgetting_head(tiny_model, tmp_path):
    """A head with alpha ~ 1 and a large dt accumulates without bound: the states mode must name it (and only
    it) as the fastest-growing head and an outlier, report its growth consistently, and write the figures."""
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
    config.states.length = "20x"
    results = eval_lib.run(config)
    st = json.load(open(os.path.join(config.output_dir, "states.json")))
    assert st["length"] == 640 and st["every"] == 4 and st["positions"][-1] == 640
    assert st["most_grown_head"] == [1, 3]
    norm = np.asarray(st["norm"])  # (records, layers, heads)
    assert norm.shape == (160, 2, 4)
    growth = np.asarray(st["norm_growth"])
    inside = np.asarray(st["positions"]) <= 32
    np.testing.assert_allclose(growth, norm[~inside].max(0) / norm[inside].max(0), rtol=1e-6)
    assert growth[1, 3] > 4.0 and st["max_norm_growth"] == pytest.approx(growth[1, 3])
    sustained = np.asarray(st["sustained_norm_growth"])
    late = np.asarray(st["positions"]) > 320
    np.testing.assert_allclose(sustained, np.median(norm[late], 0) / np.median(norm[inside], 0), rtol=1e-6)
    assert sustained[1, 3] > 10.0 and np.delete(sustained.ravel(), 1 * 4 + 3).max() < 4.0
    assert [(o["layer"], o["head"]) for o in st["outliers"]] == [(1, 3)]
    assert np.delete(growth.ravel(), 1 * 4 + 3).max() < 4.0  # the healthy heads stay in range
    for name in ("states_state_norm.png", "states_state_norm_heatmap.png", "states_retention.png",
                 "states_state_histograms.png", "states_traces.png"):
        assert os.path.getsize(os.path.join(config.output_dir, name)) > 0, name
    assert "## State norms" in results["summary"] and "(layer 1, head 3)" in results["summary"]


# --------------------------------------------------------------------------------------------------
# Passkey: batching bookkeeping with a planted answerer, and the NeoX tokenizer
# --------------------------------------------------------------------------------------------------


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

    monkeypatch.setattr(eval_lib.inference, "generate", fake_generate)
    em = eval_lib.EvalModel(model=tiny_model, tokenizer=tok, tokenizer_name="byte", train_len=512, kind="random",
                            path="random", data={})
    res = eval_lib.passkey_eval(em, {"none": None}, context_lengths=[300, 500, 1000, 2000], num_depths=10, trials=3,
                                batch_size=8, seed=1)
    r = res["results"]["none"]
    np.testing.assert_array_equal(r["accuracy_by_length"], [1, 1, 0, 0])
    assert np.asarray(r["accuracy"]).shape == (10, 4) and r["t_recall"] == 500
    assert all(shape[0] == 8 for shape in calls)  # one batch shape: partial batches are filled
    assert len(calls) == 4 * 4  # 30 prompts per length (one token length each) -> 4 batches of 8
    # The same seed gives the same prompts.
    again = eval_lib.passkey_eval(em, {"none": None}, context_lengths=[300], num_depths=10, trials=3, seed=1)
    assert [s["passkey"] for s in again["results"]["none"]["samples"]] == [s["passkey"] for s in r["samples"][:30]]


def test_passkey_with_neox_tokenizer():
    model = Mamba2LM(Mamba2Config(**dict(TINY, vocab_size=50277, n_layer=1)), rngs=nnx.Rngs(0))
    tok = get_tokenizer("neox")
    em = eval_lib.EvalModel(model=model, tokenizer=tok, tokenizer_name="neox", train_len=128, kind="random",
                            path="random", data={})
    res = eval_lib.passkey_eval(em, {"dt_scale": M.dt_scale(0.5)}, context_lengths=[40, 160], num_depths=3, seed=0)
    assert res["max_new_tokens"] == 6 and res["context_lengths"] == [160] and res["skipped_context_lengths"] == [40]
    r = res["results"]["dt_scale"]
    assert np.all((np.asarray(r["accuracy"]) >= 0) & (np.asarray(r["accuracy"]) <= 1))
    assert {s["prompt_len"] for s in r["samples"]} <= set(range(150, 161))  # NeoX: within a few tokens
    assert all(isinstance(s["generated"], str) for s in r["samples"])


# --------------------------------------------------------------------------------------------------
# Loading train.py work directories, configs and the command line
# --------------------------------------------------------------------------------------------------


def test_workdir_loading_reads_tokenizer_length_and_split(monkeypatch, tmp_path, tiny_model):
    import ml_collections

    train_cfg = ml_collections.ConfigDict(dict(
        model=dict(d_model=32), data=dict(corpus="tiny", tokenizer="byte", seq_len=96, validation_fraction=0.25,
                                          split_seed=7)))
    fake = types.ModuleType("ssm_jax.train_lib")
    fake.load_model_from_workdir = lambda workdir, step=None: (tiny_model, train_cfg)
    monkeypatch.setitem(sys.modules, "ssm_jax.train_lib", fake)
    assert eval_lib.checkpoint_kind(str(tmp_path)) == "workdir"
    em = eval_lib.load_eval_model(str(tmp_path))
    assert em.kind == "workdir" and em.tokenizer_name == "byte" and em.train_len == 96
    assert em.data == {"corpus": "tiny", "validation_fraction": 0.25, "split_seed": 7}
    assert eval_lib.load_eval_model(str(tmp_path), train_len=128).train_len == 128


def test_configs_and_helpers():
    for name in ("default", "loss_vs_position", "passkey", "capacity", "collapse_study"):
        c = load_config(name)
        assert set(eval_lib.parse_list(c.modes)) <= set(eval_lib.MODES)
        assert set(m for spec in eval_lib.parse_list(c.mitigations) for m in spec.split("+")) <= set(
            eval_lib.MITIGATION_NAMES)
    assert eval_lib.parse_length(load_config("loss_vs_position").loss.length, 256) >= 1_000_000
    assert eval_lib.parse_lengths("0.5x, 1x,4096,1x", 256) == [128, 256, 4096]
    assert eval_lib.tokenizer_name_for_vocab(272) == "byte" and eval_lib.tokenizer_name_for_vocab(50288) == "neox"


def test_eval_py_command_line(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), f"--config={ROOT}/configs/eval/default.py",
           "--config.checkpoint=random", "--config.train_len=32", f"--config.output_dir={out}",
           "--config.modes=loss_vs_position", "--config.mitigations=none,dt_scale", "--config.loss.length=128",
           "--config.loss.chunk_len=128", "--config.data.corpus=tiny", "--config.random_model.n_layer=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# Evaluation summary" in proc.stdout and "| documents | dt_scale |" in proc.stdout
    lv = json.load(open(out / "loss_vs_position.json"))
    assert lv["model"]["kind"] == "random" and lv["model"]["n_layer"] == 1 and lv["length"] == 128


def test_stream_benchmark_tiny(tmp_path):
    out = tmp_path / "stream.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "stream_1m.py"), "--tiny", "--tokens", "3000",
           "--chunk_len", "1024", "--mitigations", "none,forget_more", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| forget_more |" in proc.stdout
    data = json.load(open(out))
    assert [r["mitigation"] for r in data["results"]] == ["none", "forget_more"]
    for r in data["results"]:
        assert r["tokens_streamed"] == 3000 and r["seconds"] > 0 and not r["extrapolated"]
        assert 0 < r["mean_loss"] < 2 * np.log(257)
