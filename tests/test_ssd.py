"""ssm_jax.ssd against the float64 step-by-step definition (tests/reference.py)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from reference import random_segment_ids, random_ssd_inputs, ssd_reference
from ssm_jax import mitigations as M
from ssm_jax import ssd
from ssm_jax.ssd import segsum

ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def call(inputs, dtype, *, impl, chunk_size=16, segment_ids=None, mitigation=None, with_init=True, with_D=True):
    a = {k: jnp.asarray(v, dtype if k not in ("dt", "A", "D", "initial_state") else jnp.promote_types(dtype, jnp.float32)) for k, v in inputs.items()}
    return ssd(
        a["x"],
        a["dt"],
        a["A"],
        a["B"],
        a["C"],
        D=a["D"] if with_D else None,
        initial_state=a["initial_state"] if with_init else None,
        segment_ids=None if segment_ids is None else jnp.asarray(segment_ids),
        chunk_size=chunk_size,
        mitigation=mitigation,
        impl=impl,
    )


CASES = list(
    itertools.product(
        [1, 37, 64],  # seqlen: single step, odd, exact multiple
        [1, 2],  # groups
        [False, True],  # segment resets
        [False, True],  # initial state
    )
)


@pytest.mark.parametrize("seqlen,groups,resets,with_init", CASES)
@pytest.mark.parametrize("impl,chunk_size", [("recurrent", 16), ("xla", 16), ("xla", 7), ("xla", 128)])
def test_float64_matches_definition(seqlen, groups, resets, with_init, impl, chunk_size):
    rng = np.random.default_rng(seqlen * 10 + groups)
    inputs = random_ssd_inputs(rng, seqlen=seqlen, groups=groups)
    seg = random_segment_ids(rng, 2, seqlen) if resets and seqlen > 1 else None
    ref_inputs = dict(inputs) if with_init else {k: v for k, v in inputs.items() if k != "initial_state"}
    want_y, want_state = ssd_reference(**ref_inputs, segment_ids=seg)
    with jax.enable_x64(True):
        y, state = call(inputs, jnp.float64, impl=impl, chunk_size=chunk_size, segment_ids=seg, with_init=with_init)
        assert y.dtype == jnp.float64 and state.dtype == jnp.float64
        # float64 end to end: only rounding differences are allowed
        assert rel_err(y, want_y) < 1e-10
        assert rel_err(state, want_state) < 1e-10


@pytest.mark.parametrize("impl", ["recurrent", "xla"])
def test_float32_and_bfloat16_accuracy(impl):
    rng = np.random.default_rng(1)
    inputs = random_ssd_inputs(rng, seqlen=77, groups=2)
    seg = random_segment_ids(rng, 2, 77)
    want_y, want_state = ssd_reference(**inputs, segment_ids=seg)
    y, state = call(inputs, jnp.float32, impl=impl, segment_ids=seg)
    assert y.dtype == jnp.float32 and state.dtype == jnp.float32
    assert rel_err(y, want_y) < 2e-5 and rel_err(state, want_state) < 2e-5  # float32 rounding only

    rounded = {k: (np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) if k in ("x", "B", "C") else v) for k, v in inputs.items()}
    want_y16, want_state16 = ssd_reference(**rounded, segment_ids=seg)
    y16, state16 = call(inputs, jnp.bfloat16, impl=impl, segment_ids=seg)
    assert y16.dtype == jnp.bfloat16 and state16.dtype == jnp.float32  # float32 accumulation
    assert rel_err(y16, want_y16) < 1e-2  # only the bf16 rounding of y itself
    assert rel_err(state16, want_state16) < 2e-5


def _loss_fn(impl, chunk_size, seg, mitigation, dtype):
    weights_rng = np.random.default_rng(7)

    def loss(x, dt, A, B, C, D, h0):
        y, state = ssd(x, dt, A, B, C, D=D, initial_state=h0, segment_ids=seg, chunk_size=chunk_size, mitigation=mitigation, impl=impl)
        wy = jnp.asarray(weights_rng.standard_normal(y.shape), y.dtype)
        ws = jnp.asarray(weights_rng.standard_normal(state.shape), state.dtype)
        return jnp.sum(y * wy) + jnp.sum(state * ws)

    return loss


@pytest.mark.parametrize(
    "mitigation", [None, M.forget_more(0.95, 0.7), M.dt_scale(0.5), M.sliding_window(9)], ids=["none", "forget_more", "dt_scale", "window"]
)
def test_gradients_of_every_input(mitigation):
    """float32 chunked gradients vs float64 recurrent gradients (x, dt, A, B, C, D and the initial state)."""
    rng = np.random.default_rng(3)
    inputs = random_ssd_inputs(rng, seqlen=41, groups=2)
    seg = jnp.asarray(random_segment_ids(rng, 2, 41, num_breaks=2))
    args = [inputs[k] for k in ARG_NAMES]
    with jax.enable_x64(True):
        want = jax.grad(_loss_fn("recurrent", 16, seg, mitigation, jnp.float64), argnums=range(7))(*[jnp.asarray(a, jnp.float64) for a in args])
        want = [np.asarray(w) for w in want]
        want_xla64 = jax.grad(_loss_fn("xla", 8, seg, mitigation, jnp.float64), argnums=range(7))(*[jnp.asarray(a, jnp.float64) for a in args])
    got = jax.grad(_loss_fn("xla", 16, seg, mitigation, jnp.float32), argnums=range(7))(*[jnp.asarray(a, jnp.float32) for a in args])
    for name, g, g64, w in zip(ARG_NAMES, got, want_xla64, want):
        assert np.all(np.isfinite(np.asarray(g))), name
        assert rel_err(g64, w) < 1e-9, name  # chunked == recurrent exactly in float64
        assert rel_err(g, w) < 1e-4, name  # float32 rounding


MITIGATION_CASES = [
    ("forget_more", M.forget_more(0.9, 0.75), dict(alpha_scale=0.9, b_scale=0.75)),
    (
        "forget_more_per_head",
        M.forget_more(np.array([0.99, 0.9, 0.8, 1.0]), np.array([0.5, 1.0, 0.75, 0.9])),
        dict(alpha_scale=np.array([0.99, 0.9, 0.8, 1.0]), b_scale=np.array([0.5, 1.0, 0.75, 0.9])),
    ),
    ("dt_scale", M.dt_scale(0.5), dict(dt_scale=0.5)),
    ("window_1", M.sliding_window(1), dict(window=1)),
    ("window_5", M.sliding_window(5), dict(window=5)),
    ("window_23", M.sliding_window(23), dict(window=23)),  # spans several chunks of 8
    ("window_40", M.sliding_window(40), dict(window=40)),  # longer than most segments
    (
        "composed",
        M.compose(M.forget_more(0.97, 0.8), M.dt_scale(0.7), M.sliding_window(11)),
        dict(alpha_scale=0.97, b_scale=0.8, dt_scale=0.7, window=11),
    ),
]


@pytest.mark.parametrize("name,mitigation,ref_kwargs", MITIGATION_CASES, ids=[c[0] for c in MITIGATION_CASES])
@pytest.mark.parametrize("resets", [False, True])
def test_mitigations_exact_in_every_path(name, mitigation, ref_kwargs, resets):
    rng = np.random.default_rng(5)
    inputs = random_ssd_inputs(rng, seqlen=45)
    seg = random_segment_ids(rng, 2, 45) if resets else None
    want_y, want_state = ssd_reference(**inputs, segment_ids=seg, **ref_kwargs)
    plain_y, _ = ssd_reference(**inputs, segment_ids=seg)
    if not resets:  # (short segments can make a long window a no-op)
        assert rel_err(plain_y, want_y) > 1e-6  # the mitigation changes the output
    with jax.enable_x64(True):
        for impl in ("recurrent", "xla"):
            y, state = call(inputs, jnp.float64, impl=impl, chunk_size=8, segment_ids=seg, mitigation=mitigation)
            assert rel_err(y, want_y) < 1e-10, impl
            assert rel_err(state, want_state) < 1e-10, impl


def test_state_norm_recurrent_exact_and_chunked_bounded():
    rng = np.random.default_rng(6)
    inputs = random_ssd_inputs(rng, seqlen=50)
    _, free_state = ssd_reference(**inputs)
    free_norms = np.sqrt((free_state**2).sum(axis=(-2, -1)))  # (batch, heads)
    bound = 0.5 * free_norms.min(axis=0) * np.array([0.5, 1.0, 1.5, 2.0]) / 2.0  # active for every head
    want_y, want_state = ssd_reference(**inputs, max_norm=bound)
    with jax.enable_x64(True):
        y, state = call(inputs, jnp.float64, impl="recurrent", mitigation=M.state_norm(bound))
        assert rel_err(y, want_y) < 1e-10 and rel_err(state, want_state) < 1e-10
        y_c, state_c = call(inputs, jnp.float64, impl="xla", chunk_size=8, mitigation=M.state_norm(bound))
    norms = np.sqrt((np.asarray(state_c) ** 2).sum(axis=(-2, -1)))
    assert np.all(free_norms > bound)  # the bound is active ...
    assert np.all(norms <= bound * (1 + 1e-12))  # ... and holds at chunk boundaries
    assert rel_err(y_c, want_y) > 1e-6  # (inside chunks the chunked form differs from the per-step clip)


def test_window_wider_than_sequence_is_identity():
    rng = np.random.default_rng(8)
    inputs = random_ssd_inputs(rng, seqlen=20)
    y, s = call(inputs, jnp.float32, impl="xla")
    for impl in ("xla", "recurrent"):
        yw, sw = call(inputs, jnp.float32, impl=impl, mitigation=M.sliding_window(21))
        assert rel_err(yw, y) < 1e-5 and rel_err(sw, s) < 1e-5


def test_segsum_is_finite_for_huge_decays():
    a = jnp.asarray(np.random.default_rng(0).uniform(-3e4, -1e4, (3, 17)), jnp.float32)
    grad = jax.grad(lambda a: jnp.sum(jnp.where(jnp.tril(jnp.ones((17, 17), bool)), jnp.exp(segsum(a)), 0.0)))(a)
    assert np.all(np.isfinite(np.asarray(grad)))
    out = np.asarray(segsum(a), np.float64)
    a64 = np.asarray(a, np.float64)
    for t in range(17):
        for s in range(t + 1):
            np.testing.assert_allclose(out[:, t, s], a64[:, s + 1 : t + 1].sum(-1), rtol=1e-5)


def test_gradient_finite_with_extreme_decay_and_resets():
    rng = np.random.default_rng(9)
    inputs = random_ssd_inputs(rng, seqlen=33)
    inputs["dt"] = inputs["dt"] * 200.0  # alpha underflows to 0 in float32
    seg = jnp.asarray(random_segment_ids(rng, 2, 33))
    grads = jax.grad(_loss_fn("xla", 8, seg, None, jnp.float32), argnums=range(7))(*[jnp.asarray(inputs[k], jnp.float32) for k in ARG_NAMES])
    for name, g in zip(ARG_NAMES, grads):
        assert np.all(np.isfinite(np.asarray(g))), name


@settings(max_examples=12, deadline=None)
@given(
    seqlen=st.integers(1, 40), groups=st.sampled_from([1, 2]), chunk=st.integers(1, 20), heads_per_group=st.integers(1, 3), seed=st.integers(0, 2**16)
)
def test_chunked_equals_definition_on_random_shapes(seqlen, groups, chunk, heads_per_group, seed):
    rng = np.random.default_rng(seed)
    inputs = random_ssd_inputs(rng, batch=1, seqlen=seqlen, heads=groups * heads_per_group, headdim=3, groups=groups, state=5)
    seg = random_segment_ids(rng, 1, seqlen, num_breaks=2) if seqlen > 2 else None
    want_y, want_state = ssd_reference(**inputs, segment_ids=seg)
    with jax.enable_x64(True):
        y, state = call(inputs, jnp.float64, impl="xla", chunk_size=chunk, segment_ids=seg)
    assert rel_err(y, want_y) < 1e-10 and rel_err(state, want_state) < 1e-10


def test_auto_is_xla_on_cpu():
    rng = np.random.default_rng(2)
    inputs = random_ssd_inputs(rng, seqlen=10)
    y_auto, _ = call(inputs, jnp.float32, impl="auto")
    y_xla, _ = call(inputs, jnp.float32, impl="xla")
    np.testing.assert_array_equal(np.asarray(y_auto), np.asarray(y_xla))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(x=np.zeros((2, 5, 4))), "`x` must be"),
        (dict(dt=np.ones((2, 5, 3))), "`dt`"),
        (dict(A=np.ones((3,))), "`A`"),
        (dict(B=np.ones((2, 5, 3, 16)), C=np.ones((2, 5, 3, 16))), "multiple of groups"),
        (dict(C=np.ones((2, 5, 2, 15))), "`C`"),
        (dict(D=np.ones((5,))), "`D`"),
        (dict(initial_state=np.ones((2, 4, 8, 15))), "`initial_state`"),
    ],
)
def test_bad_shapes_name_the_argument(change, message):
    rng = np.random.default_rng(0)
    a = random_ssd_inputs(rng, seqlen=5)
    a.update(change)
    a = {k: jnp.asarray(v, jnp.float32) for k, v in a.items()}
    with pytest.raises(ValueError, match=message):
        ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], initial_state=a["initial_state"])


def test_bad_options_are_rejected():
    a = {k: jnp.asarray(v, jnp.float32) for k, v in random_ssd_inputs(np.random.default_rng(0), seqlen=5).items()}
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"])
    with pytest.raises(ValueError, match="impl"):
        ssd(*args, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(*args, chunk_size=0)
    with pytest.raises(ValueError, match="segment_ids"):
        ssd(*args, segment_ids=jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        ssd(*args, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="window"):
        M.sliding_window(0)
    with pytest.raises(ValueError, match="cannot be composed"):
        M.compose(M.state_norm(1.0), M.sliding_window(4))
    with pytest.raises(ValueError, match="alpha_scale"):
        M.forget_more(1.5, 0.5)
    with pytest.raises(ValueError, match="mitigation.alpha_scale"):
        ssd(*args, mitigation=M.forget_more(np.full((3,), 0.9), 0.5))
    with pytest.raises(TypeError, match="mitigation"):
        ssd(*args, mitigation={"window": 3})


PALLAS_MITIGATIONS = [c for c in MITIGATION_CASES if c[0] in ("forget_more_per_head", "dt_scale", "window_5", "composed")]


@pytest.mark.parametrize("name,mitigation,ref_kwargs", PALLAS_MITIGATIONS, ids=[c[0] for c in PALLAS_MITIGATIONS])
def test_mitigations_exact_through_the_kernels(name, mitigation, ref_kwargs):
    """impl="pallas" (the GPU launcher in interpret mode on CPU) gives the definition's output too."""
    rng = np.random.default_rng(11)
    inputs = random_ssd_inputs(rng, seqlen=70, headdim=16, state=16)
    seg = random_segment_ids(rng, 2, 70)
    want_y, want_state = ssd_reference(**inputs, segment_ids=seg, **ref_kwargs)
    with jax.enable_x64(True):
        y, state = call(inputs, jnp.float64, impl="pallas", chunk_size=64, segment_ids=seg, mitigation=mitigation)
    assert rel_err(y, want_y) < 1e-9 and rel_err(state, want_state) < 1e-9


# --------------------------------------------------------------------------------------------------
# bad input: every failure a named error; non-finite values propagate
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x", "dt", "A", "B", "C", "D", "initial_state"])
def test_non_float_arrays_are_refused_naming_the_argument(name):
    """Integer ``dt`` and ``A`` (and any other array argument) are refused, not cast silently."""
    a = {k: jnp.asarray(v, jnp.float32) for k, v in random_ssd_inputs(np.random.default_rng(0), seqlen=5).items()}
    a[name] = jnp.ones(a[name].shape, jnp.int32)
    with pytest.raises(ValueError, match=f"`{name}` must be floating point .*got dtype int32"):
        ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], initial_state=a["initial_state"])


def test_empty_sequence_is_refused():
    a = {k: jnp.asarray(v, jnp.float32) for k, v in random_ssd_inputs(np.random.default_rng(0), seqlen=5).items()}
    empty = {k: (v[:, :0] if k in ("x", "dt", "B", "C") else v) for k, v in a.items()}
    with pytest.raises(ValueError, match=r"`x` has an empty sequence axis \(seqlen = 0\)"):
        ssd(empty["x"], empty["dt"], empty["A"], empty["B"], empty["C"])


NON_FINITE = [  # (argument, index of the bad value, value); batch row 0, position 21, head 1 (group 0)
    ("x", (0, 21, 1), np.nan),
    ("dt", (0, 21, 1), np.inf),
    ("B", (0, 21, 0), np.nan),
]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("name,index,value", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_inputs_propagate(impl, name, index, value):
    """NaN / Inf are never replaced: y is non-finite from the bad position on (resets included) in the heads that
    read it, and so is their final state; other batch rows and other heads stay finite (ssd()'s docstring).
    Chunk 16, 45 positions (odd), resets, an initial state; "pallas" in interpret mode."""
    rng = np.random.default_rng(12)
    inputs = random_ssd_inputs(rng, seqlen=45, headdim=16, state=16, groups=2)  # heads 0, 1 read group 0
    seg = jnp.asarray(random_segment_ids(rng, 2, 45))
    inputs[name] = np.array(inputs[name])
    inputs[name][index] = value
    a = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    y, state = ssd(
        a["x"],
        a["dt"],
        a["A"],
        a["B"],
        a["C"],
        D=a["D"],
        initial_state=a["initial_state"],
        segment_ids=seg,
        chunk_size=64 if impl == "pallas" else 16,
        impl=impl,
    )
    bad_y, bad_state = ~np.isfinite(np.asarray(y)), ~np.isfinite(np.asarray(state))  # (b, l, h, p), (b, h, p, n)
    heads = [0, 1] if name == "B" else [1]  # B is read by every head of its group
    others = [h for h in range(4) if h not in heads]
    t = index[1]
    assert bad_y[0, t:][:, heads].any(axis=-1).all()  # every position from t on, resets included
    assert bad_state[0, heads].any(axis=(-2, -1)).all()
    assert not bad_y[1].any() and not bad_state[1].any()  # the other batch row
    assert not bad_y[0][:, others].any() and not bad_state[0, others].any()  # heads that do not read the value
    if impl == "xla":  # chunk 16: the positions before the bad one's chunk are not reached
        assert not bad_y[0, : t - t % 16].any()


def test_non_finite_C_reaches_its_position_only():
    rng = np.random.default_rng(13)
    inputs = random_ssd_inputs(rng, seqlen=30, groups=2)
    inputs["C"] = np.array(inputs["C"])
    inputs["C"][1, 7, 1] = np.inf  # batch row 1, position 7, group 1 (heads 2, 3)
    a = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    for impl in ("recurrent", "xla"):
        y, state = ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], chunk_size=8, impl=impl)
        bad = ~np.isfinite(np.asarray(y))
        assert bad[1, 7, 2:].all() and bad.sum() == bad[1, 7, 2:].size, impl
        assert np.isfinite(np.asarray(state)).all(), impl
