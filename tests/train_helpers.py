"""Tiny ``train.py`` runs shared by the checkpoint and training tests, and the command-line parsing of config files.

The runs of one test session share a persistent XLA compilation cache (fixture ``compilation_cache``, also
passed to subprocesses by :func:`subprocess_env`): the first run compiles the step functions, later runs of
the same config load them, which makes a resumed or faulted run cost seconds instead of a compilation.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Dict, Iterator, List

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")


def load_config(name: str, arg: Any = None):
    """``get_config([arg])`` of ``configs/<name>`` (loaded by path, as ``train.py --config=...`` does)."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name.replace('/', '_')[:-3]}", os.path.join(CONFIG_DIR, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


TINY_OVERRIDES = {"train.batch_size": 8, "eval.batch_size": 8}  # one row per virtual device
# The run of the resume tests: 6 steps, checkpoints at steps 2, 4 and 6, one validation batch at the end; streams
# with truncated BPTT and gradient accumulation, so that the carry, the data position, the RNG and the optimiser
# state all have to come back for a resumed run to repeat the losses of an uninterrupted one.
RESUME_OVERRIDES = {
    "data.mode": "stream",
    "train.tbptt": True,
    "train.grad_accum_steps": 2,
    "train.batch_size": 16,
    "train.num_steps": 6,
    "checkpoint.every_steps": 2,
    "checkpoint.max_to_keep": 3,
    "eval.every_steps": 0,
    "eval.num_batches": 1,
}


def tiny_config(**overrides: Any):
    """``configs/tiny.py`` with :data:`TINY_OVERRIDES` and ``{"section.field": value}`` overrides."""
    config = load_config("tiny.py")
    for key, value in {**TINY_OVERRIDES, **overrides}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def resume_config(**overrides: Any):
    """:func:`tiny_config` with :data:`RESUME_OVERRIDES`; tests that train it share its compiled steps."""
    return tiny_config(**{**RESUME_OVERRIDES, **overrides})


def as_flags(overrides: Dict[str, Any]) -> List[str]:
    """``--config.section.field=value`` flags of ``{"section.field": value}``."""
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def train_losses(workdir: str) -> Dict[int, float]:
    """Training loss per step from ``metrics.jsonl``; a step logged twice (redone after a resume) keeps the last."""
    losses = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if record["split"] == "train":
                losses[record["step"]] = record["loss"]
    return losses


def validation_losses(workdir: str) -> Dict[int, float]:
    """Validation loss per step; a step evaluated twice keeps the last. A run killed while its last
    asynchronous save finalises may already have logged its final validation; the resumed run logs it again."""
    losses = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if record["split"] == "validation":
                losses[record["step"]] = record["loss"]
    return losses


_CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory) -> Iterator[str]:
    """A persistent compilation cache for this session (restored to the previous settings afterwards)."""
    path = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
    previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    for name, value in _CACHE_OPTIONS.items():
        jax.config.update(name, path if value is None else value)
    jax_cache.reset_cache()
    yield path
    for name, value in previous.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def subprocess_env(cache_dir: str, devices: int = 8) -> Dict[str, str]:
    """Environment of a ``train.py`` subprocess: CPU, ``devices`` virtual devices, the session's cache."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def parse_flags(argv: List[str]):
    """The config that ``train.py`` / ``eval.py`` would run for ``argv`` (its ``--config=FILE[:ARG]`` and
    ``--config.x=y`` flags; other flags, such as ``--workdir``, are the scripts' own and left out)."""
    from absl import flags
    from ml_collections import config_flags

    argv = argv[:1] + [a for a in argv[1:] if a.startswith("--config")]
    values = flags.FlagValues()
    # The override flags are read from the command line when the config flag is defined (sys_argv).
    holder = config_flags.DEFINE_config_file("config", None, "config", flag_values=values, sys_argv=argv)
    values(argv)
    return holder.value
