"""Public Mamba-2 checkpoints <-> ssm_jax parameters.

Two on-disk formats are read from a directory or a Hugging Face Hub repo (:mod:`ssm_jax.hub`):

* **state-spaces** (``mamba_ssm``): ``config.json`` with ``d_model, n_layer, vocab_size, ssm_cfg, ...``
  (``ssm_cfg`` may be partial: missing fields take the Mamba-2 defaults; ``d_ssm``, ``D_has_hdim`` and
  ``norm_before_gate`` are read) and weights in ``pytorch_model.bin`` or ``model.safetensors``; keys
  ``backbone.embedding.weight``, ``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``.
* **Hugging Face transformers** (``model_type: mamba2``): ``config.json`` with ``hidden_size,
  num_hidden_layers, state_size, head_dim, num_heads, n_groups, ...`` and ``model.safetensors``
  (optionally sharded with ``model.safetensors.index.json``) or ``pytorch_model.bin``; the embedding
  is ``backbone.embeddings.weight``. Read as transformers' ``Mamba2ForCausalLM`` computes it: its mixer
  always gates before the norm and has no ``d_ssm`` / ``D_has_hdim``, so a ``norm_before_gate`` or
  ``rms_norm`` field (older transformers wrote them, e.g. ``"norm_before_gate": true`` in Codestral's
  config) is ignored, as transformers ignores it.

:func:`save_hf` writes the transformers format so a model trained here loads in ``transformers``;
:func:`save_state_spaces` writes the state-spaces format (``config.json`` + ``model.safetensors``), which
also holds the options transformers lacks.
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

from ssm_jax import hub
from ssm_jax.dtypes import dtype_name
from ssm_jax.hub import CheckpointError
from ssm_jax.model import Mamba2Config, Mamba2LM

__all__ = [
    "CheckpointError",
    "from_pretrained",
    "save_hf",
    "save_state_spaces",
    "config_from_state_spaces",
    "config_from_hf",
    "hf_config_dict",
    "state_spaces_config_dict",
]

_MAMBA2_SSM_DEFAULTS = dict(
    d_state=128,
    d_conv=4,
    expand=2,
    headdim=64,
    ngroups=1,
    chunk_size=256,
    dt_min=0.001,
    dt_max=0.1,
    dt_init_floor=1e-4,
    dt_limit=(0.0, float("inf")),
    A_init_range=(1, 16),
    bias=False,
    conv_bias=True,
    D_has_hdim=False,
    rmsnorm=True,
    norm_before_gate=False,
    d_ssm=None,
)
# Options of mamba_ssm's Mamba2 layer that transformers' Mamba2 does not have, with their neutral values.
_STATE_SPACES_ONLY = dict(d_ssm=None, D_has_hdim=False, norm_before_gate=False)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def config_from_state_spaces(raw: Mapping) -> Mamba2Config:
    """Builds a config from a state-spaces ``config.json`` (MambaConfig of mamba_ssm)."""
    for field in ("d_model", "n_layer", "vocab_size"):
        if field not in raw:
            raise CheckpointError(f"missing field `{field}` (state-spaces format)")
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer != "Mamba2":
        raise CheckpointError(
            f"ssm_cfg.layer = {layer!r}; only Mamba-2 layers are supported (Mamba-1 checkpoints "
            "use a different layer, and mamba_ssm treats a missing `layer` as Mamba1)"
        )
    if raw.get("attn_layer_idx"):
        raise CheckpointError(f"attn_layer_idx = {raw['attn_layer_idx']}; hybrid checkpoints with attention layers are not supported")
    if raw.get("d_intermediate", 0):
        raise CheckpointError(f"d_intermediate = {raw['d_intermediate']}; checkpoints with MLP layers are not supported")
    if not raw.get("rms_norm", True):
        raise CheckpointError("rms_norm = false (LayerNorm blocks) is not supported")
    runtime_only = {"use_mem_eff_path", "process_group", "sequence_parallel", "activation"}
    unknown = set(ssm_cfg) - set(_MAMBA2_SSM_DEFAULTS) - runtime_only
    if unknown:
        raise CheckpointError(f"unknown ssm_cfg fields {sorted(unknown)}")
    ssm = {**_MAMBA2_SSM_DEFAULTS, **ssm_cfg}
    if ssm.get("activation", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"ssm_cfg.activation = {ssm['activation']!r}; only silu is supported")
    if not ssm["rmsnorm"]:
        raise CheckpointError("ssm_cfg.rmsnorm = false (an SSM output without its gated norm) is not supported")
    fields = dict(
        d_model=raw["d_model"],
        n_layer=raw["n_layer"],
        vocab_size=raw["vocab_size"],
        d_state=ssm["d_state"],
        d_conv=ssm["d_conv"],
        expand=ssm["expand"],
        headdim=ssm["headdim"],
        ngroups=ssm["ngroups"],
        chunk_size=ssm["chunk_size"],
        dt_min=ssm["dt_min"],
        dt_max=ssm["dt_max"],
        dt_init_floor=ssm["dt_init_floor"],
        dt_limit=tuple(float(v) for v in ssm["dt_limit"]),
        A_init_range=tuple(float(v) for v in ssm["A_init_range"]),
        pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
        norm_eps=raw.get("norm_epsilon", 1e-5),
        tie_embeddings=raw.get("tie_embeddings", True),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        conv_bias=ssm["conv_bias"],
        proj_bias=ssm["bias"],
        d_ssm=ssm["d_ssm"],
        D_has_hdim=ssm["D_has_hdim"],
        norm_before_gate=ssm["norm_before_gate"],
    )
    return Mamba2Config(**fields)


def config_from_hf(raw: Mapping) -> Mamba2Config:
    """Builds a config from a Hugging Face ``Mamba2Config`` ``config.json`` (transformers' definition: see the
    module docstring for the fields it ignores)."""
    if raw.get("model_type", "mamba2") != "mamba2":
        raise CheckpointError(f"model_type = {raw.get('model_type')!r}; expected 'mamba2'")
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if field not in raw:
            raise CheckpointError(f"missing field `{field}` (Hugging Face format)")
    expand = raw.get("expand", 2)
    head_dim = raw.get("head_dim", 64)
    d_inner = expand * raw["hidden_size"]
    if "num_heads" in raw and raw["num_heads"] * head_dim != d_inner:
        raise CheckpointError(f"num_heads * head_dim = {raw['num_heads'] * head_dim} != expand * hidden_size = {d_inner}")
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"hidden_act = {raw['hidden_act']!r}; only silu is supported")
    limit = [_json_float(v) for v in raw.get("time_step_limit", (0.0, float("inf")))]
    fields = dict(
        d_model=raw["hidden_size"],
        n_layer=raw["num_hidden_layers"],
        vocab_size=raw["vocab_size"],
        d_state=raw.get("state_size", 128),
        d_conv=raw.get("conv_kernel", 4),
        expand=expand,
        headdim=head_dim,
        ngroups=raw.get("n_groups", 8),
        chunk_size=raw.get("chunk_size", 256),
        dt_min=raw.get("time_step_min", 0.001),
        dt_max=raw.get("time_step_max", 0.1),
        dt_init_floor=raw.get("time_step_floor", 1e-4),
        dt_limit=(float(limit[0]), float(limit[1])),
        pad_vocab_size_multiple=1,
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=raw.get("tie_word_embeddings", False),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        conv_bias=raw.get("use_conv_bias", True),
        proj_bias=raw.get("use_bias", False),
    )
    return Mamba2Config(**fields)


def _json_float(value) -> float:
    """Reads a float written by any transformers version (5.x writes infinity as {"__float__": "Infinity"})."""
    if isinstance(value, Mapping) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def hf_config_dict(cfg: Mamba2Config) -> Dict:
    """The Hugging Face ``config.json`` content for ``cfg`` (vocab_size is the padded size).

    Raises ValueError for the mamba_ssm options transformers' Mamba2 lacks (its loader would refuse the
    weights, or for ``norm_before_gate`` compute something else): :func:`state_spaces_config_dict` holds them.
    """
    unsupported = {k: getattr(cfg, k) for k, neutral in _STATE_SPACES_ONLY.items() if getattr(cfg, k) != neutral}
    if unsupported:
        raise ValueError(
            f"transformers' Mamba2 has no option {sorted(unsupported)} (this model: {unsupported}); write it with "
            "ssm_jax.convert.save_state_spaces, which ssm_jax.from_pretrained and mamba_ssm read"
        )
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "vocab_size": cfg.padded_vocab_size,
        "state_size": cfg.d_state,
        "head_dim": cfg.headdim,
        "num_heads": cfg.nheads,
        "n_groups": cfg.ngroups,
        "expand": cfg.expand,
        "conv_kernel": cfg.d_conv,
        "chunk_size": cfg.chunk_size,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "time_step_limit": [cfg.dt_limit[0], cfg.dt_limit[1]],
        "layer_norm_epsilon": cfg.norm_eps,
        "use_bias": cfg.proj_bias,
        "use_conv_bias": cfg.conv_bias,
        "residual_in_fp32": cfg.residual_in_fp32,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "rescale_prenorm_residual": False,
        "time_step_rank": math.ceil(cfg.d_model / 16),
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


def state_spaces_config_dict(cfg: Mamba2Config) -> Dict:
    """The mamba_ssm (state-spaces) ``config.json`` content for ``cfg``, every layer option in ``ssm_cfg``."""
    ssm_cfg = dict(
        layer="Mamba2",
        d_state=cfg.d_state,
        d_conv=cfg.d_conv,
        expand=cfg.expand,
        headdim=cfg.headdim,
        ngroups=cfg.ngroups,
        chunk_size=cfg.chunk_size,
        dt_min=cfg.dt_min,
        dt_max=cfg.dt_max,
        dt_init_floor=cfg.dt_init_floor,
        dt_limit=list(cfg.dt_limit),
        A_init_range=list(cfg.A_init_range),
        bias=cfg.proj_bias,
        conv_bias=cfg.conv_bias,
        d_ssm=cfg.d_ssm,
        D_has_hdim=cfg.D_has_hdim,
        norm_before_gate=cfg.norm_before_gate,
        rmsnorm=True,
    )
    return {
        "d_model": cfg.d_model,
        "n_layer": cfg.n_layer,
        "vocab_size": cfg.vocab_size,
        "d_intermediate": 0,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "norm_epsilon": cfg.norm_eps,
        "residual_in_fp32": cfg.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
        "tie_embeddings": cfg.tie_embeddings,
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
# Loading and saving
# --------------------------------------------------------------------------------------------------


def detect_format(raw_config: Mapping) -> str:
    """'hf' for transformers configs, 'state-spaces' for mamba_ssm configs."""
    if raw_config.get("model_type") == "mamba2" or "hidden_size" in raw_config:
        return "hf"
    if "d_model" in raw_config:
        return "state-spaces"
    raise CheckpointError(
        "neither a state-spaces config (d_model, n_layer, ssm_cfg) nor a Hugging Face Mamba-2 config "
        f"(model_type 'mamba2'); fields: {sorted(raw_config)[:12]}"
    )


def _config_from_file(raw: Mapping, path: str) -> Tuple[Mamba2Config, str]:
    """The config of a checkpoint's ``config.json`` (read from ``path``) and its embedding key."""
    try:
        if detect_format(raw) == "hf":
            return config_from_hf(raw), "backbone.embeddings.weight"
        return config_from_state_spaces(raw), "backbone.embedding.weight"
    except (TypeError, ValueError, KeyError) as e:  # CheckpointError, or a field of the wrong type or value
        raise CheckpointError(f"{path}: {str(e).replace('Mamba2Config.', '')}") from e


def from_pretrained(
    name_or_path: str,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    dtype="float32",
    param_dtype=None,
    **config_overrides,
) -> Mamba2LM:
    """Loads a state-spaces or Hugging Face Mamba-2 checkpoint from a directory or the Hugging Face Hub.

    Args:
      name_or_path: a directory with ``config.json`` and ``model.safetensors`` (possibly sharded) or
        ``pytorch_model.bin``; otherwise a Hub repo id (``"state-spaces/mamba2-130m"``), fetched with
        ``huggingface_hub`` or, offline (``HF_HUB_OFFLINE=1``), read from its cache (:mod:`ssm_jax.hub`).
      revision: branch, tag or commit of a Hub repo (default ``main``).
      cache_dir: Hub cache directory (default: huggingface_hub's, from ``HF_HUB_CACHE`` / ``HF_HOME``).
      dtype: compute dtype: a string ("float32", "bfloat16", ...), a jnp type (``jnp.bfloat16``) or a np.dtype.
      param_dtype: parameter dtype, in the same forms (defaults to ``dtype``).
      **config_overrides: other :class:`Mamba2Config` fields, e.g. ``ssd_impl="xla"``.

    Raises:
      CheckpointError: naming the file and what is wrong, for anything that is not a loadable checkpoint.
    """
    dtype = dtype_name(dtype, "dtype")
    param_dtype = dtype if param_dtype is None else dtype_name(param_dtype, "param_dtype")
    directory = hub.checkpoint_directory(name_or_path, revision=revision, cache_dir=cache_dir)
    raw = hub.read_config(directory)
    cfg, embedding_key = _config_from_file(raw, os.path.join(directory, hub.CONFIG_NAME))
    cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype, **config_overrides)
    tensors, source = hub.read_weights(directory)
    other = {"backbone.embedding.weight": "backbone.embeddings.weight", "backbone.embeddings.weight": "backbone.embedding.weight"}[embedding_key]
    if embedding_key not in tensors and other in tensors:  # some conversions use the other format's name
        embedding_key = other
    return model_from_tensors(cfg, tensors, embedding_key, source)


def save_hf(model: Mamba2LM, directory: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in the Hugging Face transformers Mamba-2 format.

    Models with options transformers lacks (``d_ssm``, ``D_has_hdim``, ``norm_before_gate``) are refused with a
    ValueError pointing to :func:`save_state_spaces`.
    """
    _save(model, directory, hf_config_dict(model.config), "backbone.embeddings.weight")


def save_state_spaces(model: Mamba2LM, directory: str) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in the mamba_ssm (state-spaces) format, every option kept.

    ``ssm_jax.from_pretrained`` reads it as is; mamba_ssm's own loader reads ``pytorch_model.bin``
    (``torch.save(safetensors.torch.load_file(path), "pytorch_model.bin")`` converts).
    """
    _save(model, directory, state_spaces_config_dict(model.config), "backbone.embedding.weight")


def _save(model: Mamba2LM, directory: str, config: Dict, embedding_key: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, hub.CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors_from_model(model, embedding_key), os.path.join(directory, hub.SAFETENSORS_NAME), metadata={"format": "pt"})
