"""Checkpoints: orbax round trip with the grain iterator, and an exact resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from ssm_jax import checkpoint as ckpt_lib
from ssm_jax import optim, train_lib
from ssm_jax.metrics_writer import read_metrics
from ssm_jax.model import Mamba2Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = Mamba2Config(d_model=32, n_layer=1, vocab_size=257, d_state=16, headdim=16, chunk_size=16)


def test_round_trip_params_state_carry_and_data_iterator(tmp_path):
    from ssm_jax import data as data_lib

    docs = data_lib.load_corpus("tiny")
    ds = data_lib.make_dataset(docs, data_lib.get_tokenizer("byte"), mode="packed", seq_len=32, batch_size=2,
                               seed=1, num_epochs=None)
    it = iter(ds)
    for _ in range(3):
        next(it)
    opt = optim.make_optimizer(1e-3)
    state = train_lib.init_train_state(CFG, opt, jax.random.PRNGKey(0), carry_batch=2)
    state.carry[0]["ssm_state"] = state.carry[0]["ssm_state"] + 1.5
    params, rest = state.checkpoint_items()
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), save_every=1, max_to_keep=2, async_save=True)
    ckpt.save(3, params=params, train_state=rest, data_iterator=it, meta={"model_config": {"d_model": 32}})
    expected = [next(it) for _ in range(2)]  # advancing after an async save must not change what was saved
    ckpt.wait()

    it2 = iter(ds)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (params, rest))
    p2, r2, meta = ckpt.restore(3, abstract_params=abstract[0], abstract_train_state=abstract[1], data_iterator=it2)
    ckpt.close()
    for a, b in zip(jax.tree.leaves((params, rest)), jax.tree.leaves((p2, r2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(r2["carry"][0]["ssm_state"].max()) == 1.5 and meta["step"] == 3
    for want in expected:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert ckpt_lib.latest_step(str(tmp_path / "checkpoints")) == 3


def _cmd(workdir):
    # Stream mode with truncated BPTT and gradient accumulation: the carry, the data position, the RNG and
    # the optimiser state all have to come back for the losses to match.
    return [sys.executable, os.path.join(REPO, "train.py"), f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
            f"--workdir={workdir}", "--config.data.mode=stream", "--config.train.tbptt=True",
            "--config.train.grad_accum_steps=2", "--config.train.num_steps=60", "--config.checkpoint.every_steps=5",
            "--config.eval.every_steps=0", "--config.eval.num_batches=1"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), "train")}


def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    ref = subprocess.run(_cmd(full), env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    ckpt_dir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
            if steps and max(steps) >= 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + (proc.stderr.read() or "")[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert 10 <= killed_at < 60

    resumed = subprocess.run(_cmd(killed), env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _train_losses(full), _train_losses(killed)
    assert sorted(want) == list(range(1, 61)) and sorted(got) == list(range(1, 61))
    for step in range(1, 61):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step], killed_at)
    # The second process resumed from the checkpoint rather than starting over: step 1 was logged once.
    lines = open(os.path.join(killed, "metrics.jsonl")).read().splitlines()
    assert sum('"step": 1, "split": "train"' in ln for ln in lines) == 1
    assert ckpt_lib.latest_step(ckpt_dir) == 60
