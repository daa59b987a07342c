"""The persistent compilation cache that importing ssm_jax turns on (ssm_jax/compilation_cache.py): where it
goes, the user's own choice kept, the opt-out, and a second process loading what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from ssm_jax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_cache_dir():
    """jax_compilation_cache_dir unset for the test, restored afterwards."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", previous)


def test_default_directory_is_under_the_user_cache(tmp_path, monkeypatch, no_cache_dir):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = str(tmp_path / "ssm_jax" / "jax_compilation_cache")
    assert compilation_cache.enable_by_default() == expected
    assert jax.config.jax_compilation_cache_dir == expected and os.path.isdir(expected)


def test_an_explicit_directory_and_the_opt_out(tmp_path, monkeypatch, no_cache_dir):
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "mine"))
    assert compilation_cache.enable_by_default() == str(tmp_path / "mine")
    jax.config.update("jax_compilation_cache_dir", None)
    for off in ("off", "0", "False", "no"):
        monkeypatch.setenv(compilation_cache.ENV, off)
        assert compilation_cache.enable_by_default() is None
        assert jax.config.jax_compilation_cache_dir is None


def test_the_users_own_jax_setting_is_kept(tmp_path, monkeypatch, no_cache_dir):
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "ours"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
    assert compilation_cache.enable_by_default() == str(tmp_path / "theirs")
    assert not os.path.exists(tmp_path / "ours")


def test_an_unwritable_directory_warns_and_leaves_the_cache_off(tmp_path, monkeypatch, no_cache_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(compilation_cache.ENV, str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot create .*a_file/cache.*SSM_JAX_COMPILATION_CACHE"):
        assert compilation_cache.enable_by_default() is None
    assert jax.config.jax_compilation_cache_dir is None


PROGRAM = """
import json, jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
import ssm_jax
from ssm_jax.model import Mamba2Config, Mamba2LM
from flax import nnx
model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=97, headdim=16, d_state=8, chunk_size=8),
                 rngs=nnx.Rngs(0))
tokens = jnp.arange(2 * 13).reshape(2, 13) % 97
logits = nnx.jit(lambda m, t: m(t))(model, tokens)
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits),
                  "finite": bool(jnp.isfinite(logits).all())}))
"""


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (compilation_cache.ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(
        XDG_CACHE_HOME=str(tmp_path),
        JAX_PLATFORMS="cpu",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p]),
    )
    env.pop("XLA_FLAGS", None)

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    cache = tmp_path / "ssm_jax" / "jax_compilation_cache"
    assert first["dir"] == str(cache) and first["finite"] and first["hits"] == 0
    entries = sorted(os.listdir(cache))
    assert entries, "the first process wrote nothing to the cache"
    second = run()
    assert second["hits"] >= 1 and second["finite"]
