"""The Pallas SSD kernels (ssm_jax.kernels) against the definitions, on CPU in interpret mode.

* GPU launcher (Triton kernels) in ``interpret=True``; TPU launcher (Mosaic kernels) under
  ``pltpu.InterpretParams()``;
* values and gradients (x, dt, A, B, C, D, initial_state) through ``ssm_jax.ssd(impl="pallas")`` and through
  the raw contract ``ssd_ops.ssd_pallas``, against the float64 step-by-step reference (tests/reference.py) and
  the float64 recurrence's autodiff gradients: odd lengths, document resets, initial state, groups, chunk sizes
  64 and 128, state_norm, bf16 inputs, tile sizes other than the defaults;
* the TPU kernels lowered for TPU (Mosaic block-shape rules) at the public model shapes, the GPU kernels lowered
  through Triton;
* what the kernels accept (``ssm_jax.kernels.support``): sizes that work in interpret mode, and every size, dtype
  and chunk the compiled kernels do not take refused up front with the accepted values named.

Float64 runs check the algebra to ~1e-10; bf16 runs check the accuracy target (relative error <= 3e-3 against
the float32 reference). Tests that need a GPU are marked ``gpu`` (skipped on CPU).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import random_segment_ids, random_ssd_inputs, ssd_reference
from ssm_jax import mitigations as M
from ssm_jax import ssd
from ssm_jax.kernels import gpu_scan, ssd_ops, support
from ssm_jax.kernels.config import KernelConfig, Launch, make_plan
from ssm_jax.ssd import document_ids, resolve_impl, ssd_chunked

ARGS = ("x", "dt", "A", "B", "C", "D", "initial_state")


def rel(got, want) -> float:
    """Norm-wise relative error ``||got - want|| / ||want||``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


@pytest.fixture
def launcher(request, monkeypatch):
    """Runs ``ssd(impl="pallas")`` through the named launcher in interpret mode (the CPU's default is "gpu")."""
    monkeypatch.setattr(support, "default_target", lambda impl="pallas": support.Target(request.param, True))
    return request.param


def _inputs(seed, batch=2, seqlen=77, heads=4, headdim=8, groups=2, state=16, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    inp = random_ssd_inputs(rng, batch=batch, seqlen=seqlen, heads=heads, headdim=headdim, groups=groups, state=state)
    seg = random_segment_ids(rng, batch, seqlen)
    cot = rng.standard_normal((batch, seqlen, heads, headdim))
    cot_state = rng.standard_normal((batch, heads, headdim, state))
    acc = jnp.promote_types(dtype, jnp.float32)
    arrays = {k: jnp.asarray(v, dtype if k in ("x", "B", "C") else acc) for k, v in inp.items()}
    return inp, arrays, seg, jnp.asarray(cot, acc), jnp.asarray(cot_state, acc)


def _loss(impl, seg, cot, cot_state, chunk_size, mitigation=None):
    def f(x, dt, A, B, C, D, initial_state):
        y, final = ssd(
            x,
            dt,
            A,
            B,
            C,
            D=D,
            initial_state=initial_state,
            chunk_size=chunk_size,
            segment_ids=None if seg is None else jnp.asarray(seg),
            mitigation=mitigation,
            impl=impl,
        )
        return jnp.sum(y.astype(cot.dtype) * cot) + jnp.sum(final * cot_state)

    return f


# ------------------------------------------------------------------------------------------------
# float64: the kernels' algebra against the definitions
# ------------------------------------------------------------------------------------------------


# The TPU interpreter evaluates kernels in host callbacks, which do not see a scoped ``jax.enable_x64``: the TPU
# launcher is checked in float32 (against the same float64 references), the GPU launcher in float64.
PRECISION = {"gpu": (jnp.float64, 1e-10, 1e-9), "tpu": (jnp.float32, 2e-5, 1e-4)}


@pytest.mark.parametrize("launcher", ["gpu", "tpu"], indirect=True, ids=["gpu_launcher", "tpu_launcher"])
@pytest.mark.parametrize("seqlen,chunk,segments", [(77, 64, True), (150, 128, False)])
def test_values_match_float64_reference(launcher, seqlen, chunk, segments):
    dtype, tol, _ = PRECISION[launcher]
    with jax.enable_x64(dtype == jnp.float64):
        inp, a, seg, _, _ = _inputs(0, seqlen=seqlen, dtype=dtype)
        seg = seg if segments else None
        y, final = ssd(
            a["x"],
            a["dt"],
            a["A"],
            a["B"],
            a["C"],
            D=a["D"],
            initial_state=a["initial_state"],
            segment_ids=None if seg is None else jnp.asarray(seg),
            chunk_size=chunk,
            impl="pallas",
        )
        assert y.dtype == dtype and final.dtype == dtype
    y_ref, final_ref = ssd_reference(**inp, segment_ids=seg)
    assert rel(y, y_ref) < tol
    assert rel(final, final_ref) < tol


@pytest.mark.parametrize("launcher", ["gpu", "tpu"], indirect=True, ids=["gpu_launcher", "tpu_launcher"])
def test_gradients_match_float64_recurrence(launcher):
    """Every gradient (x, dt, A, B, C, D, initial_state) with resets, G=2 and an odd length."""
    dtype, _, tol = PRECISION[launcher]
    with jax.enable_x64(dtype == jnp.float64):
        _, a, seg, cot, cot_state = _inputs(1, seqlen=77, dtype=dtype)
        args = tuple(a[k] for k in ARGS)
        grads = jax.grad(_loss("pallas", seg, cot, cot_state, 64), argnums=range(7))(*args)
    with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(np.asarray(v), jnp.float64) for v in args)
        c64, cs64 = jnp.asarray(np.asarray(cot), jnp.float64), jnp.asarray(np.asarray(cot_state), jnp.float64)
        want = jax.grad(_loss("recurrent", seg, c64, cs64, 64), argnums=range(7))(*args64)
        for name, g, w in zip(ARGS, grads, want):
            assert rel(g, w) < tol, name


@pytest.mark.parametrize(
    "config",
    [
        KernelConfig(block_t=32, scan_block=32, state_rows=4, cols_heads=1, state_splits=1),
        KernelConfig(block_t=64, scan_block=128, cols_heads=4, scan_programs=1),
    ],
    ids=["blocks32_rows4_heads1", "block64_one_step_heads4"],
)
def test_gradients_with_other_tile_sizes(config):
    """Tile sizes other than the defaults: several row/column blocks per chunk (block_t=32, chunk 128), state rows
    split over programs, one or several row steps per chunk in the state scan, one head or a whole group per
    ``bwd_cols`` program, the state columns of ``bwd_group_rows`` in one block; a padded length, resets and an
    initial state: values and gradients against the float64 chunked reference."""
    with jax.enable_x64(True):
        _, a, seg, cot, cot_state = _inputs(2, seqlen=150, heads=8, groups=2, state=32)
        doc = document_ids(jnp.asarray(seg), seg.shape)
        dt_in, log_a = a["dt"], a["dt"] * a["A"]

        def loss(fn):
            def f(x, dt_in, log_a, B, C, h0):
                y, final = fn(x, dt_in, log_a, B, C, h0)
                return jnp.sum(y * cot) + jnp.sum(final * cot_state)

            return f

        kern = lambda *xs: ssd_ops.ssd_pallas(*xs, doc, chunk_size=128, config=config)
        ref = lambda *xs: ssd_chunked(*xs, doc, chunk_size=128)
        args = (a["x"], dt_in, log_a, a["B"], a["C"], a["initial_state"])
        y, final = kern(*args)
        y_ref, final_ref = ref(*args)
        assert rel(y, y_ref) < 1e-10 and rel(final, final_ref) < 1e-10
        grads = jax.grad(loss(kern), argnums=range(6))(*args)
        want = jax.grad(loss(ref), argnums=range(6))(*args)
        for name, g, w in zip(("x", "dt_in", "log_a", "B", "C", "initial_state"), grads, want):
            assert rel(g, w) < 1e-9, name


@pytest.mark.parametrize("programs", [16, 24], ids=["runs_4_3", "runs_3_3_1"])
def test_segmented_state_scans_match_the_chunked_reference(programs):
    """The state scans over runs of chunks (forward and backward: runs scanned side by side from a zero state, then
    joined by ``gpu_scan.run_entering``, in the Triton output kernel (forward alone) and in XLA (with gradients))
    with 7 chunks in runs that do not divide them, document resets inside and across runs, an initial state (first
    run) and a final-state cotangent (last run of the backward scan): values and gradients against the float64
    chunked reference."""
    with jax.enable_x64(True):
        _, a, seg, cot, cot_state = _inputs(12, batch=2, seqlen=64 * 7 - 5, heads=4, groups=2, state=16)
        doc = document_ids(jnp.asarray(seg), seg.shape)
        config = KernelConfig(scan_programs=programs)  # 2 x 4 (batch, head) programs: 2 or 3 runs per program

        def loss(fn):
            def f(*xs):
                y, final = fn(*xs)
                return jnp.sum(y * cot) + jnp.sum(final * cot_state)

            return f

        kern = lambda *xs: ssd_ops.ssd_pallas(*xs, doc, chunk_size=64, config=config)
        ref = lambda *xs: ssd_chunked(*xs, doc, chunk_size=64)
        args = (a["x"], a["dt"], a["dt"] * a["A"], a["B"], a["C"], a["initial_state"])
        for got, want in zip(kern(*args), ref(*args)):
            assert rel(got, want) < 1e-10
        grads = jax.grad(loss(kern), argnums=range(6))(*args)
        want = jax.grad(loss(ref), argnums=range(6))(*args)
        for name, g, w in zip(("x", "dt_in", "log_a", "B", "C", "initial_state"), grads, want):
            assert rel(g, w) < 1e-9, name


def test_segment_runs_cover_every_chunk():
    """``segment_run``: runs of equal length (the last one shorter), as many as the wanted programs allow, never
    empty."""
    assert gpu_scan.segment_run(64, 64, 256) == 16  # b2 x L16384: 4 runs of 16 chunks
    assert gpu_scan.segment_run(256, 32, 256) == 32  # b1 x L65536: 8 runs of 32
    assert gpu_scan.segment_run(7, 8, 24) == 3  # 3, 3, 1
    assert gpu_scan.segment_run(3, 8, 4096) == 1  # never more runs than chunks
    assert gpu_scan.segment_run(16, 256, 256) == 16  # enough programs: one run
    for nc in range(1, 40):
        for programs in (1, 3, 8):
            run = gpu_scan.segment_run(nc, programs, 64)
            nseg = -(-nc // run)
            assert 1 <= run <= nc and (nseg - 1) * run < nc


def test_extreme_decays_stay_finite_and_exact():
    """Log-decays down to -200 per step (dt up to 50, A down to -4): the factored decays of the blocks below the
    diagonal (``ssd_common.split_decay``) must neither overflow nor lose the surviving terms. Float64 kernels
    (16-row blocks: three below-diagonal pairs per row block) against the float64 chunked reference, values and
    gradients, with resets and an initial state."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        inp = random_ssd_inputs(rng, batch=1, seqlen=140, heads=4, headdim=8, groups=1, state=16, dt_range=(1e-3, 50.0), A_range=(0.1, 4.0))
        a = {k: jnp.asarray(v, jnp.float64) for k, v in inp.items()}
        doc = document_ids(jnp.asarray(random_segment_ids(rng, 1, 140)), (1, 140))
        cot = jnp.asarray(rng.standard_normal((1, 140, 4, 8)))
        args = (a["x"], a["dt"], a["dt"] * a["A"], a["B"], a["C"], a["initial_state"])

        def loss(fn):
            return lambda *xs: jnp.sum(fn(*xs)[0] * cot) + jnp.sum(fn(*xs)[1])

        kern = lambda *xs: ssd_ops.ssd_pallas(*xs, doc, chunk_size=64, config=KernelConfig(block_t=16))
        ref = lambda *xs: ssd_chunked(*xs, doc, chunk_size=64)
        y, final = kern(*args)
        y_ref, final_ref = ref(*args)
        assert bool(jnp.all(jnp.isfinite(y))) and rel(y, y_ref) < 1e-10 and rel(final, final_ref) < 1e-10
        grads = jax.grad(loss(kern), argnums=range(6))(*args)
        want = jax.grad(loss(ref), argnums=range(6))(*args)
        for name, g, w in zip(("x", "dt_in", "log_a", "B", "C", "initial_state"), grads, want):
            assert bool(jnp.all(jnp.isfinite(g))), name
            assert rel(g, w) < 1e-9, name


def test_state_norm_values_and_gradients():
    """state_norm: the per-head clip at chunk boundaries (``gpu_state_norm``: parallel chunk states, then the pass
    with the clip), as in the chunked reference (incl. d/d max_norm); chunk states in one or several row steps."""
    with jax.enable_x64(True):
        _, a, seg, cot, cot_state = _inputs(3, seqlen=100)
        mit = M.state_norm(jnp.asarray([0.5, 1.0, 2.0, 50.0]))
        args = tuple(a[k] for k in ARGS)
        grads = jax.grad(_loss("pallas", seg, cot, cot_state, 64, mit), argnums=range(7))(*args)
        want = jax.grad(_loss("xla", seg, cot, cot_state, 64, mit), argnums=range(7))(*args)
        for name, g, w in zip(ARGS, grads, want):
            assert rel(g, w) < 1e-9, name

        def of_bound(config):
            def f(x, log_a, B, m):
                y, final = ssd_ops.ssd_pallas(x, a["dt"], log_a, B, a["C"], a["initial_state"], None, chunk_size=64, max_norm=m, config=config)
                return jnp.sum(y * cot) + jnp.sum(final * cot_state)

            return f

        def of_bound_ref(x, log_a, B, m):
            y, final = ssd_chunked(x, a["dt"], log_a, B, a["C"], a["initial_state"], None, chunk_size=64, max_norm=m)
            return jnp.sum(y * cot) + jnp.sum(final * cot_state)

        bound_args = (a["x"], a["dt"] * a["A"], a["B"], jnp.asarray([0.5, 1.0, 2.0, 3.0]))
        want = jax.grad(of_bound_ref, argnums=range(4))(*bound_args)
        for config in (None, KernelConfig(scan_block=16)):
            grads = jax.grad(of_bound(config), argnums=range(4))(*bound_args)
            for name, g, w in zip(("x", "log_a", "B", "max_norm"), grads, want):
                assert rel(g, w) < 1e-9, (config, name)


def test_sliding_window_uses_the_chunked_path():
    with jax.enable_x64(True):
        inp, a, seg, _, _ = _inputs(4, seqlen=90)
        mit = M.sliding_window(40)
        y, final = ssd(
            a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], chunk_size=64, mitigation=mit, initial_state=a["initial_state"], impl="pallas"
        )
        y_ref, final_ref = ssd_reference(**inp, window=40)
        assert rel(y, y_ref) < 1e-10 and rel(final, final_ref) < 1e-10


def test_raw_contract_fused_skip_and_output_dtype():
    """``ssd_pallas`` returns float32 y without D by default; D and out_dtype can be fused into the kernel."""
    _, a, seg, _, _ = _inputs(5, seqlen=70, dtype=jnp.float32)
    doc = document_ids(jnp.asarray(seg), seg.shape)
    xs = (a["x"], a["dt"], a["dt"] * a["A"], a["B"], a["C"], a["initial_state"], doc)
    y, final = ssd_ops.ssd_pallas(*xs, chunk_size=64)
    y_ref, final_ref = ssd_chunked(*xs, chunk_size=64)
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32 and y.shape == a["x"].shape
    assert rel(y, y_ref) < 1e-5 and rel(final, final_ref) < 1e-5
    y_d, _ = ssd_ops.ssd_pallas(*xs, chunk_size=64, D=a["D"], out_dtype=jnp.bfloat16)
    assert y_d.dtype == jnp.bfloat16
    assert rel(y_d.astype(jnp.float32), y_ref + a["D"][:, None] * a["x"]) < 4e-3


# ------------------------------------------------------------------------------------------------
# bf16 inputs: the accuracy target (relative error <= 3e-3 against the float32 reference)
# ------------------------------------------------------------------------------------------------


def test_bf16_accuracy_against_float32_reference():
    rng = np.random.default_rng(6)
    b, l, h, p, g, n = 1, 300, 4, 32, 1, 64
    x = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.bfloat16)
    dt = jnp.asarray(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (b, l, h))), jnp.float32)
    A = -jnp.asarray(np.exp(rng.uniform(0.0, np.log(16.0), h)), jnp.float32)
    B = jnp.asarray(rng.standard_normal((b, l, g, n)), jnp.bfloat16)
    C = jnp.asarray(rng.standard_normal((b, l, g, n)), jnp.bfloat16)
    D = jnp.asarray(rng.standard_normal(h), jnp.float32)
    # A bf16-exact cotangent: a bf16 output rounds any cotangent to bf16 before it reaches the kernels.
    cot = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.bfloat16).astype(jnp.float32)

    def loss(impl):
        def f(x, dt, A, B, C, D):
            y, _ = ssd(x, dt, A, B, C, D=D, chunk_size=64, impl=impl)
            return jnp.sum(y.astype(jnp.float32) * cot), y

        return f

    (_, y), grads = jax.value_and_grad(loss("pallas"), argnums=range(6), has_aux=True)(x, dt, A, B, C, D)
    f32 = lambda v: v.astype(jnp.float32)
    (_, y_ref), want = jax.value_and_grad(loss("xla"), argnums=range(6), has_aux=True)(f32(x), dt, A, f32(B), f32(C), D)
    assert y.dtype == jnp.bfloat16
    assert rel(f32(y), y_ref) < 3e-3
    for name, gr, w in zip(("x", "dt", "A", "B", "C", "D"), grads, want):
        assert rel(f32(gr), w) < 3e-3, name


# ------------------------------------------------------------------------------------------------
# lowering (no accelerator needed) and errors
# ------------------------------------------------------------------------------------------------


def _lowered_text(launcher, platform, b, l, h, p=64, g=1, n=128, chunk=256, max_norm=None, config=None):
    x = jax.ShapeDtypeStruct((b, l, h, p), jnp.bfloat16)
    bc = jax.ShapeDtypeStruct((b, l, g, n), jnp.bfloat16)
    dt = jax.ShapeDtypeStruct((b, l, h), jnp.float32)
    h0 = jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)
    doc = jax.ShapeDtypeStruct((b, l), jnp.int32)
    D = jax.ShapeDtypeStruct((h,), jnp.float32)

    def f(x, dt, la, B, C, h0, doc, D):
        y, final = ssd_ops.ssd_pallas(
            x,
            dt,
            la,
            B,
            C,
            h0,
            doc,
            chunk_size=chunk,
            D=D,
            out_dtype=jnp.bfloat16,
            max_norm=max_norm,
            launcher=launcher,
            interpret=False,
            config=config,
        )
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

    grad = jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5, 7))
    return jax.jit(grad).trace(x, dt, dt, bc, bc, h0, doc, D).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("heads,max_norm", [(24, None), (80, 1.0)])
def test_tpu_kernels_lower_for_tpu_at_model_shapes(heads, max_norm):
    """Mosaic TPU accepts the blocks ((8, 128) rules), forward and backward, at the public model shapes."""
    text = _lowered_text("tpu", "tpu", 1, 512, heads, max_norm=max_norm)
    assert text.count("tpu_custom_call") == 3  # forward, states recompute, backward


@pytest.mark.parametrize("heads", [8, 24, 80])
def test_gpu_kernels_lower_through_triton(heads):
    """Triton block shapes (powers of two) at the public models' head counts (24 heads: 130m; 80: 2.7b), 1000
    tokens (padded), segments and an initial state, with the default kernels and with the other variants."""
    for config in (None, KernelConfig(block_t=32, cols_heads=1, state_splits=1, bwd_pairs=Launch(4, 2))):
        text = _lowered_text("gpu", "cuda", 2, 1000, heads, config=config)
        assert text.count("__gpu$xla.gpu.triton") >= 8  # scalars, scan, C B^T, output; scan, cols, pairs, rows
    text = _lowered_text("gpu", "cuda", 2, 1000, heads, max_norm=1.0)  # state_norm: chunk states + the pass
    assert text.count('name = "ssd_state_norm_pass') == 2 and text.count('name = "ssd_chunk_states"') == 2


def test_mosaic_output_kernel_through_ssd_pallas():
    """``output_kernel="mosaic"`` (what "auto" picks on Hopper): ``ssd_pallas``'s forward with the Mosaic GPU output
    kernel (its interpreter on CPU) reading the states of a scan over runs of chunks completed by XLA (2 x 2
    programs, 3 chunks in runs of 1), bf16 inputs against the float32 chunked reference (relative error <= 5e-3:
    bf16 operands and output); gradients (Triton backward kernels) against the reference's (<= 1e-2); with document
    ids the Triton output kernel runs."""
    _, a, seg, cot, cot_state = _inputs(13, batch=2, seqlen=64 * 3 - 7, heads=2, headdim=64, groups=1, state=64, dtype=jnp.bfloat16)
    args = (a["x"], a["dt"], a["dt"] * a["A"], a["B"], a["C"], a["initial_state"])
    f32 = tuple(v.astype(jnp.float32) for v in args)
    config = KernelConfig(output_kernel="mosaic")
    plan = make_plan(jnp.bfloat16, jnp.bfloat16, 64, "gpu", True, config)
    layouts = [v[:, :128] for v in (a["x"], a["B"], a["C"])] + [jnp.swapaxes(a["dt"][:, :128], 1, 2)]
    states = jnp.zeros((2, 2, 2, 64, 64), jnp.bfloat16)
    assert ssd_ops.use_mosaic_output(plan, *layouts, states, None, jnp.bfloat16)
    assert not ssd_ops.use_mosaic_output(plan, *layouts, states, jnp.zeros((2, 128), jnp.int32), jnp.bfloat16)
    auto = make_plan(jnp.bfloat16, jnp.bfloat16, 64, "gpu", True, KernelConfig())
    assert not ssd_ops.use_mosaic_output(auto, *layouts, states, None, jnp.bfloat16)  # "auto": Hopper only

    def loss(fn):
        def f(*xs):
            y, final = fn(*xs)
            return jnp.sum(y.astype(jnp.float32) * cot) + jnp.sum(final * cot_state)

        return f

    kern = lambda *xs: ssd_ops.ssd_pallas(*xs, None, chunk_size=64, launcher="gpu", config=config)
    ref = lambda *xs: ssd_chunked(*xs, None, chunk_size=64)
    (y, final), (y_ref, final_ref) = kern(*args), ref(*f32)
    assert rel(y, y_ref) < 5e-3 and rel(final, final_ref) < 5e-3
    grads = jax.grad(loss(kern), argnums=range(6))(*args)
    want = jax.grad(loss(ref), argnums=range(6))(*f32)
    for name, g, w in zip(("x", "dt_in", "log_a", "B", "C", "initial_state"), grads, want):
        assert rel(g, w) < 1e-2, name
    doc = document_ids(jnp.asarray(seg), seg.shape)
    y_doc, _ = ssd_ops.ssd_pallas(*args, doc, chunk_size=64, launcher="gpu", config=config)
    assert rel(y_doc, ssd_chunked(*f32, doc, chunk_size=64)[0]) < 5e-3


def test_mosaic_output_kernel_lowers_for_cuda():
    """At the benchmark's few-sequences shape (b2 x 16384 tokens: a scan over runs of chunks, joined by XLA) the
    forward lowers with one Mosaic GPU call and Triton kernels; a gradient keeps the output kernel Mosaic too."""
    x = jax.ShapeDtypeStruct((2, 16384, 32, 64), jnp.bfloat16)
    bc = jax.ShapeDtypeStruct((2, 16384, 1, 128), jnp.bfloat16)
    dt = jax.ShapeDtypeStruct((2, 16384, 32), jnp.float32)

    def f(x, dt, la, B, C):
        return ssd_ops.ssd_pallas(
            x,
            dt,
            la,
            B,
            C,
            None,
            None,
            chunk_size=256,
            out_dtype=jnp.bfloat16,
            launcher="gpu",
            interpret=False,
            config=KernelConfig(output_kernel="mosaic"),
        )[0]

    text = jax.jit(f).trace(x, dt, dt, bc, bc).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1 and "__gpu$xla.gpu.triton" in text
    loss = lambda *xs: jnp.sum(f(*xs).astype(jnp.float32))
    grad = jax.value_and_grad(loss)  # (jax.grad alone: y is not needed, the output kernel is dropped)
    text = jax.jit(grad).trace(x, dt, dt, bc, bc).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1


def test_gpu_kernels_lower_at_one_million_tokens():
    """1M tokens (x has 2^31 elements): grid and block index arithmetic are per dimension."""
    text = _lowered_text("gpu", "cuda", 1, 1 << 20, 32)
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("chunk", [16, 100, 512])
def test_bad_chunk_size_is_a_clear_error(chunk):
    _, a, _, _, _ = _inputs(7, seqlen=40, dtype=jnp.float32)
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=chunk, impl="pallas")
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        ssd_ops.ssd_pallas(a["x"], a["dt"], a["dt"] * a["A"], a["B"], a["C"], None, None, chunk_size=chunk)


def test_bad_launcher_is_a_clear_error():
    _, a, _, _, _ = _inputs(7, seqlen=40, dtype=jnp.float32)
    with pytest.raises(ValueError, match="launcher must be one of"):
        ssd_ops.ssd_pallas(a["x"], a["dt"], a["dt"] * a["A"], a["B"], a["C"], None, None, chunk_size=64, launcher="cuda")


@pytest.mark.parametrize(
    "config,field",
    [
        (KernelConfig(block_t=48), "block_t"),  # does not divide the chunk
        (KernelConfig(block_t=8), "block_t"),  # compiled: below Triton's 16
        (KernelConfig(scan_programs=0), "scan_programs"),
        (KernelConfig(output_kernel="cuda"), "output_kernel"),
        (KernelConfig(bwd_pairs=(8, 3)), "bwd_pairs"),
    ],
)
def test_bad_kernel_config_names_the_field(config, field):
    with pytest.raises(ValueError, match=f"KernelConfig.{field}"):
        config.check(64, compiled=True)


def test_kernel_config_defaults_are_the_shipped_ones(monkeypatch):
    """``KernelConfig()`` is what ``ssd_pallas`` runs without a config: the dataclass defaults are not re-set."""
    seen = []
    real = ssd_ops.make_plan

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    _, a, _, _, _ = _inputs(8, seqlen=20, dtype=jnp.float32)
    monkeypatch.setattr(ssd_ops, "make_plan", spy)
    ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=64, impl="pallas")
    assert seen == [KernelConfig()]
    assert KernelConfig() == KernelConfig(
        block_t=64,
        state_rows=64,
        scan_block=64,
        scan_programs=256,
        cols_heads=2,
        state_splits=2,
        output_kernel="auto",
        prologue=Launch(4, 2),
        scan=Launch(4, 3),
        output=Launch(4, 1),
        bwd_cols=Launch(4, 1),
        bwd_pairs=Launch(8, 3),
        bwd_group_rows=Launch(4, 3),
    )


# ------------------------------------------------------------------------------------------------
# what the kernels accept (ssm_jax.kernels.support)
# ------------------------------------------------------------------------------------------------


def test_small_sizes_run_forward_and_backward_in_interpret_mode():
    """headdim 8 and d_state 8 (below the compiled kernels' 16): through ``ssd(impl="pallas")`` in interpret mode,
    values and every gradient against the float64 recurrence, odd length, resets, initial state, groups."""
    with jax.enable_x64(True):
        inp, a, seg, cot, cot_state = _inputs(9, seqlen=45, headdim=8, state=8)
        args = tuple(a[k] for k in ARGS)
        y, final = ssd(*args[:5], D=args[5], initial_state=args[6], segment_ids=jnp.asarray(seg), chunk_size=64, impl="pallas")
        y_ref, final_ref = ssd_reference(**inp, segment_ids=seg)
        assert rel(y, y_ref) < 1e-10 and rel(final, final_ref) < 1e-10
        grads = jax.grad(_loss("pallas", seg, cot, cot_state, 64), argnums=range(7))(*args)
        want = jax.grad(_loss("recurrent", seg, cot, cot_state, 64), argnums=range(7))(*args)
        for name, g, w in zip(ARGS, grads, want):
            assert rel(g, w) < 1e-9, name


COMPILED_GPU = support.Target("gpu", False)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(state=8), r"state \(B.shape\[3\]\) must be a power of two >= 16 .*got 8"),
        (dict(headdim=24), r"headdim \(x.shape\[3\]\) must be a power of two >= 16 .*got 24"),
        (dict(chunk=100), r"chunk_size must be one of \(64, 128, 256\)"),
        (dict(dtype=jnp.float64), r"x, B and C must be one of \('bfloat16', 'float16', 'float32'\)"),
    ],
)
def test_compiled_kernels_refuse_unsupported_calls_up_front(monkeypatch, change, match):
    """On a GPU (the compiled target; patched here) ``ssd(impl="pallas")`` refuses every size the kernels do not
    take before running anything (``d_state=8`` used to run forward and die in the backward pass), naming the
    accepted values; ``resolve_impl("auto")`` picks "xla" for the same sizes."""
    monkeypatch.setattr(support, "default_target", lambda impl="pallas": COMPILED_GPU)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    sizes = dict(headdim=64, state=64, chunk=64, dtype=jnp.float32)
    sizes.update(change)
    with jax.enable_x64(sizes["dtype"] == jnp.float64):
        _, a, _, _, _ = _inputs(10, seqlen=20, heads=2, headdim=sizes["headdim"], groups=1, state=sizes["state"], dtype=sizes["dtype"])
        with pytest.raises(ValueError, match=r"ssd\(impl='pallas'\): " + match):
            ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=sizes["chunk"], impl="pallas")
    auto = resolve_impl("auto", headdim=sizes["headdim"], state=sizes["state"], chunk_size=sizes["chunk"], dtype=sizes["dtype"])
    assert auto == "xla"
    assert resolve_impl("auto", headdim=64, state=64, chunk_size=64, dtype=jnp.bfloat16) == "pallas"


def test_support_statement():
    """``support.unsupported`` is the one statement the checks read: what interpret mode and the compiled kernels
    take, for the chunked kernels and the stepwise kernel."""
    interp, gpu, tpu = support.Target("gpu", True), support.Target("gpu", False), support.Target("tpu", False)
    ok = dict(chunk_size=256, headdim=64, state=128, dtype=jnp.bfloat16)
    for target in (interp, gpu, tpu):
        assert support.unsupported("pallas", target, **ok) is None
    assert support.unsupported("pallas", interp, chunk_size=64, headdim=3, state=5, dtype=jnp.float64) is None
    assert "state" in support.unsupported("pallas", tpu, state=8)
    assert "float64" in support.unsupported("pallas", gpu, dtype=jnp.float64)
    assert "launcher" in support.unsupported("pallas", support.Target("cuda", False))
    assert support.unsupported("stepwise", gpu, headdim=8, state=8) is None  # no matrix products: any power of two
    assert "impl='recurrent'" in support.unsupported("stepwise", interp, headdim=6)


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_kernels_bf16_accuracy_and_long_sequence():
    """On a GPU (Triton): issue-3 shapes, y and every gradient within 3e-3 of the float32 reference."""
    k = jax.random.split(jax.random.PRNGKey(0), 7)
    b, l, h, p, g, n = 2, 4096, 32, 64, 1, 128
    x = jax.random.normal(k[0], (b, l, h, p), jnp.bfloat16)
    dt = jnp.exp(jax.random.uniform(k[1], (b, l, h), jnp.float32, np.log(1e-3), np.log(1e-1)))
    A = -jnp.exp(jax.random.uniform(k[2], (h,), jnp.float32, 0.0, np.log(16.0)))
    B = jax.random.normal(k[3], (b, l, g, n), jnp.bfloat16)
    C = jax.random.normal(k[4], (b, l, g, n), jnp.bfloat16)
    D = jax.random.normal(k[5], (h,), jnp.float32)
    cot = jax.random.normal(k[6], (b, l, h, p), jnp.bfloat16).astype(jnp.float32)

    def loss(impl):
        def f(x, dt, A, B, C, D):
            y, _ = ssd(x, dt, A, B, C, D=D, chunk_size=256, impl=impl)
            return jnp.sum(y.astype(jnp.float32) * cot), y

        return jax.jit(jax.value_and_grad(f, argnums=range(6), has_aux=True))

    (_, y), grads = loss("pallas")(x, dt, A, B, C, D)
    f32 = lambda v: v.astype(jnp.float32)
    (_, y_ref), want = loss("xla")(f32(x), dt, A, f32(B), f32(C), D)
    assert rel(f32(y), y_ref) < 3e-3
    for name, gr, w in zip(("x", "dt", "A", "B", "C", "D"), grads, want):
        assert rel(f32(gr), w) < 3e-3, name


def test_kernels_import_from_an_uninstalled_checkout(tmp_path):
    """``kernels/`` is installed as ``ssm_jax.kernels`` by setup.py; a plain checkout (no pip install, as on a
    fresh GPU box) must find it too, or impl="auto" would silently fall back to XLA."""
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("ssm_jax", "kernels"):
        shutil.copytree(os.path.join(root, name), tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import ssm_jax, ssm_jax.kernels; from ssm_jax.kernels import ssd_ops; "
        "print(ssm_jax.__file__); print(ssm_jax.kernels.__file__); print(ssd_ops.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(line.startswith(str(tmp_path)) for line in proc.stdout.split()), proc.stdout
