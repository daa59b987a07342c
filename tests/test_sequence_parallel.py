"""ssm_jax.parallel.sequence: the sequence split over 8 CPU devices equals the single-device computation.

Meshes (seq=8) and (data=2, seq=4); global length 104 (13 positions per shard with seq=8, 26 with seq=4:
neither a multiple of the chunk size 8), groups 2, an initial state, and segment resets exactly at a
shard boundary, inside shards, and documents spanning several shards.

Thresholds: float64 SSD values and gradients 1e-10 relative to the largest element (the sharded scan is
exact; only rounding differs); float32 SSD 2e-5; float32 model logits 1e-5, loss 1e-5 and parameter
gradients 2e-5 per parameter array; after three AdamW steps, parameters 1e-4 relative to each array's
largest element (measured: 4e-16 float64, 2e-7 float32 SSD, 1.3e-6 model, 4e-6 after training).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh

from reference import random_ssd_inputs, ssd_reference
from ssm_jax import mitigations as M
from ssm_jax import ssd
from ssm_jax.model import Mamba2Config, Mamba2LM
from ssm_jax.parallel import sequence as sp

ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")
SEQLEN = 104
CHUNK = 8
MESHES = {"seq8": ((8,), ("seq",), None), "data2_seq4": ((2, 4), ("data", "seq"), "data")}


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def spec_of(array) -> tuple:
    """The array's PartitionSpec as a tuple without trailing Nones."""
    spec = tuple(array.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def make_mesh(name):
    shape, axes, batch_axis = MESHES[name]
    return Mesh(np.asarray(jax.devices()[:8]).reshape(shape), axes), batch_axis


def segment_ids():
    """Row 0: a reset exactly at the seq=8 shard boundary 13, two inside shard 2 (30, 31), one at the
    seq=4 boundary 78. Row 1: one document over shards 0-3 (seq=8), then one from 47 to the end."""
    seg = np.zeros((2, SEQLEN), np.int32)
    seg[0, 13:] = 1
    seg[0, 30:] = 2
    seg[0, 31:] = 1  # a change back to an earlier id is a reset too
    seg[0, 78:] = 5
    seg[1, 47:] = 3
    return seg


@pytest.fixture(scope="module")
def ssd_case():
    rng = np.random.default_rng(0)
    inputs = random_ssd_inputs(rng, batch=2, seqlen=SEQLEN, heads=4, headdim=8, groups=2, state=16)
    weights = np.random.default_rng(1)
    wy = weights.standard_normal((2, SEQLEN, 4, 8))
    ws = weights.standard_normal((2, 4, 8, 16))
    return inputs, segment_ids(), wy, ws


def _loss(run, seg, wy, ws):
    def loss(*args):
        a = dict(zip(ARG_NAMES, args))
        y, state = run(a, seg)
        return jnp.sum(y * wy) + jnp.sum(state * ws), (y, state)

    return loss


def _single(a, seg, impl="xla", mitigation=None):
    return ssd(
        a["x"],
        a["dt"],
        a["A"],
        a["B"],
        a["C"],
        D=a["D"],
        initial_state=a["initial_state"],
        segment_ids=seg,
        chunk_size=CHUNK,
        mitigation=mitigation,
        impl=impl,
    )


def _sharded(mesh, batch_axis, impl="xla", mitigation=None):
    def run(a, seg):
        return sp.ssd_sequence_parallel(
            a["x"],
            a["dt"],
            a["A"],
            a["B"],
            a["C"],
            mesh=mesh,
            seq_axis="seq",
            batch_axis=batch_axis,
            D=a["D"],
            initial_state=a["initial_state"],
            segment_ids=seg,
            chunk_size=CHUNK,
            mitigation=mitigation,
            impl=impl,
        )

    return run


@pytest.fixture(scope="module")
def ssd_reference_grads(ssd_case):
    inputs, seg, wy, ws = ssd_case
    with jax.enable_x64(True):
        args = [jnp.asarray(inputs[k], jnp.float64) for k in ARG_NAMES]
        (_, (y, state)), grads = jax.jit(jax.value_and_grad(_loss(_single, jnp.asarray(seg), wy, ws), argnums=range(7), has_aux=True))(*args)
        return np.asarray(y), np.asarray(state), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ssd_values_and_gradients_float64(mesh_name, ssd_case, ssd_reference_grads):
    inputs, seg, wy, ws = ssd_case
    want_y, want_state, want_grads = ssd_reference_grads
    # the single-device scan itself is right (float64 definition)
    ref_y, ref_state = ssd_reference(**inputs, segment_ids=seg)
    assert rel_err(want_y, ref_y) < 1e-10 and rel_err(want_state, ref_state) < 1e-10
    mesh, batch_axis = make_mesh(mesh_name)
    with jax.enable_x64(True):
        args = [jnp.asarray(inputs[k], jnp.float64) for k in ARG_NAMES]
        loss = _loss(_sharded(mesh, batch_axis), jnp.asarray(seg), wy, ws)
        (_, (y, state)), grads = jax.jit(jax.value_and_grad(loss, argnums=range(7), has_aux=True))(*args)
        assert y.dtype == jnp.float64 and state.dtype == jnp.float64
    assert spec_of(y) == (batch_axis, "seq")  # the output stays sharded over the sequence
    assert rel_err(y, want_y) < 1e-10
    assert rel_err(state, want_state) < 1e-10
    for name, g, w in zip(ARG_NAMES, grads, want_grads):
        assert rel_err(g, w) < 1e-10, name


def test_ssd_float32_recurrent_impl_and_input_mitigations(ssd_case):
    """float32 inputs, impl="recurrent" inside the shards, forget_more and dt_scale composed."""
    inputs, seg, _, _ = ssd_case
    mesh, batch_axis = make_mesh("data2_seq4")
    mitigation = M.forget_more(0.95, 0.7) | M.dt_scale(np.array([0.5, 1.0, 0.8, 0.6]))
    want_y, want_state = ssd_reference(**inputs, segment_ids=seg, alpha_scale=0.95, b_scale=0.7, dt_scale=np.array([0.5, 1.0, 0.8, 0.6]))
    plain_y, _ = ssd_reference(**inputs, segment_ids=seg)
    assert rel_err(plain_y, want_y) > 1e-3  # the mitigation matters
    a = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    for impl in ("recurrent", "xla"):
        y, state = jax.jit(_sharded(mesh, batch_axis, impl=impl, mitigation=mitigation))(a, jnp.asarray(seg))
        assert y.dtype == jnp.float32 and state.dtype == jnp.float32
        assert rel_err(y, want_y) < 2e-5, impl
        assert rel_err(state, want_state) < 2e-5, impl


def test_ssd_without_optional_inputs_and_explicit_mesh(ssd_case):
    """No D, no initial state, no segments, on a jax.make_mesh mesh (Explicit axes in jax >= 0.9)."""
    inputs, _, _, _ = ssd_case
    mesh = jax.make_mesh((8,), ("seq",))
    a = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    want_y, want_state = ssd_reference(**{k: v for k, v in inputs.items() if k not in ("D", "initial_state")})
    y, state = jax.jit(lambda a: sp.ssd_sequence_parallel(a["x"], a["dt"], a["A"], a["B"], a["C"], mesh=mesh, seq_axis="seq", chunk_size=CHUNK))(a)
    assert rel_err(y, want_y) < 2e-5 and rel_err(state, want_state) < 2e-5


def test_unsupported_mitigations_and_shapes_raise(ssd_case):
    inputs, _, _, _ = ssd_case
    mesh, _ = make_mesh("seq8")
    a = {k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()}
    for mitigation, name in (
        (M.state_norm(1.0), "state_norm"),
        (M.sliding_window(16), "sliding_window"),
        (M.forget_more() | M.state_norm(2.0), "state_norm"),
    ):
        with pytest.raises(ValueError, match=name):
            sp.ssd_sequence_parallel(a["x"], a["dt"], a["A"], a["B"], a["C"], mesh=mesh, seq_axis="seq", mitigation=mitigation)
    with pytest.raises(ValueError, match="not divisible"):
        sp.ssd_sequence_parallel(a["x"][:, :100], a["dt"][:, :100], a["A"], a["B"][:, :100], a["C"][:, :100], mesh=mesh, seq_axis="seq")


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

TINY = Mamba2Config(
    d_model=32, n_layer=2, vocab_size=61, d_state=16, headdim=8, ngroups=2, chunk_size=CHUNK, ssd_impl="xla", dtype="float32", param_dtype="float32"
)


@pytest.fixture(scope="module")
def model_case():
    model = Mamba2LM(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, TINY.vocab_size, (2, SEQLEN + 1))
    batch = dict(
        inputs=jnp.asarray(tokens[:, :-1], jnp.int32),
        targets=jnp.asarray(tokens[:, 1:], jnp.int32),
        segment_ids=jnp.asarray(segment_ids()),
        loss_mask=jnp.asarray(rng.uniform(size=(2, SEQLEN)) > 0.1, jnp.float32),
    )
    return graphdef, params, batch


TX = optax.adamw(3e-3, weight_decay=0.1)
NUM_STEPS = 3


def _unsharded_loss(graphdef):
    def loss(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], segment_ids=batch["segment_ids"])
        total, count = sp.token_loss_sums(logits, batch["targets"], batch["loss_mask"], TINY.vocab_size)
        return total / count, logits

    return loss


def _train(loss_fn, params, batch):
    """NUM_STEPS AdamW steps; returns the final parameters, the losses, and the first step's gradients and aux."""

    @jax.jit
    def step(params, opt_state, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads, aux

    opt_state, losses, first = TX.init(params), [], None
    for _ in range(NUM_STEPS):
        params, opt_state, loss, grads, aux = step(params, opt_state, batch)
        losses.append(float(loss))
        first = first or (grads, aux)
    return params, losses, first[0], first[1]


@pytest.fixture(scope="module")
def unsharded_training(model_case):
    graphdef, params, batch = model_case
    return _train(_unsharded_loss(graphdef), params, batch)


def test_model_logits_and_parameter_gradients(model_case, unsharded_training):
    """``sharded_apply`` on the (seq=8) mesh: logits, loss and every parameter gradient."""
    graphdef, params, batch = model_case
    _, want_losses, want_grads, want_logits = unsharded_training
    mesh, batch_axis = make_mesh("seq8")

    def loss_fn(params, batch):
        logits = sp.sharded_apply(
            nnx.merge(graphdef, params), batch["inputs"], mesh=mesh, seq_axis="seq", batch_axis=batch_axis, segment_ids=batch["segment_ids"]
        )
        total, count = sp.token_loss_sums(logits, batch["targets"], batch["loss_mask"], TINY.vocab_size)
        return total / count, logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
    assert spec_of(logits) == (batch_axis, "seq")
    assert rel_err(logits, want_logits) < 1e-5
    assert abs(float(loss) - want_losses[0]) < 1e-5 * abs(want_losses[0])
    errors = jax.tree.map(rel_err, grads, want_grads)
    assert max(jax.tree.leaves(errors)) < 2e-5, errors


def test_training_steps_match_unsharded(model_case, unsharded_training):
    """AdamW steps through ``sequence_parallel_loss`` (chunked logits) on the (data=2, seq=4) mesh: the first
    step's parameter gradients, the losses and the parameters after NUM_STEPS steps track the unsharded
    training."""
    graphdef, params, batch = model_case
    want_params, want_losses, want_grads, _ = unsharded_training
    mesh, batch_axis = make_mesh("data2_seq4")

    def loss_fn(params, batch):
        # loss_chunk_size 8 on 26 positions per shard: three rematerialised chunks and a remainder of 2
        return sp.sequence_parallel_loss(nnx.merge(graphdef, params), batch, mesh=mesh, seq_axis="seq", batch_axis=batch_axis, loss_chunk_size=8)

    got_params, got_losses, got_grads, num_tokens = _train(loss_fn, params, batch)
    assert float(num_tokens) == float(jnp.sum(batch["loss_mask"]))
    assert want_losses[-1] < want_losses[0]  # it trains
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    grad_errors = jax.tree.map(rel_err, got_grads, want_grads)
    assert max(jax.tree.leaves(grad_errors)) < 2e-5, grad_errors
    errors = jax.tree.map(rel_err, got_params, want_params)
    assert max(jax.tree.leaves(errors)) < 1e-4, errors


def test_model_without_segments_and_too_short_shards(model_case):
    """Without segment ids the conv reads across every shard boundary; still the unsharded logits."""
    graphdef, params, batch = model_case
    mesh, _ = make_mesh("seq8")
    model = nnx.merge(graphdef, params)
    want = jax.jit(lambda ids: model(ids))(batch["inputs"])
    got = jax.jit(lambda ids: sp.sharded_apply(model, ids, mesh=mesh, seq_axis="seq"))(batch["inputs"])
    assert rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match="d_conv - 1"):  # 2 positions per shard < d_conv - 1 = 3
        sp.sharded_apply(model, batch["inputs"][:, :16], mesh=mesh, seq_axis="seq")
