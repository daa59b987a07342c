"""Checkpoints and resuming: the orbax round trip with the grain iterator; an exact resume after SIGKILL while a
save is in flight and just before orbax commits the step; damaged newest steps (truncated, emptied, deleted
files, corrupt JSON) moved aside with a warning; a full disk during a save; a resume with a changed config refused
unless allowed. Every resumed run must repeat the losses of the uninterrupted run (``train_helpers.resume_config``:
truncated BPTT and gradient accumulation)."""

import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from train_helpers import (
    REPO,
    RESUME_OVERRIDES,
    TINY_OVERRIDES,
    as_flags,
    compilation_cache,  # noqa: F401
    resume_config,
    subprocess_env,
    train_losses,
    validation_losses,
)

from ssm_jax import checkpoint as ckpt_lib
from ssm_jax import optim, train_lib
from ssm_jax.model import Mamba2Config

CFG = Mamba2Config(d_model=32, n_layer=1, vocab_size=257, d_state=16, headdim=16, chunk_size=16)


def test_round_trip_params_state_carry_and_data_iterator(tmp_path):
    from ssm_jax import data as data_lib

    docs = data_lib.load_corpus("tiny")
    ds = data_lib.make_dataset(docs, data_lib.get_tokenizer("byte"), mode="packed", seq_len=32, batch_size=2, seed=1, num_epochs=None)
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


# ------------------------------------------------------------------------------------------------ faults


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compilation_cache):  # noqa: F811
    """An uninterrupted run of :func:`resume_config` (checkpoints at steps 2, 4, 6) and its losses."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    train_lib.train_and_evaluate(resume_config(), workdir)
    assert ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), read_only=True).all_steps() == [2, 4, 6]
    return workdir, train_losses(workdir), validation_losses(workdir)


def _copy_until(reference_dir: str, workdir: str, step: int) -> None:
    """``workdir``: the reference run as it stood after ``step`` (metrics of later steps dropped), all checkpoints."""
    shutil.copytree(reference_dir, workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    lines = [ln for ln in open(path) if int(ln.split('"step": ')[1].split(",")[0]) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def _files(step_dir: str, under: str = ""):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, under)) for f in fs)


def _truncate(path: str, fraction: float) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


DAMAGE = {  # what a crash, a full disk or a careless hand can leave of a finalized step directory
    "array_files_truncated": lambda d: [_truncate(p, 0.5) for p in _files(d, "params/ocdbt.process_0/d")],
    "every_file_emptied": lambda d: [_truncate(p, 0.0) for p in _files(d)],
    "array_files_deleted": lambda d: [os.remove(p) for p in _files(d, "train_state/ocdbt.process_0/d")],
    "iterator_state_deleted": lambda d: [os.remove(p) for p in _files(d, "data") if p.endswith("-of-1.json")],
    "meta_not_json": lambda d: open(os.path.join(d, "meta", "metadata"), "w").write('{"step": 6, "model_con'),
    "item_directory_deleted": lambda d: shutil.rmtree(os.path.join(d, "params")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_step_is_moved_aside_and_the_previous_one_resumes_exactly(reference, tmp_path, damage, caplog):
    ref_dir, ref_losses, ref_validation = reference
    workdir = str(tmp_path / "run")
    _copy_until(ref_dir, workdir, 4)
    ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
    DAMAGE[damage](os.path.join(ckpt_dir, "6"))
    with caplog.at_level(logging.WARNING):
        summary = train_lib.train_and_evaluate(resume_config(), workdir)
    warnings = [r.getMessage() for r in caplog.records if "is damaged (" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint step 6 " in warnings[0] and "resuming from step 4" in warnings[0]
    assert os.path.isdir(os.path.join(workdir, ckpt_lib.DAMAGED_DIR, "6"))  # kept for inspection, not deleted
    # Steps 5 and 6 were trained again from step 4: the losses of the uninterrupted run, step 6 saved anew.
    assert summary["step"] == 6 and train_losses(workdir) == ref_losses
    assert validation_losses(workdir) == ref_validation
    assert ckpt_lib.latest_step(ckpt_dir) == 6


def test_when_no_step_restores_nothing_is_moved_and_the_error_lists_every_step(reference, tmp_path):
    workdir = str(tmp_path / "run")
    _copy_until(reference[0], workdir, 6)
    ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
    for step in (2, 4, 6):
        DAMAGE["item_directory_deleted"](os.path.join(ckpt_dir, str(step)))
    with pytest.raises(
        ckpt_lib.NoCompleteCheckpointError,
        match=r"(?s)step 6: KeyError: Item \"params\" was not "
        r"found.*\n  step 4: .*\n  step 2: .*Nothing was moved or deleted",
    ):
        train_lib.train_and_evaluate(resume_config(), workdir)
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6"] and not os.path.exists(os.path.join(workdir, ckpt_lib.DAMAGED_DIR))


_KILLER = """
import os, runpy, signal, sys
from ssm_jax import checkpoint
point, at = sys.argv[1], sys.argv[2]
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "save_started":  # the asynchronous save of the step was handed to orbax and is in flight
    save = checkpoint.Checkpointer.save
    def patched(self, step, **kw):
        saved = save(self, step, **kw)
        if str(step) == at:
            kill()
        return saved
    checkpoint.Checkpointer.save = patched
else:  # "before_commit": every item written, just before orbax's rename that finalizes the step
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def patched(self):
        if self._final_path.name == at:
            kill()
        await finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = patched
sys.argv = ["train.py"] + sys.argv[3:]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.parametrize("point,resumes_from", [("save_started", None), ("before_commit", 2)])
def test_sigkill_during_a_save_resumes_exactly(
    reference,
    tmp_path,
    compilation_cache,  # noqa: F811
    point,
    resumes_from,
):
    """SIGKILL while step 4 is being saved (asynchronously); the next run resumes whatever the step directory holds."""
    _, ref_losses, ref_validation = reference
    workdir = str(tmp_path / "run")
    flags = [f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={workdir}"]
    flags += as_flags({**TINY_OVERRIDES, **RESUME_OVERRIDES})
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, point, "4"] + flags,
        env=subprocess_env(compilation_cache),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    steps_left = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), read_only=True).all_steps()
    assert steps_left in ([2], [2, 4]) and (resumes_from is None or steps_left[-1] == resumes_from), steps_left

    summary = train_lib.train_and_evaluate(resume_config(), workdir)
    assert summary["step"] == 6 and train_losses(workdir) == ref_losses
    assert validation_losses(workdir) == ref_validation
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    redone = sum('"step": 3, "split": "train"' in ln for ln in lines) == 2  # logged before the kill and again
    assert redone == (steps_left == [2])


@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_disk_during_a_save_names_the_step_and_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch, async_save):
    _, ref_losses, ref_validation = reference
    workdir = str(tmp_path / "run")
    path_class = type(epath.Path(workdir))
    write_text = path_class.write_text

    def full_disk(self, *args, **kwargs):  # the JSON files of step 4 (orbax's and ours) hit a full disk
        if f"{os.sep}4.orbax-checkpoint-tmp" in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(path_class, "write_text", full_disk)
    config = resume_config(**{"checkpoint.async_save": async_save})
    with pytest.raises(
        ckpt_lib.CheckpointSaveError,
        match=r"checkpoint step 4 in .*No space left on device.*MiB "
        r"free\)\. The previous checkpoint \(step 2\) is intact",
    ) as failure:
        train_lib.train_and_evaluate(config, workdir)
    assert failure.value.errno == errno.ENOSPC
    monkeypatch.undo()
    ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
    assert ckpt_lib.latest_step(ckpt_dir) == 2

    summary = train_lib.train_and_evaluate(config, workdir)  # the disk has room again
    assert summary["step"] == 6 and train_losses(workdir) == ref_losses
    assert validation_losses(workdir) == ref_validation


# ------------------------------------------------------------------------------------------------ changed config


def test_resuming_with_a_changed_model_config_fails_listing_the_fields(reference, tmp_path):
    workdir = str(tmp_path / "run")
    _copy_until(reference[0], workdir, 4)
    shutil.rmtree(os.path.join(ckpt_lib.checkpoint_dir(workdir), "6"))
    changed = resume_config(**{"model.d_model": 64, "model.ssd_impl": "recurrent", "data.tokenizer": "neox", "model.vocab_size": 50277})
    with pytest.raises(train_lib.ConfigChangeError) as error:
        train_lib.train_and_evaluate(changed, workdir)
    message = str(error.value)
    for row in (
        "config.model.d_model: 32 in the checkpoint, 64 requested",
        "config.model.ssd_impl: 'auto' in the checkpoint, 'recurrent' requested",
        "config.model.vocab_size: 257 in the checkpoint, 50277 requested",
        "config.data.tokenizer: 'byte' in the checkpoint, 'neox' requested",
        "--config.checkpoint.allow_config_change=True",
    ):
        assert row in message
    assert len(re.findall(r"in the checkpoint, .* requested\n", message)) == 4  # nothing else differs
    # Allowed, the parameters' shapes still cannot change: the run stops, naming the fields that forbid it.
    changed.checkpoint.allow_config_change = True
    with pytest.raises(
        train_lib.ConfigChangeError,
        match=r"config\.model\.d_model, config\.model\.vocab_size, "
        r"config\.data\.tokenizer cannot change when resuming",
    ):
        train_lib.train_and_evaluate(changed, workdir)
    assert ckpt_lib.latest_step(ckpt_lib.checkpoint_dir(workdir)) == 4  # nothing was trained or saved


def test_resuming_with_an_allowed_change_continues_with_the_requested_values(reference, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    _copy_until(reference[0], workdir, 4)
    shutil.rmtree(os.path.join(ckpt_lib.checkpoint_dir(workdir), "6"))
    # "xla" is what "auto" means on a CPU: the same computation, so the losses stay those of the reference.
    changed = resume_config(**{"model.ssd_impl": "xla", "checkpoint.allow_config_change": True})
    summary = train_lib.train_and_evaluate(changed, workdir)
    assert "config.model.ssd_impl: 'auto' in the checkpoint, 'xla' requested" in capsys.readouterr().out
    assert summary["step"] == 6 and train_losses(workdir) == reference[1]
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    assert sum('"step": 5, "split": "train"' in ln for ln in lines) == 1  # resumed from step 4, not restarted
    meta = ckpt_lib.read_meta(ckpt_lib.checkpoint_dir(workdir), 6)
    assert meta["model_config"]["ssd_impl"] == "xla" and meta["config"]["model"]["ssd_impl"] == "xla"
