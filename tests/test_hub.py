"""Checkpoint names and files (ssm_jax.hub): Hub repo ids through huggingface_hub's cache exactly as it lays it
out (offline, in a fresh process with its own HF_HOME), local directories, and safetensors files read with every
fault named."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import ssm_jax
from ssm_jax import CheckpointError, Mamba2Config, Mamba2LM, hub

pytest.importorskip("huggingface_hub")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = Mamba2Config(d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=8, chunk_size=8, ssd_impl="xla")


def cache_repo(hub_cache, repo_id: str, files_dir, commit: str = COMMIT) -> None:
    """Puts the files of ``files_dir`` in ``hub_cache`` as huggingface_hub does: content-addressed blobs,
    a snapshot per commit made of symlinks to them, and refs/main naming the commit."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    for name in sorted(os.listdir(files_dir)):
        data = (files_dir / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), repo / "snapshots" / commit / name)


CHILD = (
    r"""
import json, sys
import numpy as np
import huggingface_hub, jax
from flax import nnx
import ssm_jax

calls = []
original = huggingface_hub.snapshot_download
def recording(*args, **kwargs):
    calls.append(kwargs.get("allow_patterns"))
    return original(*args, **kwargs)
huggingface_hub.snapshot_download = recording

def params(model):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}

out, other_cache = sys.argv[1], sys.argv[2]
loaded = {
    "main": ssm_jax.from_pretrained("tiny-org/mamba2-tiny"),
    "commit": ssm_jax.from_pretrained("tiny-org/mamba2-tiny", revision="%s"),
    "cache_dir": ssm_jax.from_pretrained("other-org/mamba2-tiny", cache_dir=other_cache),
}
np.savez(out + "/params.npz", **{f"{k}|{name}": v for k, m in loaded.items() for name, v in params(m).items()})
errors = {}
for name, kwargs in (("absent", {}), ("other-org/mamba2-tiny", {}), ("a/b/c", {})):
    try:
        ssm_jax.from_pretrained(name if "/" in name else "tiny-org/" + name, **kwargs)
    except ssm_jax.CheckpointError as e:
        errors[name] = str(e)
json.dump({"errors": errors, "patterns": calls[0], "calls": len(calls)}, open(out + "/result.json", "w"))
"""
    % COMMIT
)


def test_hub_names_load_from_the_offline_cache(tmp_path):
    """save_hf output, cached as huggingface_hub caches a download, loads by repo id with HF_HUB_OFFLINE=1
    through snapshot_download (the call that downloads when online), by branch, commit and cache_dir."""
    model = Mamba2LM(TINY, rngs=nnx.Rngs(7))
    ssm_jax.save_hf(model, str(tmp_path / "export"))
    home = tmp_path / "hf_home"
    cache_repo(home / "hub", "tiny-org/mamba2-tiny", tmp_path / "export")
    cache_repo(tmp_path / "other_cache", "other-org/mamba2-tiny", tmp_path / "export")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env.pop("HF_HUB_CACHE", None)
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(tmp_path / "other_cache")], cwd=ROOT, env=env, check=True, timeout=300)

    want = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
    got = np.load(tmp_path / "params.npz")
    for source in ("main", "commit", "cache_dir"):
        for name, value in want.items():
            np.testing.assert_array_equal(got[f"{source}|{name}"], value)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["patterns"] == [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-*-of-*.safetensors",
    ]  # only what a checkpoint needs
    errors = result["errors"]
    assert set(errors) == {"absent", "other-org/mamba2-tiny", "a/b/c"}
    for name in ("absent", "other-org/mamba2-tiny"):  # the second is only in the cache_dir cache
        assert "neither a local directory nor in the Hugging Face cache" in errors[name]
        assert str(home / "hub") in errors[name] and "HF_HUB_OFFLINE" in errors[name]
    assert "neither a local directory nor a valid Hub repo id" in errors["a/b/c"]


def test_local_names(tmp_path):
    assert hub.checkpoint_directory(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match="revision"):
        hub.checkpoint_directory(str(tmp_path), revision="main")
    with pytest.raises(CheckpointError, match="does not exist"):
        hub.checkpoint_directory(str(tmp_path / "nowhere"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        hub.checkpoint_directory(str(tmp_path / "weights.bin"))
    with pytest.raises(CheckpointError, match="neither a local directory nor a valid Hub repo id"):
        hub.checkpoint_directory("not/a/repo")  # refused before any network access


def test_safetensors_reader(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float16),
        "c": rng.standard_normal((2, 2)).astype(np.float64),
    }
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    got = hub.read_safetensors(str(tmp_path / "ok.safetensors"))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)

    data = (tmp_path / "ok.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    for name, content, message in (
        ("empty", b"", "too short"),
        ("cut_header", data[: 8 + header_len // 2], "the header claims"),
        ("cut_data", data[:-3], r"is truncated: tensor `.` needs bytes \[\d+, \d+\) of the data section, which has"),
        ("garbage", data[:8] + b"\xff" * header_len + data[8 + header_len :], "not valid JSON"),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            hub.read_safetensors(str(tmp_path / name))

    save_file({"ids": np.arange(4, dtype=np.int32)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(CheckpointError, match="tensor `ids` has dtype I32"):
        hub.read_safetensors(str(tmp_path / "ints.safetensors"))


def test_shard_index_faults(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones(2, np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index.write_text(json.dumps({"weight_map": weight_map}))
    tensors, source = hub.read_weights(str(tmp_path))
    assert sorted(tensors) == ["a", "b"] and source == str(index)
    for bad, message in (
        ({**weight_map, "c": "model-00002-of-00002.safetensors"}, r"00002-of-00002\.safetensors: lacks 1 tensors .*'c'"),
        ({**weight_map, "c": "../elsewhere.safetensors"}, "is not a file name in the checkpoint directory"),
        ({"a": ["not", "a", "name"]}, "is not a file name"),
        ({}, 'non-empty "weight_map"'),
    ):
        index.write_text(json.dumps({"weight_map": bad}))
        with pytest.raises(CheckpointError, match=message):
            hub.read_weights(str(tmp_path))
