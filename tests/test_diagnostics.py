"""ssm_jax.diagnostics: recorded statistics are the real ones, the detectors find planted collapse, and the
collapse rule is its definition."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm_jax import Mamba2Config, Mamba2LM, inference
from ssm_jax import diagnostics as D
from ssm_jax import mitigations as M
from ssm_jax.model import rms_norm

CFG = Mamba2Config(d_model=32, n_layer=2, vocab_size=60, d_state=8, headdim=8, ngroups=2, chunk_size=16, dt_min=0.01, dt_max=0.1, ssd_impl="xla")


@pytest.fixture(scope="module")
def model():
    return Mamba2LM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 161), 0, CFG.vocab_size))


def test_records_match_direct_computation(model, tokens):
    diag = D.record_states(model, tokens, every=40, trace_heads=[(0, 3)], snapshot_positions=[80, 160])
    np.testing.assert_array_equal(diag.positions, [40, 80, 120, 160])
    # per-token losses are the streaming losses
    np.testing.assert_allclose(diag.losses, inference.stream_losses(model, tokens, chunk_len=64), atol=1e-5)
    # state statistics at position 80 are those of the cache after 80 tokens
    _, cache = inference.prefill(model, tokens[:, :80], chunk_len=32)
    states = np.stack([np.asarray(c.ssm_state) for c in cache], axis=1)  # (b, layers, heads, p, n)
    np.testing.assert_allclose(diag.norm[1], np.sqrt((states**2).sum(axis=(-2, -1))), rtol=1e-4)
    np.testing.assert_allclose(diag.var[1], states.var(axis=(-2, -1)), rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(diag.max_abs[1], np.abs(states).max(axis=(-2, -1)), rtol=1e-4)
    np.testing.assert_allclose(diag.snapshots[80], states[:, 0, 0], rtol=1e-4, atol=1e-7)
    # retention of layer 0: prod of alpha_1..alpha_t from the layer's own dt and A
    mixer = model.layers[0].mixer
    hidden = rms_norm(
        jnp.take(model.embedding[...], jnp.asarray(tokens[:, :120]), axis=0), model.layers[0].norm_weight[...], CFG.norm_eps, jnp.float32
    )
    inputs = mixer.ssm_inputs(hidden)
    log_alpha = np.asarray(inputs.dt * inputs.A)  # (b, 120, heads)
    np.testing.assert_allclose(diag.log_retention[2, :, 0], log_alpha[:, 1:].sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(diag.traces["dt[0.3]"][:120].T, np.asarray(inputs.dt[:, :, 3]), rtol=1e-5)
    assert np.all(np.diff(diag.retention, axis=0) <= 1e-7)  # retention never grows


def test_planted_collapse_is_detected_and_healthy_model_is_silent(model):
    train_len, stream = 64, 640
    constant = np.full((1, stream + 1), 7, np.int32)  # coherent inputs: a head that never forgets grows linearly
    healthy = D.record_states(model, constant, every=32)
    assert D.detect_state_outliers(healthy, train_len) == []

    sick = nnx.clone(model)
    sick.layers[1].mixer.A_log[...] = sick.layers[1].mixer.A_log[...].at[5].set(-20.0)  # A ~ -2e-9: alpha ~ 1
    sick.layers[1].mixer.dt_bias[...] = sick.layers[1].mixer.dt_bias[...].at[5].set(2.0)
    diag = D.record_states(sick, constant, every=32)
    outliers = D.detect_state_outliers(diag, train_len)
    assert [(o.layer, o.head) for o in outliers] == [(1, 5)]
    assert outliers[0].ratio > 4.0 and outliers[0].first_position > train_len
    assert diag.retention[-1, 0, 1, 5] > 0.99  # the planted head keeps the first token
    assert np.all(diag.retention[-1, 0, 0] < 0.5)


def test_collapse_bucket_width_default():
    # max(128, T_train // 8) from T_train = 256 on; T_train // 2 below, so that a bucket besides the first fits.
    assert [D.collapse_bucket_width(t) for t in (256, 1024, 2048, 4096, 16384)] == [128, 128, 256, 512, 2048]
    assert [D.collapse_bucket_width(t) for t in (2, 32, 128, 255)] == [1, 16, 64, 127]


def test_collapse_rule_on_constructed_curves():
    # T_train = 16 in buckets of 4: buckets 0-3 lie within it, 4 on are beyond. Only the first bucket is high.
    curve = np.array([10.0, 2.0, 1.5, 1.8, 3.0, 3.9, 4.1, 3.0])
    v = D.collapse_verdict(curve, 16, width=4, unigram_loss=2.5)
    assert v.reference == 2.0 and v.threshold == 4.0  # the first bucket (10.0) does not set the reference
    assert v.collapsed and v.first_position == 6 * 4 + 1 and v.max_ratio == pytest.approx(4.1 / 2.0)
    assert v.max_loss_after_train == 4.1 and v.bucket_width == 4 and v.factor == 2.0
    assert v.first_position_above_unigram == 4 * 4 + 1  # bucket 0 (10.0 > 2.5) is skipped here too
    quiet = D.collapse_verdict(np.where(curve == 4.1, 3.9, curve), 16, width=4)
    assert not quiet.collapsed and quiet.first_position is None and quiet.first_position_above_unigram is None
    assert D.collapse_verdict(curve, 16, width=4, factor=1.9).first_position == 5 * 4 + 1  # 3.9 > 3.8
    # A bucket straddling T_train (positions 17-20 of T_train = 18) counts on neither side; NaN buckets are skipped.
    straddle = np.array([9.0, 2.0, 2.0, 2.0, 100.0, np.nan, 3.0, 5.0])
    v = D.collapse_verdict(straddle, 18, width=4)
    assert v.reference == 2.0 and v.collapsed and v.first_position == 7 * 4 + 1 and v.max_loss_after_train == 5.0
    with pytest.raises(ValueError, match="at least 2"):
        D.collapse_verdict(curve, 16, width=16)
    with pytest.raises(ValueError, match="beyond train_len"):
        D.collapse_verdict(curve[:4], 16, width=4)


def direct_verdict(per_position, train_len, width, factor, unigram):
    """The rule written out position by position: the definition the implementation must match."""
    mean = per_position.mean(axis=0)
    buckets = {}
    for t in range(1, mean.size + 1):
        buckets.setdefault((t - 1) // width, []).append(t)
    loss = {j: float(np.mean([mean[t - 1] for t in ts])) for j, ts in buckets.items()}
    reference = max(loss[j] for j, ts in buckets.items() if ts[-1] <= train_len and 1 not in ts)
    beyond = [j for j in sorted(buckets) if buckets[j][0] > train_len]
    over = [j for j in beyond if loss[j] > factor * reference]
    above = [j for j in sorted(buckets) if 1 not in buckets[j] and loss[j] > unigram]
    return {
        "collapsed": bool(over),
        "first_position": buckets[over[0]][0] if over else None,
        "reference": reference,
        "max_ratio": max(loss[j] for j in beyond) / reference,
        "first_position_above_unigram": buckets[above[0]][0] if above else None,
    }


def test_collapse_rule_matches_its_definition_on_random_curves():
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(40):
        train_len = int(rng.integers(8, 200))
        width = int(rng.integers(1, train_len // 2 + 1))
        length = train_len + width + int(rng.integers(1, 400))
        losses = rng.uniform(1.0, 3.0, (3, length))  # (prompts, positions)
        if rng.uniform() < 0.5:
            losses[:, int(rng.integers(train_len, length)) :] += rng.uniform(0.0, 6.0)
        factor, unigram = float(rng.uniform(1.5, 2.5)), float(rng.uniform(1.5, 4.0))
        got = D.collapse_verdict(D.bucket_means(losses, width), train_len, width=width, factor=factor, unigram_loss=unigram)
        want = direct_verdict(losses, train_len, width, factor, unigram)
        for key in ("collapsed", "first_position", "first_position_above_unigram"):
            assert getattr(got, key) == want[key], key
        assert (got.reference, got.max_ratio) == pytest.approx((want["reference"], want["max_ratio"]), rel=1e-12)
        outcomes.add(got.collapsed)
    assert outcomes == {True, False}  # both verdicts were exercised


def test_calibrated_state_norm_bounds_streaming(model, tokens):
    tau = D.calibrate_state_norm(model, tokens[:, :41], every=20)
    assert tau.shape == (CFG.n_layer, CFG.nheads) and np.all(tau > 0)
    bound = 0.5 * tau
    diag = D.record_states(model, tokens, every=40, mitigation=M.state_norm(bound))
    assert np.all(diag.norm <= bound[None, None] * (1 + 1e-5))
    free = D.record_states(model, tokens, every=40)
    assert np.any(free.norm > bound[None, None])


def test_plots_are_written(model, tokens, tmp_path):
    diag = D.record_states(model, tokens, every=40, trace_heads=[(1, 2)], snapshot_positions=[40, 160])
    paths = D.plot_all(diag, str(tmp_path), train_len=80)
    assert len(paths) == 5
    for path in paths:
        assert os.path.getsize(path) > 5000
    summary = diag.to_json()
    assert len(summary["norm"]) == 4 and np.isfinite(summary["mean_loss"])


def test_bad_arguments(model, tokens):
    with pytest.raises(ValueError, match="every"):
        D.record_states(model, tokens, every=0)
    with pytest.raises(ValueError, match="outside the model"):
        D.record_states(model, tokens, trace_heads=[(5, 0)])
    with pytest.raises(ValueError, match="snapshot_positions"):
        D.record_states(model, tokens, every=40, snapshot_positions=[41])
    with pytest.raises(ValueError, match="trace_stride"):
        D.record_states(model, tokens, every=40, trace_stride=3)
