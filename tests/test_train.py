"""Training step, loss, optimiser, truncated BPTT, NaN handling and the loop, fine-tuning included (tiny models,
CPU)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train_helpers import CONFIG_DIR, compilation_cache, parse_flags, resume_config, tiny_config  # noqa: F401

from ssm_jax import optim, train_lib
from ssm_jax.model import Mamba2Config, Mamba2LM

CFG = Mamba2Config(d_model=32, n_layer=1, vocab_size=257, d_state=16, headdim=16, chunk_size=16)


def _batch(rng, b=4, l=32, vocab=257, docs=True, cont=0):
    inputs = rng.integers(0, vocab, (b, l)).astype(np.int32)
    targets = rng.integers(0, vocab, (b, l)).astype(np.int32)
    seg = np.cumsum(rng.random((b, l)) < 0.05, axis=1).astype(np.int32) if docs else np.zeros((b, l), np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": seg,
        "loss_mask": np.ones((b, l), np.float32),
        "is_continuation": np.full((b,), cont, np.int32),
    }


def _setup(cfg=CFG, lr=1e-2, carry_batch=None, **step_kw):
    opt = optim.make_optimizer(lr)
    step_kw.setdefault("schedule", optax.constant_schedule(lr))
    state = train_lib.init_train_state(cfg, opt, jax.random.PRNGKey(0), carry_batch=carry_batch)
    graphdef, _ = train_lib.abstract_model(cfg)
    step = jax.jit(train_lib.make_train_step(graphdef, opt, **step_kw))
    return graphdef, opt, state, step


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ------------------------------------------------------------------------------------------------ optimiser


def test_wsd_schedule_warmup_stable_decay():
    s = optim.make_schedule("wsd", peak_lr=1.0, num_steps=100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    v = np.array([float(s(i)) for i in range(100)])
    np.testing.assert_allclose(v[:10], (np.arange(10) + 1) / 10, rtol=1e-6)
    np.testing.assert_allclose(v[10:80], 1.0)
    assert np.all(np.diff(v[79:]) < 0)
    assert v[99] == pytest.approx(0.1)
    c = optim.make_schedule("cosine", peak_lr=2.0, num_steps=50, warmup_steps=5, min_lr_ratio=0.0)
    assert float(c(4)) == pytest.approx(2.0) and float(c(49)) == pytest.approx(0.0, abs=1e-6)
    assert float(c(27)) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="warmup"):
        optim.make_schedule("wsd", peak_lr=1.0, num_steps=10, warmup_steps=9, decay_fraction=0.5)


def test_weight_decay_mask_excludes_norms_biases_and_ssm_parameters():
    _, params = train_lib.abstract_model(CFG.replace(conv_bias=True))
    mask = optim.weight_decay_mask(params)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    for name in ("embedding", "layers/0/mixer/in_proj/kernel", "layers/0/mixer/out_proj/kernel"):
        assert flat[name], name
    for name in ("A_log", "D", "dt_bias", "conv_bias", "norm_weight"):
        assert not flat[f"layers/0/mixer/{name}"], name
    assert not flat["layers/0/norm_weight"] and not flat["norm_f_weight"]

    # Decoupled decay: a zero gradient still shrinks the decayed kernels only.
    opt = optim.make_optimizer(0.1, weight_decay=0.5)
    p = {"kernel": jnp.ones((2, 2)), "A_log": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    upd, _ = opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)
    assert float(upd["kernel"][0, 0]) == pytest.approx(-0.05) and float(upd["A_log"][0, 0]) == 0.0


# ------------------------------------------------------------------------------------------------ loss


def test_loss_ignores_padded_vocab_and_respects_mask():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    logits = logits.at[..., 10:].set(50.0)  # padding entries must not count
    targets = jnp.asarray(rng.integers(0, 10, (2, 5)))
    mask = jnp.asarray([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]], jnp.float32)
    total, count, _ = train_lib.token_loss_sums(logits, targets, mask, vocab_size=10)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits[..., :10], targets)
    assert float(count) == 8
    np.testing.assert_allclose(float(total), float(jnp.sum(ref * mask)), rtol=1e-6)


def test_chunked_loss_equals_full_loss_and_gradient():
    rng = np.random.default_rng(1)
    head = jnp.asarray(rng.normal(size=(272, 24)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(3, 40, 24)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 257, (3, 40)))
    mask = jnp.asarray(rng.random((3, 40)) < 0.8, jnp.float32)

    def loss(head, hidden, chunk):
        s, c, _ = train_lib.lm_loss_sums(head, hidden, targets, mask, vocab_size=257, chunk_size=chunk)
        return s / c

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    full, g_full = vg(head, hidden, 0)
    chunked, g_chunk = vg(head, hidden, 16)  # 2 chunks + a remainder of 8
    np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
    assert _max_diff(g_full, g_chunk) < 1e-6
    # The logits match the model's own head.
    model = Mamba2LM(CFG, rngs=nnx.Rngs(0))
    h = jnp.asarray(rng.normal(size=(1, 4, CFG.d_model)), jnp.float32)
    t = jnp.zeros((1, 4), jnp.int32)
    ref = train_lib.token_loss_sums(model.logits_from_hidden(h), t, jnp.ones((1, 4)), CFG.vocab_size)
    got = train_lib.lm_loss_sums(model.embedding[...], h, t, jnp.ones((1, 4)), vocab_size=CFG.vocab_size)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ steps


def test_train_step_reduces_loss_and_reports_metrics():
    _, _, state, step = _setup(lr=3e-3)
    batch = _batch(np.random.default_rng(0))
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.1
    assert int(state.step) == 5 and int(m["skipped"]) == 0 and float(m["tokens"]) == 4 * 32
    assert float(m["grad_norm"]) > 0 and float(m["lr"]) == pytest.approx(3e-3)
    assert losses[0] == pytest.approx(math.log(257), abs=0.3)


def test_gradient_accumulation_equals_full_batch():
    batch = _batch(np.random.default_rng(2), b=8)
    batch["loss_mask"][1, 5:] = 0.0  # unequal token counts per micro-batch
    sgd = optax.sgd(1.0)  # params - grads: compares the accumulated gradients themselves
    graphdef, _ = train_lib.abstract_model(CFG)
    state = train_lib.init_train_state(CFG, sgd, jax.random.PRNGKey(0))
    s1, m1 = jax.jit(train_lib.make_train_step(graphdef, sgd))(state, batch)
    s4, m4 = jax.jit(train_lib.make_train_step(graphdef, sgd, grad_accum_steps=4))(state, batch)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert _max_diff(s1.params, s4.params) < 1e-6
    assert _max_diff(s1.params, state.params) > 1e-3

    # With a TBPTT carry, each micro-batch continues its own rows' states.
    state = train_lib.init_train_state(CFG, sgd, jax.random.PRNGKey(0), carry_batch=8)
    step1 = jax.jit(train_lib.make_train_step(graphdef, sgd, use_segment_ids=False))
    step4 = jax.jit(train_lib.make_train_step(graphdef, sgd, grad_accum_steps=4, use_segment_ids=False))
    cont = dict(batch, is_continuation=np.ones((8,), np.int32))
    a, b = step1(state, batch), step4(state, batch)
    a, b = step1(a[0], cont), step4(b[0], cont)
    np.testing.assert_allclose(float(b[1]["loss"]), float(a[1]["loss"]), rtol=1e-6)
    assert _max_diff(a[0].carry, b[0].carry) < 1e-5 and _max_diff(a[0].params, b[0].params) < 1e-6


def test_segment_ids_stop_state_leaking_across_documents():
    """With packed documents, the loss of the second document must not depend on the first."""
    graphdef, _ = train_lib.abstract_model(CFG)
    params = train_lib.init_train_state(CFG, optim.make_optimizer(1e-3), jax.random.PRNGKey(0)).params
    ev = jax.jit(train_lib.make_eval_step(graphdef, use_segment_ids=True))
    rng = np.random.default_rng(3)
    b = _batch(rng, b=1, l=32, docs=False)
    b["segment_ids"][:, 16:] = 1
    b["loss_mask"][:, :16] = 0.0
    b2 = {k: v.copy() for k, v in b.items()}
    b2["inputs"][:, :16] = rng.integers(0, 257, (1, 16))  # another first document
    s1, _ = ev(params, b, None)
    s2, _ = ev(params, b2, None)
    np.testing.assert_allclose(float(s1["loss_sum"]), float(s2["loss_sum"]), rtol=1e-6)


def test_tbptt_carry_continues_the_stream_and_resets():
    """Two consecutive windows with the carried state give the loss of one long window."""
    graphdef, _ = train_lib.abstract_model(CFG)
    params = train_lib.init_train_state(CFG, optim.make_optimizer(1e-3), jax.random.PRNGKey(0)).params
    ev = jax.jit(train_lib.make_eval_step(graphdef, use_segment_ids=False))
    rng = np.random.default_rng(4)
    long = _batch(rng, b=2, l=64, docs=False)
    half = lambda sl, cont: {
        **{k: long[k][:, sl] for k in ("inputs", "targets", "segment_ids", "loss_mask")},  # noqa: E731
        "is_continuation": np.full((2,), cont, np.int32),
    }
    carry = train_lib.zero_carry(CFG, 2)
    full, _ = ev(params, long, None)
    a, carry = ev(params, half(slice(0, 32), 0), carry)
    b, carry_b = ev(params, half(slice(32, 64), 1), carry)
    np.testing.assert_allclose(float(a["loss_sum"] + b["loss_sum"]), float(full["loss_sum"]), rtol=1e-5)
    # is_continuation = 0: the carry is dropped, as if the window started a stream.
    fresh, _ = ev(params, half(slice(32, 64), 0), None)
    reset, _ = ev(params, half(slice(32, 64), 0), carry)
    np.testing.assert_allclose(float(reset["loss_sum"]), float(fresh["loss_sum"]), rtol=1e-6)
    assert abs(float(reset["loss_sum"]) - float(b["loss_sum"])) > 1e-3

    # In the train step the carry is part of the state: the final states of the forward pass (with the
    # parameters before the update), used by the next step when the row continues.
    _, _, state, step = _setup(carry_batch=2, use_segment_ids=False)
    params_before = state.params
    state, _ = step(state, half(slice(0, 32), 0))
    _, expected = ev(params_before, half(slice(0, 32), 0), train_lib.zero_carry(CFG, 2))
    assert _max_diff(state.carry, expected) < 1e-6
    assert float(jnp.abs(state.carry[0]["ssm_state"]).sum()) > 0
    _, m = step(state, half(slice(32, 64), 1))
    assert np.isfinite(float(m["loss"]))


def test_non_finite_step_is_skipped_not_applied():
    _, _, state, step = _setup()
    good = _batch(np.random.default_rng(5))
    state, _ = step(state, good)
    bad = {k: v.copy() for k, v in good.items()}
    bad["loss_mask"][0, 0] = np.nan
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, m = step(state, bad)
    assert int(m["skipped"]) == 1 and int(m["num_skipped"]) == 1 and int(state.step) == 2
    assert _max_diff(before[0], state.params) == 0.0 and _max_diff(before[1], state.opt_state) == 0.0
    state, m = step(state, good)
    assert int(m["skipped"]) == 0 and int(state.num_skipped) == 1


def test_model_flops_per_token_counts_the_big_matmuls():
    cfg = Mamba2Config()  # 130m
    f = train_lib.model_flops_per_token(cfg, 2048)
    _, params = train_lib.abstract_model(cfg)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    # 6 * params (the embedding counts once, as the head) plus the SSD work.
    assert 6 * n_params < f < 6 * n_params * 1.3


# ------------------------------------------------------------------------------------------------ the loop


def test_train_and_evaluate_writes_metrics_checkpoints_and_loads_back(tmp_path):
    import os

    workdir = str(tmp_path / "run")
    config = tiny_config(**{"train.num_steps": 4, "eval.every_steps": 2, "checkpoint.every_steps": 2, "log.tensorboard": True, "log.plot": True})
    summary = train_lib.train_and_evaluate(config, workdir)
    assert summary["step"] == 4 and summary["num_skipped"] == 0
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in val] == [2, 4]
    for key in ("loss", "bits_per_token", "lr", "grad_norm", "tokens_per_s", "skipped", "num_skipped"):
        assert key in train[-1]
    assert val[-1]["bits_per_token"] == pytest.approx(val[-1]["loss"] / math.log(2))
    assert os.path.isfile(os.path.join(workdir, "loss_curve.png"))
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

    model, cfg = train_lib.load_model_from_workdir(workdir)
    assert model.config.d_model == 32 and cfg.data.tokenizer == "byte"
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, model.config.padded_vocab_size)
    older, _ = train_lib.load_model_from_workdir(workdir, step=2)
    assert float(jnp.abs(older.embedding[...] - model.embedding[...]).max()) > 0


def test_nan_policy_stop_raises_with_the_step(tmp_path):
    config = tiny_config(**{"train.num_steps": 4, "optim.lr": 1e30, "optim.warmup_steps": 0, "train.nan_policy": "stop", "eval.every_steps": 0})
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite"):
        train_lib.train_and_evaluate(config, str(tmp_path / "run"))


def test_fine_tuning_from_another_run_as_the_readme_shows(tmp_path, compilation_cache):  # noqa: F811
    """``train.py --config=configs/passkey_finetune.py:<workdir>`` end to end, then the same command again (resume)."""
    import os

    source, target = str(tmp_path / "source"), str(tmp_path / "passkey")
    train_lib.train_and_evaluate(resume_config(), source)
    argv = [
        "train.py",
        f"--config={os.path.join(CONFIG_DIR, 'passkey_finetune.py')}:{source}",
        f"--workdir={target}",
        "--config.data.seq_len=256",
        "--config.data.passkey_max_context=240",
        "--config.train.batch_size=8",
        "--config.eval.batch_size=8",
        "--config.eval.num_batches=1",
        "--config.train.num_steps=2",
        "--config.optim.warmup_steps=0",
        "--config.optim.lr=1e-7",
        "--config.train.progress_bar=False",
        "--config.log.tensorboard=False",
        "--config.log.plot=False",
    ]
    summary = train_lib.train_and_evaluate(parse_flags(argv), target)
    assert summary["step"] == 2 and np.isfinite(summary["validation"]["loss"])

    tuned, config = train_lib.load_model_from_workdir(target)
    trained, _ = train_lib.load_model_from_workdir(source)
    fresh = Mamba2LM(trained.config, rngs=nnx.Rngs(0))
    # The architecture and tokenizer of the source run, the runtime fields of the fine-tuning config.
    assert (tuned.config.d_model, tuned.config.n_layer, tuned.config.chunk_size) == (32, 1, 64)
    assert config.data.tokenizer == "byte" and config.data.mode == "passkey" and config.init.workdir == source
    # It started from the source's weights: two steps at lr 1e-7 move them by about 2e-7.
    weights = lambda m: nnx.state(m, nnx.Param)  # noqa: E731
    assert _max_diff(weights(tuned), weights(trained)) < 1e-5 < _max_diff(weights(trained), weights(fresh))

    again = train_lib.train_and_evaluate(parse_flags(argv), target)  # resumes its own run: nothing left to train
    assert again["step"] == 2
    records = [json.loads(line) for line in open(os.path.join(target, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "train"] == [2]  # logged by the first run only
