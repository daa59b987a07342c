"""The stepwise kernel (exact per-step recurrence, ``ssm_jax.kernels.ssd_stepwise``) against the float64
definition (tests/reference.py) and ``ssd_recurrent``; interpret mode on CPU, compiled on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reference import random_segment_ids, random_ssd_inputs, ssd_reference
from ssm_jax import Mamba2Config, Mamba2LM, inference, ssd
from ssm_jax import mitigations as M
from ssm_jax import model as model_lib
from ssm_jax.kernels.ssd_stepwise import ssd_stepwise
from ssm_jax.ssd import document_ids, ssd_recurrent

HEADS = 4
ACTIVE = np.array([True, False, True, False])  # heads whose bound is below their state norm
BOUND = np.where(ACTIVE, 0.5, 1e3)  # the states here have norms of about 1 to 12, so 1e3 never clips


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def problem(seqlen, groups, resets=True, seed=0):
    """Random non-degenerate inputs (numpy float64) and their segment ids."""
    rng = np.random.default_rng(seed * 1000 + seqlen * 10 + groups)
    inputs = random_ssd_inputs(rng, seqlen=seqlen, groups=groups, heads=HEADS)
    seg = random_segment_ids(rng, 2, seqlen) if resets else None
    return inputs, seg


def kernel_args(inputs, seg, dtype, with_init=True):
    """``ssd_stepwise`` arguments: x, B, C in ``dtype``; dt_in, log_a, initial state in float32."""
    x, B, C = (jnp.asarray(inputs[k], dtype) for k in ("x", "B", "C"))
    dt = jnp.asarray(inputs["dt"], jnp.float32)
    log_a = dt * jnp.asarray(inputs["A"], jnp.float32)
    h0 = jnp.asarray(inputs["initial_state"], jnp.float32) if with_init else None
    doc = None if seg is None else document_ids(jnp.asarray(seg), x.shape[:2])
    return x, dt, log_a, B, C, h0, doc


def reference(inputs, seg, max_norm, with_init=True, round_to=None):
    """float64 definition, on the inputs rounded to ``round_to`` (what the kernel sees) if given."""
    ref = {k: v for k, v in inputs.items() if k != "D" and (with_init or k != "initial_state")}
    if round_to is not None:
        ref.update({k: np.asarray(jnp.asarray(ref[k], round_to), np.float64) for k in ("x", "B", "C")})
        ref["dt"] = np.asarray(jnp.asarray(ref["dt"], jnp.float32), np.float64)
    return ssd_reference(**ref, segment_ids=seg, max_norm=max_norm)


@pytest.mark.parametrize("seqlen,groups", [(37, 1), (37, 2), (100, 2)])
def test_float32_matches_float64_definition_with_clip(seqlen, groups):
    inputs, seg = problem(seqlen, groups)
    y, state = ssd_stepwise(*kernel_args(inputs, seg, jnp.float32), max_norm=jnp.asarray(BOUND), time_block=16)
    want_y, want_state = reference(inputs, seg, BOUND)
    assert y.dtype == jnp.float32 and state.dtype == jnp.float32
    # float32 inputs against float64 (the inputs are float32-rounded on the kernel side): < 1e-5 relative
    assert rel_err(y, want_y) < 1e-5 and rel_err(state, want_state) < 1e-5
    # The clip is active on the ACTIVE heads only: there the output differs from the unclipped one, elsewhere
    # it is the unclipped output exactly.
    free_y, _ = reference(inputs, seg, None)
    head_change = np.abs(want_y - free_y).max(axis=(0, 1, 3)) / np.abs(free_y).max()  # (heads,)
    assert np.all(head_change[ACTIVE] > 1e-2) and np.all(head_change[~ACTIVE] == 0.0)


@pytest.mark.parametrize("time_block", [1, 7, 16])
def test_no_clip_any_time_block(time_block):
    inputs, seg = problem(37, 2, seed=1)
    y, state = ssd_stepwise(*kernel_args(inputs, seg, jnp.float32), time_block=time_block)
    want_y, want_state = reference(inputs, seg, None)
    assert rel_err(y, want_y) < 1e-5 and rel_err(state, want_state) < 1e-5  # float32 vs float64


def test_without_initial_state_or_resets():
    inputs, _ = problem(37, 1, seed=2)
    args = kernel_args(inputs, None, jnp.float32, with_init=False)
    y, state = ssd_stepwise(*args, max_norm=jnp.asarray(BOUND))
    want_y, want_state = reference(inputs, None, BOUND, with_init=False)
    assert rel_err(y, want_y) < 1e-5 and rel_err(state, want_state) < 1e-5  # float32 vs float64


def test_bfloat16_inputs():
    inputs, seg = problem(100, 2, seed=3)
    args = kernel_args(inputs, seg, jnp.bfloat16)
    y, state = ssd_stepwise(*args, max_norm=jnp.asarray(BOUND), time_block=16)
    assert y.dtype == jnp.float32 and state.dtype == jnp.float32
    # Same bf16 values on both sides, float32 accumulation: only float32 rounding differs (< 1e-5 relative).
    want_y, want_state = reference(inputs, seg, BOUND, round_to=jnp.bfloat16)
    assert rel_err(y, want_y) < 1e-5 and rel_err(state, want_state) < 1e-5
    rec_y, rec_state = ssd_recurrent(*args, max_norm=jnp.asarray(BOUND))
    assert rel_err(y, rec_y) < 1e-5 and rel_err(state, rec_state) < 1e-5


@pytest.mark.parametrize("impl", ["recurrent", "stepwise"])
def test_bfloat16_gradients_of_shared_B_and_C_sum_over_heads_in_float32(impl):
    """B and C are shared by the heads of a group, so their gradient sums the heads' gradients. That sum must run
    in float32: with the 130m model's 24 heads per group, summing in bf16 made the error of dB and dC 6e-3
    (found by the GPU suite) where the bf16 rounding of the result alone is 1.7e-3.

    Reference: the same function on float32 copies of the bf16 inputs, differentiated with the cotangent the
    bf16 path receives (``y`` is bf16, so the cotangent reaching it is rounded to bf16). What is left is the
    rounding of the returned gradient: threshold 2.5e-3 relative (the 2-norm of the error over that of dB)."""
    rng = np.random.default_rng(11)
    b, l, h = 2, 67, 24
    raw = random_ssd_inputs(rng, batch=b, seqlen=l, heads=h, headdim=16, groups=1, state=32)
    args = {k: jnp.asarray(raw[k], jnp.bfloat16 if k in ("x", "B", "C") else jnp.float32) for k in ("x", "dt", "A", "B", "C", "initial_state")}
    cot = jnp.asarray(rng.standard_normal((b, l, h, 16)), jnp.bfloat16).astype(jnp.float32)  # (b, l, h, p)
    mitigation = M.state_norm(jnp.asarray(1.0, jnp.float32))

    def grads(a, impl):
        def loss(a):
            y, _ = ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], initial_state=a["initial_state"], mitigation=mitigation, chunk_size=16, impl=impl)
            return jnp.sum(y.astype(jnp.float32) * cot)

        return jax.grad(loss)(a)

    got = grads(args, impl)
    want = grads({k: v.astype(jnp.float32) for k, v in args.items()}, "recurrent")
    for name in ("B", "C"):
        assert got[name].dtype == jnp.bfloat16
        g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        assert np.linalg.norm(g - w) / np.linalg.norm(w) <= 2.5e-3, name


def test_scalar_bound_matches_recurrent():
    inputs, seg = problem(37, 2, seed=4)
    args = kernel_args(inputs, seg, jnp.float32)
    y, state = ssd_stepwise(*args, max_norm=1.0)
    rec_y, rec_state = ssd_recurrent(*args, max_norm=1.0)
    assert rel_err(y, rec_y) < 1e-5 and rel_err(state, rec_state) < 1e-5  # float32, same inputs


def test_gradients_equal_float64_finite_differences():
    """Directional derivative of a scalar loss through the custom_vjp against central differences of the
    float64 definition (x, dt, A, B, C, the initial state and max_norm all perturbed)."""
    inputs, seg = problem(20, 2, seed=5)
    rng = np.random.default_rng(6)
    names = ("x", "dt", "A", "B", "C", "initial_state")
    direction = {k: rng.standard_normal(np.shape(inputs[k])) for k in names}
    direction["dt"] *= inputs["dt"] * 0.1  # keep dt positive
    d_bound = rng.standard_normal(HEADS)
    cot_y = rng.standard_normal((2, 20, HEADS, 8))
    cot_state = rng.standard_normal((2, HEADS, 8, 16))

    def ref_loss(eps):
        perturbed = {k: inputs[k] + eps * direction[k] for k in names}
        y, state = ssd_reference(**perturbed, segment_ids=seg, max_norm=BOUND + eps * d_bound)
        return np.sum(y * cot_y) + np.sum(state * cot_state)

    with jax.enable_x64(True):
        doc = document_ids(jnp.asarray(seg), (2, 20))

        def loss(x, dt, A, B, C, h0, bound):
            y, state = ssd_stepwise(x, dt, dt * A, B, C, h0, doc, max_norm=bound, time_block=8)
            return jnp.sum(y * cot_y) + jnp.sum(state * cot_state)

        primals = [jnp.asarray(inputs[k]) for k in names] + [jnp.asarray(BOUND)]
        grads = jax.grad(loss, argnums=tuple(range(7)))(*primals)
        got = sum(float(jnp.sum(g * d)) for g, d in zip(grads, [direction[k] for k in names] + [d_bound]))
    eps = 1e-6
    want = (ref_loss(eps) - ref_loss(-eps)) / (2 * eps)
    assert abs(got - want) / abs(want) < 1e-6  # float64 gradients vs float64 central differences


def test_ssd_impl_stepwise_equals_recurrent_with_state_norm_and_window_fallback():
    inputs, seg = problem(37, 2, seed=7)
    a = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    call = lambda impl, mitigation: ssd(
        a["x"],
        a["dt"],
        a["A"],
        a["B"],
        a["C"],
        D=a["D"],
        initial_state=a["initial_state"],
        segment_ids=jnp.asarray(seg),
        mitigation=mitigation,
        impl=impl,
        chunk_size=16,
    )
    for mitigation in (M.state_norm(jnp.asarray(BOUND)), M.forget_more()):
        (y, state), (want_y, want_state) = call("stepwise", mitigation), call("recurrent", mitigation)
        assert rel_err(y, want_y) < 1e-5 and rel_err(state, want_state) < 1e-5  # float32, same inputs
    # A sliding window falls back to the recurrence: the same computation, identical results.
    (y, state), (want_y, want_state) = call("stepwise", M.sliding_window(9)), call("recurrent", M.sliding_window(9))
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(state, want_state)


def test_unsupported_inputs_raise():
    inputs, _ = problem(10, 1, seed=8, resets=False)
    x, dt, log_a, B, C, h0, _ = kernel_args(inputs, None, jnp.float32)
    with pytest.raises(ValueError, match="headdim.*power of two"):
        ssd_stepwise(x[..., :6], dt, log_a, B, C)
    with pytest.raises(ValueError, match="state.*power of two"):
        ssd_stepwise(x, dt, log_a, B[..., :12], C[..., :12])
    with pytest.raises(ValueError, match="time_block"):
        ssd_stepwise(x, dt, log_a, B, C, time_block=0)
    with pytest.raises(ValueError, match="max_norm"):
        ssd_stepwise(x, dt, log_a, B, C, max_norm=jnp.ones(3))


# --------------------------------------------------------------------------------------------------
# the model's streaming path
# --------------------------------------------------------------------------------------------------

CFG = Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, ngroups=2, chunk_size=16)


def test_streaming_state_norm_losses_stepwise_equal_recurrent():
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 60), 0, CFG.vocab_size)
    mitigation = M.state_norm(0.05)
    losses = {}
    for impl in ("stepwise", "recurrent"):
        model = Mamba2LM(CFG.replace(ssd_impl=impl), rngs=nnx.Rngs(0))
        losses[impl] = inference.stream_losses(model, ids, chunk_len=23, mitigation=mitigation)
    np.testing.assert_allclose(losses["stepwise"], losses["recurrent"], rtol=1e-5, atol=1e-6)


def test_streaming_impl_selection(monkeypatch):
    cache, norm = object(), M.state_norm(1.0)
    cfg = CFG.replace(headdim=16, d_state=16, chunk_size=64)  # sizes the chunked kernels take
    pick = lambda impl, mitigation=norm, c=cache, t=7: model_lib._streaming_impl(impl, mitigation, c, cfg, t)
    assert pick("stepwise") == "stepwise"  # forced
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert pick("auto") == "recurrent" and pick("pallas") == "recurrent"  # not a GPU backend
    assert pick("auto", M.forget_more()) == "auto" and pick("xla", c=None) == "xla"  # no per-step clip
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert pick("auto") == "stepwise" and pick("pallas") == "stepwise"
    assert pick("xla") == "recurrent" and pick("recurrent") == "recurrent"
    assert model_lib._streaming_impl("auto", norm, cache, CFG, 7) == "recurrent"  # headdim 8: no chunked kernels
    # one cached token: the recurrence under "auto" (no chunk padding); an explicit choice is kept
    assert pick("auto", None, t=1) == "recurrent" and pick("auto", M.forget_more(), t=1) == "recurrent"
    assert pick("pallas", None, t=1) == "pallas" and pick("auto", None, c=None, t=1) == "auto"
