"""A float64 NumPy statement of mamba_ssm's Mamba-2 language model (``MambaLMHeadModel`` with ``Mamba2`` layers),
written from its definition, for the options transformers' Mamba2 lacks (``d_ssm``, ``D_has_hdim``,
``norm_before_gate``). Step-by-step recurrence, no chunking, nothing shared with ssm_jax.

Also writes random state-spaces checkpoints with these options (``config.json`` + ``model.safetensors``).
"""

import json
import os
from typing import Dict, Mapping

import numpy as np

SSM_DEFAULTS = dict(
    d_state=128,
    d_conv=4,
    expand=2,
    headdim=64,
    ngroups=1,
    d_ssm=None,
    D_has_hdim=False,
    norm_before_gate=False,
    dt_limit=(0.0, float("inf")),
    bias=False,
    conv_bias=True,
)
GATED_NORM_EPS = 1e-5  # mamba_ssm's Mamba2 builds its RMSNormGated with eps=1e-5 whatever norm_epsilon says


def sizes(config: Mapping) -> Dict[str, int]:
    s = {**SSM_DEFAULTS, **config["ssm_cfg"]}
    d_inner = s["expand"] * config["d_model"]
    d_ssm = s["d_ssm"] or d_inner
    heads = d_ssm // s["headdim"]
    conv_dim = d_ssm + 2 * s["ngroups"] * s["d_state"]
    return dict(
        d_inner=d_inner,
        d_ssm=d_ssm,
        d_mlp=d_inner - d_ssm,
        heads=heads,
        conv_dim=conv_dim,
        d_in_proj=2 * d_inner + 2 * s["ngroups"] * s["d_state"] + heads,
    )


def padded_vocab(config: Mapping) -> int:
    m = config.get("pad_vocab_size_multiple", 8)
    return -(-config["vocab_size"] // m) * m


def random_weights(config: Mapping, seed: int) -> Dict[str, np.ndarray]:
    """Random float32 weights of every tensor the config needs, away from their special init values."""
    rng = np.random.default_rng(seed)
    s = {**SSM_DEFAULTS, **config["ssm_cfg"]}
    z = sizes(config)
    d = config["d_model"]
    normal = lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    w = {"backbone.embedding.weight": normal(padded_vocab(config), d, scale=0.5), "backbone.norm_f.weight": 1 + normal(d, scale=0.1)}
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}"
        w[f"{p}.norm.weight"] = 1 + normal(d, scale=0.1)
        w[f"{p}.mixer.in_proj.weight"] = normal(z["d_in_proj"], d, scale=d**-0.5)
        w[f"{p}.mixer.conv1d.weight"] = normal(z["conv_dim"], 1, s["d_conv"], scale=0.5)
        w[f"{p}.mixer.conv1d.bias"] = normal(z["conv_dim"], scale=0.1)
        w[f"{p}.mixer.dt_bias"] = normal(z["heads"], scale=0.5) - 2.5
        w[f"{p}.mixer.A_log"] = np.log(rng.uniform(1, 16, z["heads"])).astype(np.float32)
        w[f"{p}.mixer.D"] = 1 + normal(z["d_ssm"] if s["D_has_hdim"] else z["heads"], scale=0.3)
        w[f"{p}.mixer.norm.weight"] = 1 + normal(z["d_ssm"], scale=0.1)
        w[f"{p}.mixer.out_proj.weight"] = normal(d, z["d_inner"], scale=z["d_inner"] ** -0.5)
    return w


def write_checkpoint(directory: str, config: Mapping, weights: Mapping[str, np.ndarray]) -> str:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(dict(weights), os.path.join(directory, "model.safetensors"))
    return directory


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _mixer(u: np.ndarray, w: Mapping[str, np.ndarray], p: str, config: Mapping) -> np.ndarray:
    """mamba_ssm Mamba2.forward on ``u (batch, seqlen, d_model)``."""
    s = {**SSM_DEFAULTS, **config["ssm_cfg"]}
    z = sizes(config)
    b, length, _ = u.shape
    G, N, P, H, K = s["ngroups"], s["d_state"], s["headdim"], z["heads"], s["d_conv"]
    zxbcdt = u @ w[f"{p}.in_proj.weight"].T
    cuts = np.cumsum([z["d_mlp"], z["d_mlp"], z["d_ssm"], z["conv_dim"]])
    z0, x0, gate, xBC, dt = np.split(zxbcdt, cuts, axis=-1)
    conv_w = w[f"{p}.conv1d.weight"][:, 0, :]  # (conv_dim, K)
    padded = np.concatenate([np.zeros((b, K - 1, z["conv_dim"])), xBC], axis=1)
    conv = sum(padded[:, k : k + length] * conv_w[:, k] for k in range(K)) + w[f"{p}.conv1d.bias"]
    xBC = _silu(conv)
    x, B, C = np.split(xBC, [z["d_ssm"], z["d_ssm"] + G * N], axis=-1)
    x = x.reshape(b, length, H, P)
    B, C = B.reshape(b, length, G, N), C.reshape(b, length, G, N)
    dt = np.log1p(np.exp(dt + w[f"{p}.dt_bias"]))  # softplus
    dt = np.clip(dt, *s["dt_limit"])
    A = -np.exp(w[f"{p}.A_log"])
    D = w[f"{p}.D"].reshape(H, P) if s["D_has_hdim"] else w[f"{p}.D"][:, None]  # (H, P) or (H, 1)
    group = np.arange(H) // (H // G)
    state = np.zeros((b, H, P, N))
    y = np.zeros((b, length, H, P))
    for t in range(length):
        decay = np.exp(dt[:, t] * A)  # (b, H)
        state = decay[..., None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group][:, :, None]
        y[:, t] = np.einsum("bhpn,bhn->bhp", state, C[:, t, group]) + D * x[:, t]
    y = y.reshape(b, length, z["d_ssm"])
    if not s["norm_before_gate"]:
        y = y * _silu(gate)
    groups = y.reshape(b, length, G, z["d_ssm"] // G)
    groups = groups / np.sqrt(np.mean(groups * groups, axis=-1, keepdims=True) + GATED_NORM_EPS)
    y = groups.reshape(b, length, z["d_ssm"]) * w[f"{p}.norm.weight"]
    if s["norm_before_gate"]:
        y = y * _silu(gate)
    y = np.concatenate([_silu(z0) * x0, y], axis=-1)  # the gated MLP channels come first
    return y @ w[f"{p}.out_proj.weight"].T


def lm_logits(config: Mapping, weights: Mapping[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Float64 logits ``(batch, seqlen, padded vocab)`` of token ids ``(batch, seqlen)``."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    eps = config.get("norm_epsilon", 1e-5)
    residual = w["backbone.embedding.weight"][ids]
    for i in range(config["n_layer"]):
        p = f"backbone.layers.{i}"
        residual = residual + _mixer(_rms(residual, w[f"{p}.norm.weight"], eps), w, f"{p}.mixer", config)
    hidden = _rms(residual, w["backbone.norm_f.weight"], eps)
    head = w["backbone.embedding.weight"] if config.get("tie_embeddings", True) else w["lm_head.weight"]
    return hidden @ head.T
