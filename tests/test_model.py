"""Mamba2Config / Mamba2LM: validation, dtype forms, the official initialisation, packing, left padding, remat
policies, dtypes, impl parity."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm_jax import Mamba2Config, Mamba2LM, inference
from ssm_jax import mitigations as M
from ssm_jax.model import REMAT_POLICIES, causal_conv1d

TINY = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, ngroups=2, chunk_size=8)


def logits_fn(model, ids, **kw):
    return nnx.jit(lambda m, i: m(i, **kw))(model, ids)


def test_config_derived_sizes_match_public_130m():
    cfg = Mamba2Config()  # the 130m checkpoint
    assert (cfg.d_inner, cfg.nheads, cfg.conv_dim, cfg.d_in_proj) == (1536, 24, 1792, 3352)
    assert cfg.padded_vocab_size == 50288
    assert cfg.state_size == 24 * 24 * 64 * 128


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(d_model=0), "d_model"),
        (dict(headdim=48), "headdim"),
        (dict(ngroups=5), "ngroups"),
        (dict(dtype="int8"), "dtype"),
        (dict(ssd_impl="cuda"), "ssd_impl"),
        (dict(dt_min=0.5, dt_max=0.1), "dt_min"),
        (dict(d_ssm=12), "d_ssm"),
        (dict(d_ssm=128), "d_ssm"),
        (dict(D_has_hdim=1), "D_has_hdim"),
        (dict(norm_before_gate="yes"), "norm_before_gate"),
        (dict(remat="sometimes"), "remat"),
    ],
)
def test_config_rejects_bad_values(change, field):
    with pytest.raises(ValueError, match=field):
        Mamba2Config(**{**TINY, **change})


@pytest.mark.parametrize(
    "form",
    ["bfloat16", jnp.bfloat16, np.dtype(jnp.bfloat16), np.dtype("float16"), np.float16, jnp.float32],
    ids=["str", "jnp", "np.dtype-bf16", "np.dtype-f16", "np-type", "jnp-f32"],
)
def test_dtype_forms_are_stored_by_name(form):
    cfg = Mamba2Config(**TINY, dtype=form, param_dtype=form)
    assert cfg.dtype == cfg.param_dtype == np.dtype(form).name
    assert cfg.jnp_dtype == jnp.dtype(form)
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["dtype"] == cfg.dtype  # serialisable
    assert cfg == Mamba2Config(**TINY, dtype=cfg.dtype, param_dtype=cfg.dtype)


@pytest.mark.parametrize("bad", [float, "int8", jnp.int32, np.dtype("int32"), 3, "bf16"])
def test_dtype_errors_name_the_argument_and_the_forms(bad):
    for field in ("dtype", "param_dtype"):
        with pytest.raises(ValueError, match=rf"`Mamba2Config\.{field}` must be one of .*jnp scalar type.*np\.dtype"):
            Mamba2Config(**TINY, **{field: bad})


def test_remat_accepts_the_former_booleans():
    assert Mamba2Config(**TINY, remat=True).remat == "full" and Mamba2Config(**TINY, remat=False).remat == "none"


def test_official_initialisation_statistics():
    cfg = Mamba2Config(d_model=256, n_layer=4, vocab_size=1000, headdim=16, d_state=16)
    model = Mamba2LM(cfg, rngs=nnx.Rngs(0))
    dt = np.concatenate([np.log1p(np.exp(np.asarray(b.mixer.dt_bias[...]))) for b in model.layers])
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001  # softplus(dt_bias) in [dt_min, dt_max]
    assert abs(np.median(np.log(dt)) - 0.5 * (math.log(1e-3) + math.log(0.1))) < 0.5  # log-uniform
    A = np.concatenate([np.exp(np.asarray(b.mixer.A_log[...])) for b in model.layers])
    assert A.min() >= 1.0 and A.max() <= 16.0 and A.std() > 2.0
    np.testing.assert_array_equal(np.asarray(model.layers[0].mixer.D[...]), 1.0)
    assert abs(float(np.std(np.asarray(model.embedding[...]))) - 0.02) < 1e-3
    in_kernel = np.asarray(model.layers[0].mixer.in_proj.kernel[...])
    assert abs(np.abs(in_kernel).max() - 1 / math.sqrt(256)) < 1e-3  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    out_kernel = np.asarray(model.layers[0].mixer.out_proj.kernel[...])
    assert abs(np.abs(out_kernel).max() - 1 / math.sqrt(512) / math.sqrt(4)) < 1e-3  # / sqrt(n_layer)
    assert model.embedding[...].shape == (1008, 256)  # vocab padded to a multiple of 16


def test_packed_documents_do_not_leak():
    """Each document of a packed row gives the same logits as the document alone (conv and state reset)."""
    model = Mamba2LM(Mamba2Config(**TINY, ssd_impl="xla"), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    lengths = [13, 1, 9, 20]
    docs = [rng.integers(0, 50, n) for n in lengths]
    packed = jnp.asarray(np.concatenate(docs))[None]
    segment_ids = jnp.asarray(np.concatenate([np.full(n, i % 2) for i, n in enumerate(lengths)]))[None]
    got = np.asarray(logits_fn(model, packed, segment_ids=segment_ids))
    start = 0
    for doc in docs:
        alone = np.asarray(logits_fn(model, jnp.asarray(doc)[None]))
        np.testing.assert_allclose(got[:, start : start + len(doc)], alone, rtol=2e-5, atol=2e-5)
        start += len(doc)
    plain = np.asarray(logits_fn(model, packed))
    assert np.abs(plain - got).max() > 1e-3  # without segment_ids the documents do interact


def test_conv_masks_taps_across_documents():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    doc = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1, 1]])  # [prefix(3); sequence(6)], reset at position 1
    out = np.asarray(causal_conv1d(x, w, None, prefix=jnp.ones((1, 3, 3)), padded_doc=doc))
    np.testing.assert_allclose(out[0, 0], np.asarray(x[0, 0] * w[3] + w[0] + w[1] + w[2]), rtol=1e-6)
    np.testing.assert_allclose(out[0, 2], np.asarray(x[0, 2] * w[3] + x[0, 1] * w[2]), rtol=1e-6)


def test_impls_and_remat_policies_agree_values_and_gradients():
    cfg = Mamba2Config(**{**TINY, "n_layer": 1}, ssd_impl="xla")  # one layer: 5 compilations of the gradient
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 21), 0, 50)

    def loss(model):
        logits = model(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    configs = {"xla": cfg, "recurrent": cfg.replace(ssd_impl="recurrent")}
    configs.update({f"remat={name}": cfg.replace(remat=name) for name in REMAT_POLICIES if name != "none"})
    results = {}
    for name, c in configs.items():
        model = Mamba2LM(c, rngs=nnx.Rngs(3))
        grad_fn = nnx.value_and_grad(loss)
        value, grads = nnx.jit(grad_fn)(model)
        results[name] = (float(value), jax.tree.leaves(grads))
        if c.remat != "none":  # the policy is really applied: the gradient's program rematerialises the blocks
            graphdef, state = nnx.split(model)
            jaxpr = str(jax.make_jaxpr(lambda s: grad_fn(nnx.merge(graphdef, s)))(state))
            assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= c.n_layer
    for name in configs:
        assert results[name][0] == pytest.approx(results["xla"][0], rel=1e-5)
        for a, b in zip(results[name][1], results["xla"][1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


def test_left_padding_leaves_the_state_untouched():
    """``valid=False`` positions before a row's tokens: the cache after them and the logits of the real tokens are
    those of the tokens alone, and streaming in chunks equals one pass. On a model with every mamba_ssm option
    (gated MLP channels, per-channel D, norm before gate), whose caches are shaped by them."""
    cfg = Mamba2Config(**{**TINY, "ngroups": 1}, ssd_impl="xla", d_ssm=48, D_has_hdim=True, norm_before_gate=True)
    model = Mamba2LM(cfg, rngs=nnx.Rngs(2))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 12), 0, 50)
    padded = jnp.concatenate([jnp.full((1, 6), 7), tokens], axis=1)  # 6 padding positions, then the tokens
    forward = nnx.jit(lambda m, i, c, v: m.forward_with_cache(i, c, valid=v))
    want, want_cache = forward(model, tokens, model.init_cache(1), None)
    for valid, exact in ((jnp.arange(18)[None] >= 6, True), (jnp.ones((1, 18), bool), False)):
        got, cache = forward(model, padded, model.init_cache(1), valid)
        if not exact:  # the same positions counted as tokens: the state differs, so the mask is what matters
            assert np.abs(np.asarray(cache[0].ssm_state) - np.asarray(want_cache[0].ssm_state)).max() > 1e-3
            continue
        np.testing.assert_allclose(np.asarray(got[:, 6:]), np.asarray(want), rtol=1e-5, atol=1e-5)
        for a, b in zip(cache, want_cache):
            np.testing.assert_allclose(np.asarray(a.conv_state), np.asarray(b.conv_state), atol=1e-6)
            np.testing.assert_allclose(np.asarray(a.ssm_state), np.asarray(b.ssm_state), rtol=1e-5, atol=1e-6)
    first, cache = forward(model, tokens[:, :6], inference.init_cache(model, 1), None)
    second, _ = forward(model, tokens[:, 6:], cache, None)  # the conv and SSM state cross the chunk boundary
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), np.asarray(want), rtol=1e-4, atol=2e-5)


def test_bfloat16_compute_is_close_to_float32():
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 30), 0, 50)
    f32 = Mamba2LM(Mamba2Config(**TINY, ssd_impl="xla"), rngs=nnx.Rngs(5))
    b16 = Mamba2LM(Mamba2Config(**TINY, ssd_impl="xla", dtype="bfloat16"), rngs=nnx.Rngs(5))
    a, b = np.asarray(logits_fn(f32, ids)), np.asarray(logits_fn(b16, ids))
    assert b.dtype == np.float32  # logits in float32
    assert np.abs(a - b).max() / np.abs(a).max() < 5e-2
    assert b16.layers[0].mixer.in_proj.kernel[...].dtype == jnp.float32  # float32 master weights


def test_mitigation_through_the_model_is_exact_across_impls():
    ids = jax.random.randint(jax.random.PRNGKey(2), (1, 33), 0, 50)
    model = Mamba2LM(Mamba2Config(**TINY, ssd_impl="xla"), rngs=nnx.Rngs(4))
    per_layer = M.forget_more(np.array([[0.99] * 8, [0.9] * 8]), 0.75)  # (layers, heads)
    for mitigation in (M.forget_more(), per_layer, M.dt_scale(0.5), M.sliding_window(6)):
        a = np.asarray(logits_fn(model, ids, mitigation=mitigation, impl="xla"))
        b = np.asarray(logits_fn(model, ids, mitigation=mitigation, impl="recurrent"))
        plain = np.asarray(logits_fn(model, ids))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert np.abs(a - plain).max() > 1e-4


def test_bad_inputs():
    model = Mamba2LM(Mamba2Config(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="valid"):
        model(jnp.zeros((1, 3), jnp.int32), valid=jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="valid"):
        model(jnp.zeros((1, 3), jnp.int32), valid=jnp.ones((1, 3), jnp.int32))
