"""Meshes, partition rules, sharded train steps on 8 CPU devices, and a real two-process (gloo) run."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssm_jax import optim, train_lib
from ssm_jax.model import Mamba2Config
from ssm_jax.parallel import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = Mamba2Config(d_model=32, n_layer=1, vocab_size=257, d_state=16, headdim=16, chunk_size=16)
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")


def test_make_mesh_sizes_and_errors():
    mesh = mesh_lib.make_mesh(-1, 1, 1, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "seq": 1}
    if jax.device_count() >= 8:
        mesh = mesh_lib.make_mesh(2, -1)
        assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "seq": 1} and mesh_lib.data_parallel_size(mesh) == 8
    with pytest.raises(ValueError, match="devices"):
        mesh_lib.make_mesh(3, 1, 1, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="mesh.fsdp"):
        mesh_lib.make_mesh(1, 0)


@needs_8
def test_partition_rules_shard_big_matrices_and_replicate_vectors():
    mesh = mesh_lib.make_mesh(2, 4)
    opt = optim.make_optimizer(1e-3)
    abstract = jax.eval_shape(lambda k: train_lib.init_train_state(CFG, opt, k), jax.random.PRNGKey(0))
    specs = mesh_lib.tree_partition_specs(abstract.params, mesh, min_fsdp_size=0)
    mixer = specs["layers"][0]["mixer"]
    assert mixer["in_proj"]["kernel"] == P(None, "fsdp")  # (32, 164): the larger dim
    assert mixer["out_proj"]["kernel"] == P("fsdp", None)  # (64, 32)
    assert specs["embedding"] == P("fsdp", None)  # (272, 32)
    for name in ("A_log", "D", "dt_bias", "norm_weight", "conv_bias"):
        assert mixer[name] == P(), name
    # Big-enough threshold: small arrays stay replicated.
    assert mesh_lib.tree_partition_specs(abstract.params, mesh, min_fsdp_size=10**6)["embedding"] == P()
    # Optimiser moments follow their parameters (the rules match the path suffix).
    flat = {
        mesh_lib.path_to_str(p): s
        for p, s in jax.tree_util.tree_leaves_with_path(
            mesh_lib.tree_partition_specs(abstract.opt_state, mesh, min_fsdp_size=0), is_leaf=lambda x: isinstance(x, P)
        )
    }
    mu = [v for k, v in flat.items() if k.endswith("mu/layers/0/mixer/in_proj/kernel")]
    assert mu == [P(None, "fsdp")]
    assert all(v == P() for k, v in flat.items() if k.endswith("count"))
    # Explicit rules win over the FSDP default, and are checked.
    rules = ((r"embedding$", P(None, "fsdp")),) + mesh_lib.DEFAULT_RULES
    assert mesh_lib.partition_spec("embedding", (272, 32), mesh, rules) == P(None, "fsdp")
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.partition_spec("embedding", (272, 30), mesh, rules)


def _run_steps(mesh, batches, *, grad_accum_steps=1):
    opt_schedule = optim.make_schedule("constant", peak_lr=1e-3, num_steps=10)
    opt = optim.make_optimizer(opt_schedule)
    init = lambda k: train_lib.init_train_state(CFG, opt, k)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = train_lib.state_shardings(abstract, mesh, min_fsdp_size=0)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    graphdef, _ = train_lib.abstract_model(CFG)
    step = jax.jit(
        train_lib.make_train_step(graphdef, opt, schedule=opt_schedule, grad_accum_steps=grad_accum_steps, mesh=mesh),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
    )
    losses = []
    for b in batches:
        state, m = step(state, train_lib._global_batch(b, mesh))
        losses.append(float(m["loss"]))
    return state, losses


@needs_8
def test_sharded_steps_equal_single_device():
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        b, l = 8, 32
        batches.append(
            {
                "inputs": rng.integers(0, 257, (b, l)).astype(np.int32),
                "targets": rng.integers(0, 257, (b, l)).astype(np.int32),
                "segment_ids": np.cumsum(rng.random((b, l)) < 0.05, axis=1).astype(np.int32),
                "loss_mask": np.ones((b, l), np.float32),
                "is_continuation": np.zeros((b,), np.int32),
            }
        )
    ref_state, ref_losses = _run_steps(mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1]), batches)
    for data, fsdp, seq in ((2, 4, 1), (8, 1, 1), (2, 1, 4)):  # last: sequence parallelism over 4 devices
        mesh = mesh_lib.make_mesh(data, fsdp, seq)
        state, losses = _run_steps(mesh, batches)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
        kernel = state.params["layers"][0]["mixer"]["in_proj"]["kernel"]
        assert kernel.sharding.spec == (P(None, "fsdp") if fsdp > 1 else P())
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_cmd(workdir, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
        f"--workdir={workdir}",
        "--config.data.mode=stream",
        "--config.train.tbptt=True",
        "--config.train.num_steps=6",
        "--config.checkpoint.every_steps=3",
        "--config.eval.every_steps=0",
        "--config.train.batch_size=4",
        *extra,
    ]


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _losses(workdir):
    from ssm_jax.metrics_writer import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), "train")}


def test_two_processes_match_one_process(tmp_path):
    """Two CPU processes (1 device each, gloo collectives), each reading its own shard of the data streams,
    train like one process on the same global batch; then both restore the step-3 checkpoint (arrays,
    per-process data iterators, TBPTT carry) and replay steps 4-6 identically."""
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")

    def launch_pair():
        port = _free_port()
        logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(2)]
        procs = [
            subprocess.Popen(
                _train_cmd(
                    multi,
                    "--config.distributed.enabled=True",
                    f"--config.distributed.coordinator_address=localhost:{port}",
                    "--config.distributed.num_processes=2",
                    f"--config.distributed.process_id={i}",
                    "--config.distributed.cpu_collectives=gloo",
                    "--config.distributed.num_cpu_devices=1",
                ),
                env=_env(1),
                stdout=logs[i],
                stderr=subprocess.STDOUT,
                text=True,
                cwd=REPO,
            )
            for i in range(2)
        ]
        try:
            for p in procs:
                p.wait(timeout=240)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, log in zip(procs, logs):
            log.seek(0)
            assert p.returncode == 0, log.read()[-3000:]
            log.close()

    launch_pair()
    ref = subprocess.run(_train_cmd(single), env=_env(1), capture_output=True, text=True, cwd=REPO, timeout=240)
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = _losses(multi), _losses(single)
    assert sorted(got) == list(range(1, 7)) and sorted(want) == list(range(1, 7))
    for s in want:
        assert abs(got[s] - want[s]) < 1e-5, (s, got[s], want[s])
    data_dir = os.path.join(multi, "checkpoints", "6", "data")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]

    # Restore across hosts: drop the final checkpoint and the log, rerun, compare steps 4..6.
    import shutil

    shutil.rmtree(os.path.join(multi, "checkpoints", "6"))
    os.remove(os.path.join(multi, "metrics.jsonl"))
    launch_pair()
    resumed = _losses(multi)
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        assert abs(resumed[s] - got[s]) < 1e-6, (s, resumed[s], got[s])
