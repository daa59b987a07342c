"""Training checkpoints with orbax: save every N steps and at the end, keep K, resume exactly.

Layout of a ``train.py`` workdir::

    <workdir>/
      config.json                 the full training config (ml_collections JSON)
      metrics.jsonl               one JSON record per logged step (ssm_jax.metrics_writer)
      tensorboard/                TensorBoard event files
      loss_curve.png              written at the end of training
      checkpoints/<step>/         one orbax checkpoint per saved step (<step> = optimiser steps done)
        params/                   the model parameters: the pure dict of nnx.split(model) (param_dtype)
        train_state/              {"step", "opt_state", "rng", "num_skipped"[, "carry"]}; carry is the
                                  truncated-BPTT state, a list over layers of {"conv_state", "ssm_state"}
        data/                     grain iterator state: process_<i>-of-<n>.json, one per process
        meta/                     JSON: {"step", "model_config" (Mamba2Config fields), "config" (the
                                  training config), "tokens_seen", "process_count"}

``params`` is a separate item so that evaluation restores the weights alone
(:func:`restore_params`, used by :func:`ssm_jax.train_lib.load_model_from_workdir`). Arrays are saved
with their shardings (orbax OCDBT); every process of a multi-host run writes its shards, and each
process writes its own data-iterator file. Restoring asks for the target shardings, so a checkpoint
written on one mesh can be read on another.

Faults. Orbax writes a step into a temporary directory and renames it when every item is written, so a
process killed during a save leaves no ``<step>`` directory (the temporary one is removed on the next start).
A step can still be damaged afterwards (a truncated or deleted file): :meth:`Checkpointer.restore_newest`
tries the steps from the newest down, moves each one that fails to restore to
``<workdir>/damaged_checkpoints/<step>`` with a warning naming it, and resumes from the newest one that
restores. A save that fails (a full disk) raises :class:`CheckpointSaveError`, naming the step and the
previous checkpoint, which the failed save leaves intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

__all__ = [
    "Checkpointer",
    "CheckpointSaveError",
    "NoCompleteCheckpointError",
    "restore_params",
    "read_meta",
    "latest_step",
    "checkpoint_dir",
    "DAMAGED_DIR",
]

DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/: steps that failed to restore, kept for inspection
T = TypeVar("T")


class CheckpointSaveError(OSError):
    """A checkpoint step could not be written (e.g. the disk is full); the steps saved before it are intact."""


class NoCompleteCheckpointError(RuntimeError):
    """Checkpoints exist but none of them restores (the run is not restarted from scratch)."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class _IteratorSnapshot:
    """A frozen grain iterator state for grain's orbax handler (safe with asynchronous saving).

    The handler JSON-encodes a real ``DatasetIterator``'s state but calls ``get_state().decode()`` on
    anything else, so the snapshot returns the JSON bytes taken at save time.
    """

    def __init__(self, iterator: Any) -> None:
        state = iterator.get_state()
        self._state = (json.dumps(state, indent=4) if not isinstance(state, bytes) else state.decode()).encode()

    def get_state(self) -> bytes:
        return self._state


def _data_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler


class Checkpointer:
    """An orbax ``CheckpointManager`` over ``<workdir>/checkpoints`` with the items of the module docstring."""

    def __init__(
        self,
        directory: str,
        *,
        save_every: int = 1000,
        max_to_keep: Optional[int] = 3,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self._async = async_save
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        try:
            handlers["data"] = _data_args()[2]()
        except ImportError:  # grain absent (evaluation-only installs): params/meta still readable
            pass
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # a save cut by a kill leaves a tmp directory behind
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._in_flight: Optional[int] = None  # step of an asynchronous save not yet known to be written
        self._failed = False  # a save failed: orbax re-raises its error on every later wait

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(
        self,
        step: int,
        *,
        params: Any,
        train_state: Any,
        data_iterator: Any = None,
        meta: Optional[Dict[str, Any]] = None,
        force: bool = False,
    ) -> bool:
        """Saves (asynchronously if configured) when ``step`` is due or ``force``; returns whether it saved.

        Raises :class:`CheckpointSaveError` if this save, or an asynchronous one still in flight, fails.
        """
        self.wait()  # a failure of the previous asynchronous save is reported as that step's
        if step in self.manager.all_steps():
            return False
        items = {
            "params": ocp.args.StandardSave(params),
            "train_state": ocp.args.StandardSave(train_state),
            "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step))),
        }
        if data_iterator is not None:
            items["data"] = _data_args()[0](_IteratorSnapshot(data_iterator))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except OSError as e:
            raise self._save_error(step, e) from e
        if saved and self._async:
            self._in_flight = step
        return saved

    def _save_error(self, step: int, error: OSError) -> CheckpointSaveError:
        self._failed = True
        self._in_flight = None
        self.manager.reload()  # orbax's own list may still hold the step that failed
        previous = [s for s in self.manager.all_steps() if s < step]
        what = f"could not write checkpoint step {step} in {self.directory}: {error}"
        if error.errno == errno.ENOSPC:
            what += f" ({shutil.disk_usage(self.directory).free / 2**20:.0f} MiB free)"
        if previous:
            what += f". The previous checkpoint (step {max(previous)}) is intact: free space, then re-run the same command to resume from it."
        else:
            what += ". No earlier checkpoint exists: re-running the same command starts from step 0."
        return CheckpointSaveError(error.errno, what)

    def restore_newest(self, restore: Callable[[int], T]) -> Optional[Tuple[int, T]]:
        """``(step, restore(step))`` for the newest step whose ``restore`` succeeds; None without checkpoints.

        A step that fails while an older one restores is damaged (truncated or deleted files): it is moved to
        ``<workdir>/damaged_checkpoints/`` with a warning that names it, so that training saves that step
        again. If no step restores, nothing is moved and :class:`NoCompleteCheckpointError` lists every
        step's error (the cause is then more likely the code or the config than the files).
        """
        failures: List[Tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                result, error = restore(step), None
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: try an older one
                result, error = None, _first_line(e)
            if not _all_processes_agree(error is None):
                failures.append((step, error or "failed to restore on another process"))
                continue
            if failures:
                self._move_damaged(failures, step)
            return step, result
        if failures:
            listing = "\n  ".join(f"step {s}: {e}" for s, e in failures)
            raise NoCompleteCheckpointError(
                f"no checkpoint in {self.directory} restores:\n  {listing}\nNothing was moved or deleted. To start "
                "this run from scratch instead, move that directory away."
            )
        return None

    def _move_damaged(self, failures: List[Tuple[int, str]], good: int) -> None:
        """Moves the failed steps out of the checkpoint directory (process 0; the others wait for it)."""
        if jax.process_index() == 0:
            root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
            for step, error in failures:
                target, suffix = os.path.join(root, str(step)), 1
                while os.path.exists(target):  # the same step damaged again in an earlier resume
                    target, suffix = os.path.join(root, f"{step}.{suffix}"), suffix + 1
                os.makedirs(root, exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), target)
                logging.warning(
                    "checkpoint step %d in %s is damaged (%s): moved it to %s; resuming from step %d, the newest step that restores",
                    step,
                    self.directory,
                    error,
                    target,
                    good,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("ssm_jax.checkpoint: damaged steps moved")
        self.manager.reload()

    def read_meta(self, step: int) -> Dict[str, Any]:
        """The ``meta`` JSON of ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(
        self,
        step: int,
        *,
        abstract_params: Any,
        abstract_train_state: Any,
        data_iterator: Any = None,
    ) -> Tuple[Any, Any, Dict[str, Any]]:
        """Restores ``(params, train_state, meta)`` of ``step`` into the given abstract trees (with shardings).

        ``data_iterator`` (a grain ``DatasetIterator``) is moved to the saved position in place.
        """
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "train_state": ocp.args.StandardRestore(abstract_train_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = _data_args()[1](data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["params"], restored["train_state"], restored["meta"]

    def wait(self) -> None:
        """Waits for an asynchronous save; raises :class:`CheckpointSaveError` if it failed."""
        if self._failed:
            return
        try:
            self.manager.wait_until_finished()
        except OSError as e:  # only an asynchronous save fails here, so a step is in flight
            raise self._save_error(self._in_flight, e) from e
        self._in_flight = None

    def close(self) -> None:
        self.wait()
        try:
            self.manager.close()
        except OSError:
            if not self._failed:  # after a failed save orbax raises its error again: already reported
                raise


def _first_line(error: Exception) -> str:
    """``"Type: first line of the message"`` (a KeyError's message without the quotes its str adds)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0][:300]}"


def _all_processes_agree(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (all processes then take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _read_only(directory: str) -> Checkpointer:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns that a read-only manager will not save
    try:
        return Checkpointer(directory, read_only=True, async_save=False, max_to_keep=None, save_every=0)
    finally:
        absl_logging.set_verbosity(level)


def latest_step(directory: str) -> Optional[int]:
    """The latest complete checkpoint step under ``directory`` (``<workdir>/checkpoints``), or None."""
    ckpt = _read_only(directory)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def _resolve_step(ckpt: Checkpointer, step: Optional[int]) -> int:
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    if step is None or step < 0:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt.directory}; available: {sorted(steps)}")
    return step


def read_meta(directory: str, step: Optional[int] = None) -> Dict[str, Any]:
    """The ``meta`` JSON of ``step`` (default: the latest)."""
    ckpt = _read_only(directory)
    try:
        return ckpt.read_meta(_resolve_step(ckpt, step))
    finally:
        ckpt.close()


def restore_params(directory: str, abstract_params: Any, step: Optional[int] = None) -> Tuple[Any, int]:
    """Restores only the ``params`` item of ``step`` (default: the latest); returns ``(params, step)``.

    ``abstract_params`` gives the tree, dtypes and target shardings (``jax.ShapeDtypeStruct`` leaves).
    """
    ckpt = _read_only(directory)
    try:
        step = _resolve_step(ckpt, step)
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"], step
    finally:
        ckpt.close()
