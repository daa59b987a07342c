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
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "restore_params", "read_meta", "latest_step", "checkpoint_dir"]


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
        self, directory: str, *, save_every: int = 1000, max_to_keep: Optional[int] = 3, async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        self.directory = os.path.abspath(directory)
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
            save_interval_steps=save_every, max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only,  # a save cut by a kill leaves a tmp directory behind
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(
        self, step: int, *, params: Any, train_state: Any, data_iterator: Any = None,
        meta: Optional[Dict[str, Any]] = None, force: bool = False,
    ) -> bool:
        """Saves (asynchronously if configured) when ``step`` is due or ``force``; returns whether it saved."""
        if step in self.manager.all_steps():
            return False
        items = {
            "params": ocp.args.StandardSave(params),
            "train_state": ocp.args.StandardSave(train_state),
            "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step))),
        }
        if data_iterator is not None:
            items["data"] = _data_args()[0](_IteratorSnapshot(data_iterator))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self, step: int, *, abstract_params: Any, abstract_train_state: Any, data_iterator: Any = None,
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
        step = _resolve_step(ckpt, step)
        return ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
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
