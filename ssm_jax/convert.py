"""Public Mamba-2 checkpoints <-> ssm_jax parameters.

Two on-disk formats are read from a local directory:

* **state-spaces** (``mamba_ssm``): ``config.json`` with ``d_model, n_layer, vocab_size, ssm_cfg, ...``
  (``ssm_cfg`` may be partial: missing fields take the Mamba-2 defaults) and weights in
  ``pytorch_model.bin`` or ``model.safetensors``; keys ``backbone.embedding.weight``,
  ``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``.
* **Hugging Face transformers** (``model_type: mamba2``): ``config.json`` with ``hidden_size,
  num_hidden_layers, state_size, head_dim, num_heads, n_groups, ...`` and ``model.safetensors``
  (optionally sharded with ``model.safetensors.index.json``) or ``pytorch_model.bin``; the embedding
  is ``backbone.embeddings.weight``.

:func:`save_hf` writes the Hugging Face format so a model trained here loads in ``transformers``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm_jax.model import Mamba2Config, Mamba2LM

_MAMBA2_SSM_DEFAULTS = dict(
    d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, dt_min=0.001, dt_max=0.1,
    dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), A_init_range=(1, 16), bias=False, conv_bias=True,
    D_has_hdim=False, rmsnorm=True, norm_before_gate=False, d_ssm=None,
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key or field at fault."""


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def config_from_state_spaces(raw: Mapping, **overrides) -> Mamba2Config:
    """Builds a config from a state-spaces ``config.json`` (MambaConfig of mamba_ssm)."""
    for field in ("d_model", "n_layer", "vocab_size"):
        if field not in raw:
            raise CheckpointError(f"config.json: missing field `{field}` (state-spaces format)")
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba2":
        raise CheckpointError(
            f"config.json: ssm_cfg.layer = {layer!r}; only Mamba-2 layers are supported (Mamba-1 checkpoints "
            "use a different layer, and mamba_ssm treats a missing `layer` as Mamba1)"
        )
    if raw.get("attn_layer_idx"):
        raise CheckpointError(
            f"config.json: attn_layer_idx = {raw['attn_layer_idx']}; hybrid checkpoints with attention layers "
            "are not supported"
        )
    if raw.get("d_intermediate", 0):
        raise CheckpointError(
            f"config.json: d_intermediate = {raw['d_intermediate']}; checkpoints with MLP layers are not supported"
        )
    if not raw.get("rms_norm", True):
        raise CheckpointError("config.json: rms_norm = false (LayerNorm blocks) is not supported")
    unknown = set(ssm_cfg) - set(_MAMBA2_SSM_DEFAULTS) - {"use_mem_eff_path", "process_group", "sequence_parallel", "activation"}
    if unknown:
        raise CheckpointError(f"config.json: unknown ssm_cfg fields {sorted(unknown)}")
    ssm = {**_MAMBA2_SSM_DEFAULTS, **ssm_cfg}
    if ssm.get("activation", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"config.json: ssm_cfg.activation = {ssm['activation']!r}; only silu is supported")
    for field, supported in (("D_has_hdim", False), ("rmsnorm", True), ("norm_before_gate", False)):
        if bool(ssm[field]) != supported:
            raise CheckpointError(f"config.json: ssm_cfg.{field} = {ssm[field]!r} is not supported (need {supported})")
    d_inner = ssm["expand"] * raw["d_model"]
    if ssm["d_ssm"] not in (None, d_inner):
        raise CheckpointError(f"config.json: ssm_cfg.d_ssm = {ssm['d_ssm']} != expand * d_model = {d_inner}")
    fields = dict(
        d_model=raw["d_model"], n_layer=raw["n_layer"], vocab_size=raw["vocab_size"],
        d_state=ssm["d_state"], d_conv=ssm["d_conv"], expand=ssm["expand"], headdim=ssm["headdim"],
        ngroups=ssm["ngroups"], chunk_size=ssm["chunk_size"], dt_min=ssm["dt_min"], dt_max=ssm["dt_max"],
        dt_init_floor=ssm["dt_init_floor"], dt_limit=tuple(float(v) for v in ssm["dt_limit"]),
        A_init_range=tuple(float(v) for v in ssm["A_init_range"]),
        pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
        norm_eps=raw.get("norm_epsilon", 1e-5), tie_embeddings=raw.get("tie_embeddings", True),
        residual_in_fp32=raw.get("residual_in_fp32", True), conv_bias=ssm["conv_bias"], proj_bias=ssm["bias"],
    )
    fields.update(overrides)
    return Mamba2Config(**fields)


def config_from_hf(raw: Mapping, **overrides) -> Mamba2Config:
    """Builds a config from a Hugging Face ``Mamba2Config`` ``config.json``."""
    if raw.get("model_type", "mamba2") != "mamba2":
        raise CheckpointError(f"config.json: model_type = {raw.get('model_type')!r}; expected 'mamba2'")
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if field not in raw:
            raise CheckpointError(f"config.json: missing field `{field}` (Hugging Face format)")
    expand = raw.get("expand", 2)
    head_dim = raw.get("head_dim", 64)
    d_inner = expand * raw["hidden_size"]
    if "num_heads" in raw and raw["num_heads"] * head_dim != d_inner:
        raise CheckpointError(
            f"config.json: num_heads * head_dim = {raw['num_heads'] * head_dim} != expand * hidden_size = {d_inner}"
        )
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"config.json: hidden_act = {raw['hidden_act']!r}; only silu is supported")
    limit = [_json_float(v) for v in raw.get("time_step_limit", (0.0, float("inf")))]
    fields = dict(
        d_model=raw["hidden_size"], n_layer=raw["num_hidden_layers"], vocab_size=raw["vocab_size"],
        d_state=raw.get("state_size", 128), d_conv=raw.get("conv_kernel", 4), expand=expand, headdim=head_dim,
        ngroups=raw.get("n_groups", 8), chunk_size=raw.get("chunk_size", 256),
        dt_min=raw.get("time_step_min", 0.001), dt_max=raw.get("time_step_max", 0.1),
        dt_init_floor=raw.get("time_step_floor", 1e-4), dt_limit=(float(limit[0]), float(limit[1])),
        pad_vocab_size_multiple=1, norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=raw.get("tie_word_embeddings", False), residual_in_fp32=raw.get("residual_in_fp32", True),
        conv_bias=raw.get("use_conv_bias", True), proj_bias=raw.get("use_bias", False),
    )
    fields.update(overrides)
    return Mamba2Config(**fields)


def _json_float(value) -> float:
    """Reads a float written by any transformers version (5.x writes infinity as {"__float__": "Infinity"})."""
    if isinstance(value, Mapping) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def hf_config_dict(cfg: Mamba2Config) -> Dict:
    """The Hugging Face ``config.json`` content for ``cfg`` (vocab_size is the padded size)."""
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "vocab_size": cfg.padded_vocab_size,
        "state_size": cfg.d_state, "head_dim": cfg.headdim, "num_heads": cfg.nheads, "n_groups": cfg.ngroups,
        "expand": cfg.expand, "conv_kernel": cfg.d_conv, "chunk_size": cfg.chunk_size,
        "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_floor": cfg.dt_init_floor,
        "time_step_limit": [cfg.dt_limit[0], cfg.dt_limit[1] if math.isfinite(cfg.dt_limit[1]) else float("inf")],
        "layer_norm_epsilon": cfg.norm_eps, "use_bias": cfg.proj_bias, "use_conv_bias": cfg.conv_bias,
        "residual_in_fp32": cfg.residual_in_fp32, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "rescale_prenorm_residual": False, "time_step_rank": math.ceil(cfg.d_model / 16),
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
    }


# --------------------------------------------------------------------------------------------------
# Parameter names
# --------------------------------------------------------------------------------------------------

Transform = Callable[[np.ndarray], np.ndarray]


def _parameter_map(cfg: Mamba2Config, embedding_key: str) -> Dict[Tuple, Tuple[str, Transform, Transform]]:
    """Our parameter path -> (checkpoint key, checkpoint->ours, ours->checkpoint)."""
    same = lambda a: a
    linear = lambda a: np.ascontiguousarray(a.T)  # torch (out, in) <-> flax (in, out)
    conv_in = lambda a: np.ascontiguousarray(a[:, 0, :].T)  # (conv_dim, 1, width) -> (width, conv_dim)
    conv_out = lambda a: np.ascontiguousarray(a.T[:, None, :])
    table = {
        ("embedding",): (embedding_key, same, same),
        ("norm_f_weight",): ("backbone.norm_f.weight", same, same),
    }
    if not cfg.tie_embeddings:
        table[("lm_head",)] = ("lm_head.weight", same, same)
    for i in range(cfg.n_layer):
        prefix = f"backbone.layers.{i}"
        mixer = ("layers", i, "mixer")
        table[("layers", i, "norm_weight")] = (f"{prefix}.norm.weight", same, same)
        table[mixer + ("in_proj", "kernel")] = (f"{prefix}.mixer.in_proj.weight", linear, linear)
        table[mixer + ("out_proj", "kernel")] = (f"{prefix}.mixer.out_proj.weight", linear, linear)
        if cfg.proj_bias:
            table[mixer + ("in_proj", "bias")] = (f"{prefix}.mixer.in_proj.bias", same, same)
            table[mixer + ("out_proj", "bias")] = (f"{prefix}.mixer.out_proj.bias", same, same)
        table[mixer + ("conv_weight",)] = (f"{prefix}.mixer.conv1d.weight", conv_in, conv_out)
        if cfg.conv_bias:
            table[mixer + ("conv_bias",)] = (f"{prefix}.mixer.conv1d.bias", same, same)
        for ours, theirs in (("dt_bias", "dt_bias"), ("A_log", "A_log"), ("D", "D"), ("norm_weight", "norm.weight")):
            table[mixer + (ours,)] = (f"{prefix}.mixer.{theirs}", same, same)
    return table


def _abstract_model(cfg: Mamba2Config):
    return nnx.eval_shape(lambda: Mamba2LM(cfg, rngs=nnx.Rngs(0)))


def _path_key(path) -> Tuple:
    """A pytree key path of an nnx State -> ('layers', 0, 'mixer', 'A_log') (drops the Variable's `.value`)."""
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.GetAttrKey):
            if p.name == "value":
                continue
            parts.append(p.name)
        elif isinstance(p, jax.tree_util.DictKey):
            parts.append(p.key)
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(p.idx)
        else:
            parts.append(p)
    return tuple(parts)


def model_from_tensors(cfg: Mamba2Config, tensors: Mapping[str, np.ndarray], embedding_key: str, source: str) -> Mamba2LM:
    """Builds a model from checkpoint tensors, checking every key and shape."""
    abstract = _abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    table = _parameter_map(cfg, embedding_key)
    used = set()
    pdt = cfg.jnp_param_dtype

    def fill(path, leaf):
        key = _path_key(path)
        if key not in table:
            raise CheckpointError(f"internal: no checkpoint key for parameter {key}")
        name, to_ours, _ = table[key]
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor `{name}`")
        value = to_ours(np.asarray(tensors[name]))
        if value.shape != tuple(leaf.shape):
            raise CheckpointError(
                f"{source}: tensor `{name}` has shape {tuple(np.asarray(tensors[name]).shape)}; the config expects "
                f"{_expected_source_shape(name, tuple(leaf.shape))}"
            )
        used.add(name)
        return jnp.asarray(value, dtype=pdt)

    state = jax.tree_util.tree_map_with_path(fill, state)
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    extra = sorted(set(tensors) - used - ignorable)
    if extra:
        raise CheckpointError(
            f"{source}: {len(extra)} tensors are not part of a Mamba-2 model with this config, e.g. {extra[:5]} "
            "(attention / MLP layers, or a config that does not match the weights)"
        )
    return nnx.merge(graphdef, state)


def _expected_source_shape(name: str, ours: Tuple[int, ...]) -> Tuple[int, ...]:
    if name.endswith(("in_proj.weight", "out_proj.weight")):
        return ours[::-1]
    if name.endswith("conv1d.weight"):
        return (ours[1], 1, ours[0])
    return ours


def tensors_from_model(model: Mamba2LM, embedding_key: str = "backbone.embeddings.weight") -> Dict[str, np.ndarray]:
    """Our parameters as checkpoint tensors (float32 NumPy arrays) under the public key names."""
    cfg = model.config
    table = _parameter_map(cfg, embedding_key)
    out = {}
    state = nnx.state(model, nnx.Param)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name, _, to_theirs = table[_path_key(path)]
        out[name] = to_theirs(np.asarray(leaf, np.float32))
    return out


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _read_json(path: str) -> Dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file {path} (a Mamba-2 checkpoint directory needs config.json)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_tensors(directory: str) -> Tuple[Dict[str, np.ndarray], str]:
    """Reads the weights of a checkpoint directory; returns (tensors, file description)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(index):
        from safetensors.numpy import load_file

        shards = sorted(set(_read_json(index)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise CheckpointError(f"missing file {path} (listed in model.safetensors.index.json)")
            tensors.update(_load_safetensors(path))
        return tensors, index
    if os.path.isfile(single):
        return _load_safetensors(single), single
    if os.path.isfile(bin_path):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{bin_path} is a PyTorch pickle; reading it needs torch (pip install 'ssm-jax[torch]')"
            ) from e
        raw = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {k: v.detach().to(torch.float32).numpy() for k, v in raw.items()}, bin_path
    raise CheckpointError(
        f"missing weights in {directory}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors


def detect_format(raw_config: Mapping) -> str:
    """'hf' for transformers configs, 'state-spaces' for mamba_ssm configs."""
    if raw_config.get("model_type") == "mamba2" or "hidden_size" in raw_config:
        return "hf"
    if "d_model" in raw_config:
        return "state-spaces"
    raise CheckpointError(
        "config.json is neither a state-spaces config (d_model, n_layer, ssm_cfg) nor a Hugging Face Mamba-2 "
        f"config (model_type 'mamba2'); fields: {sorted(raw_config)[:12]}"
    )


def from_pretrained(path: str, *, dtype: str = "float32", param_dtype: Optional[str] = None, **config_overrides) -> Mamba2LM:
    """Loads a local state-spaces or Hugging Face Mamba-2 checkpoint directory.

    Args:
      path: directory with ``config.json`` and ``pytorch_model.bin`` / ``model.safetensors``.
      dtype: compute dtype ("float32" or "bfloat16").
      param_dtype: parameter dtype (defaults to ``dtype``).
      **config_overrides: other :class:`Mamba2Config` fields, e.g. ``ssd_impl="xla"``.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist (only local directories are read)")
    raw = _read_json(os.path.join(path, "config.json"))
    overrides = dict(dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    fmt = detect_format(raw)
    if fmt == "hf":
        cfg, embedding_key = config_from_hf(raw, **overrides), "backbone.embeddings.weight"
    else:
        cfg, embedding_key = config_from_state_spaces(raw, **overrides), "backbone.embedding.weight"
    tensors, source = load_tensors(path)
    if fmt == "state-spaces" and embedding_key not in tensors and "backbone.embeddings.weight" in tensors:
        embedding_key = "backbone.embeddings.weight"
    return model_from_tensors(cfg, tensors, embedding_key, source)


def save_hf(model: Mamba2LM, directory: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in the Hugging Face transformers Mamba-2 format."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config_dict(model.config), f, indent=2)
    save_file(tensors_from_model(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
