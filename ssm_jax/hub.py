"""Finding and reading the files of a public checkpoint, every fault a :class:`CheckpointError`.

:func:`checkpoint_directory` turns a name into a local directory: a directory as given, otherwise a Hugging Face
Hub repo id resolved by ``huggingface_hub.snapshot_download`` (the same call online and offline). That call
reads ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` as huggingface_hub does (when huggingface_hub is
first imported) and ``cache_dir`` when given, and fetches only what a checkpoint needs: ``config.json`` and
the weights (single file or shards with their index), safetensors first, PyTorch pickles only for repos
without safetensors. Offline, or when the Hub cannot be reached, it returns the cached snapshot.

:func:`read_config` and :func:`read_weights` read ``config.json`` and the weight files (``model.safetensors``,
``pytorch_model.bin``, or shards listed by ``*.index.json``) of a directory. safetensors files are read by
:func:`read_safetensors` (memory-mapped, any float dtype including bfloat16, which the ``safetensors`` numpy
loader cannot return), and a truncated or corrupt file is named with what is wrong.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

# What snapshot_download fetches, in order of preference: the second set only when the first has no weights.
_HUB_PATTERNS = (
    [CONFIG_NAME, SAFETENSORS_NAME, SAFETENSORS_INDEX, "model-*-of-*.safetensors"],
    [CONFIG_NAME, TORCH_NAME, TORCH_INDEX, "pytorch_model-*-of-*.bin"],
)

# safetensors dtype codes that a Mamba-2 weight may have, as NumPy dtypes (little-endian; bfloat16 via ml_dtypes).
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key or field at fault and what is wrong."""


# --------------------------------------------------------------------------------------------------
# Names -> directories
# --------------------------------------------------------------------------------------------------


def checkpoint_directory(name_or_path: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """A local directory holding the checkpoint ``name_or_path`` (a directory, or a Hub repo id such as
    ``"state-spaces/mamba2-130m"`` at ``revision``, a branch, tag or commit; default ``main``)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a directory or a Hub repo id (str), got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        if revision is not None:
            raise ValueError(f"`revision` selects a version of a Hub repo; {name!r} is a local directory")
        return name
    if os.path.exists(name):
        raise CheckpointError(f"{name!r} is a file; a checkpoint is a directory (config.json and weights) or a Hub repo id")
    if os.path.isabs(name) or name.startswith((".", "~")):
        raise CheckpointError(f"checkpoint directory {name!r} does not exist")
    directory = ""
    for patterns in _HUB_PATTERNS:
        directory = _snapshot(name, revision, cache_dir, patterns)
        if weight_files(directory):
            break
    return directory


def _snapshot(repo_id: str, revision: Optional[str], cache_dir: Optional[str], patterns: List[str]) -> str:
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory, and reading Hub repos needs huggingface_hub (pip install huggingface_hub)"
        ) from e
    cache = cache_dir or constants.HF_HUB_CACHE
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is neither a local directory nor a valid Hub repo id ({e})") from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"the Hub repo {repo_id!r} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id!r} is neither a local directory nor a Hub repo you can read (private or gated repos need `hf auth login`)"
        ) from e
    except LocalEntryNotFoundError as e:
        offline = " (offline: HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(
            f"{repo_id!r} is neither a local directory nor in the Hugging Face cache {cache}{offline}, "
            f"revision {revision or 'main'}; download it once with network access"
        ) from e


# --------------------------------------------------------------------------------------------------
# Files in a directory
# --------------------------------------------------------------------------------------------------


def weight_files(directory: str) -> Optional[str]:
    """The weight file (or shard index) of ``directory`` that :func:`read_weights` reads, or None."""
    for name in (SAFETENSORS_INDEX, SAFETENSORS_NAME, TORCH_INDEX, TORCH_NAME):
        if os.path.isfile(os.path.join(directory, name)):
            return name
    return None


def read_config(directory: str) -> Dict:
    """``config.json`` of ``directory`` as a dict."""
    path = os.path.join(directory, CONFIG_NAME)
    raw = _read_json(path, f"missing file {path} (a Mamba-2 checkpoint directory needs config.json)")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_weights(directory: str) -> Tuple[Dict[str, np.ndarray], str]:
    """All tensors of ``directory``'s weights (in their stored dtype) and the path of the file read (or index)."""
    name = weight_files(directory)
    if name is None:
        raise CheckpointError(f"missing weights in {directory}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, {TORCH_NAME} or {TORCH_INDEX}")
    path = os.path.join(directory, name)
    if name.endswith(".index.json"):
        return _read_shards(directory, path), path
    return _read_weight_file(path), path


def _read_json(path: str, missing: str):
    if not os.path.isfile(path):
        raise CheckpointError(missing)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); a truncated or corrupt download?") from e


def _read_shards(directory: str, index_path: str) -> Dict[str, np.ndarray]:
    """The tensors of every shard named by an index file, checking each tensor is where the index says."""
    index = _read_json(index_path, f"missing file {index_path}")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{index_path}: expected a non-empty "weight_map" of tensor name -> shard file')
    for shard in weight_map.values():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a file name in the checkpoint directory")
    tensors: Dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"missing file {path} (a shard listed in {os.path.basename(index_path)})")
        shard_tensors = _read_weight_file(path)
        absent = sorted(k for k, v in weight_map.items() if v == shard and k not in shard_tensors)
        if absent:
            raise CheckpointError(f"{path}: lacks {len(absent)} tensors that {os.path.basename(index_path)} places there, e.g. {absent[:3]}")
        tensors.update(shard_tensors)
    return tensors


def _read_weight_file(path: str) -> Dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return _read_torch(path)


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    """A PyTorch state dict (needs torch); bfloat16 tensors become float32, which holds them exactly."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch (pip install 'ssm-jax[torch]')") from e
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {e}); a truncated or corrupt download?") from e
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor")
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in raw.items()}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """The float tensors of a safetensors file as read-only memory-mapped NumPy arrays.

    Layout (the safetensors format): an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data, each
    tensor at ``[begin, end)`` counted from the end of the header.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: the header claims {header_len} bytes but the file has {size}; truncated, or not safetensors")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); a corrupt file?") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len, shape=(data_size,)) if data_size else None
    return {name: _tensor(path, name, info, data, data_size) for name, info in header.items()}


def _tensor(path: str, name: str, info, data: Optional[np.memmap], data_size: int) -> np.ndarray:
    """One tensor of a safetensors file, after checking its entry against the file (shape, dtype, bounds)."""
    try:
        code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed header entry for tensor `{name}`: {info!r}") from e
    if code not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor `{name}` has dtype {code}; Mamba-2 weights must be one of {sorted(_SAFETENSORS_DTYPES)}")
    dtype = _SAFETENSORS_DTYPES[code]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor `{name}` needs bytes [{begin}, {end}) of the data section, which has "
            f"{data_size} (an interrupted download or copy?)"
        )
    if not (0 <= begin <= end and end - begin == nbytes):
        raise CheckpointError(
            f"{path}: tensor `{name}` of shape {shape} and dtype {code} needs {nbytes} bytes, its offsets [{begin}, {end}) give {end - begin}"
        )
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return data[begin:end].view(dtype).reshape(shape)
