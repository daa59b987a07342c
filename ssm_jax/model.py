"""Mamba-2 in Flax NNX, numerically matching the public state-spaces / Hugging Face checkpoints.

Layer (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060; docs/background.md):
``in_proj -> [z0, x0, z, xBC, dt]``; ``xBC = silu(causal depthwise conv(xBC))`` split into ``x, B, C``;
``dt = softplus(dt + dt_bias)``; SSD scan with ``A = -exp(A_log)`` and skip ``D`` (one per head, or one per
channel with ``D_has_hdim``); gated grouped RMSNorm ``norm(y * silu(z))`` (or ``norm(y) * silu(z)`` with
``norm_before_gate``); with ``d_ssm < expand * d_model`` the other channels form a gated MLP
``silu(z0) * x0`` placed before the SSM output; ``out_proj``. Blocks are pre-norm with the residual stream
kept in float32; the LM head is tied to the embedding unless configured otherwise.

Every call can carry a cache (streaming / generation), ``segment_ids`` (packed documents: the conv and the
SSM state restart where the id changes), ``valid`` (left padding that leaves the conv and SSM state
untouched: ragged batches) and a ``mitigation`` (applied to every layer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from ssm_jax import mitigations as mitigations_lib
from ssm_jax.dtypes import dtype_name, jnp_dtype
from ssm_jax.ssd import IMPLS, document_ids, resolve_impl, ssd

Array = jax.Array

# Rematerialisation policy of each block in the backward pass (``Mamba2Config.remat``):
#   "none": keep every activation; "full": keep only the block's input and recompute the rest;
#   "dots": also keep the outputs of matmuls without batch dimensions -- in a block the in_proj output (the
#   out_proj output is not needed by the backward pass, and the SSD's contractions have batch dimensions) --
#   and recompute the conv, the SSD and the norms.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy_name(value: Union[str, bool], argument: str = "remat") -> str:
    """The canonical remat policy name; ``True`` / ``False`` (the former boolean field) mean "full" / "none"."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str) and value in REMAT_POLICIES:
        return value
    raise ValueError(f"`{argument}` must be one of {list(REMAT_POLICIES)} (or a bool: True = 'full'), got {value!r}")


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Sizes and options of a Mamba-2 language model (defaults: the public 130m checkpoint).

    ``dtype`` (compute) and ``param_dtype`` (stored parameters) accept a string, a jnp scalar type or a
    ``np.dtype`` and are stored as their canonical name; ``remat`` is a name of :data:`REMAT_POLICIES` (a bool
    is accepted and stored as "full" / "none"). ``d_ssm``, ``D_has_hdim`` and ``norm_before_gate`` are the
    options of mamba_ssm's ``Mamba2`` layer of the same names (``d_ssm=None``: every channel is SSM).
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: Tuple[float, float] = (0.0, float("inf"))
    A_init_range: Tuple[float, float] = (1.0, 16.0)
    pad_vocab_size_multiple: int = 16
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    conv_bias: bool = True
    proj_bias: bool = False
    d_ssm: Optional[int] = None
    D_has_hdim: bool = False
    norm_before_gate: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    ssd_impl: str = "auto"
    remat: str = "none"

    def __post_init__(self):
        positive = ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "pad_vocab_size_multiple")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
        if self.d_ssm is not None and not (isinstance(self.d_ssm, int) and 1 <= self.d_ssm <= self.d_inner):
            raise ValueError(f"Mamba2Config.d_ssm must be None or an int in [1, expand * d_model = {self.d_inner}], got {self.d_ssm!r}")
        if self.ssm_dim % self.headdim:
            raise ValueError(
                f"Mamba2Config: the SSM channels (d_ssm, or expand * d_model) = {self.ssm_dim} must be a multiple of headdim = {self.headdim}"
            )
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba2Config: heads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")
        for name in ("D_has_hdim", "norm_before_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Mamba2Config.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("param_dtype", "dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name), f"Mamba2Config.{name}"))
        object.__setattr__(self, "remat", remat_policy_name(self.remat, "Mamba2Config.remat"))
        if self.ssd_impl not in IMPLS:
            raise ValueError(f"Mamba2Config.ssd_impl must be one of {IMPLS}, got {self.ssd_impl!r}")
        if not (0 < self.dt_min <= self.dt_max):
            raise ValueError(f"Mamba2Config: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @property
    def d_inner(self) -> int:
        """Channels of the mixer: SSM channels plus gated-MLP channels."""
        return self.expand * self.d_model

    @property
    def ssm_dim(self) -> int:
        """Channels that go through the SSM (``d_ssm``, or all of ``d_inner``)."""
        return self.d_inner if self.d_ssm is None else self.d_ssm

    @property
    def d_mlp(self) -> int:
        """Channels of the gated MLP beside the SSM (0 unless ``d_ssm < d_inner``)."""
        return self.d_inner - self.ssm_dim

    @property
    def nheads(self) -> int:
        return self.ssm_dim // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.ssm_dim + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        """``[z0, x0 (d_mlp each), z (ssm_dim), xBC (conv_dim), dt (nheads)]``."""
        return 2 * self.d_mlp + self.ssm_dim + self.conv_dim + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @property
    def state_size(self) -> int:
        """Elements of the SSM state of the whole model, ``layers * heads * headdim * d_state``."""
        return self.n_layer * self.nheads * self.headdim * self.d_state

    @property
    def jnp_dtype(self):
        return jnp_dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp_dtype(self.param_dtype)

    def replace(self, **changes) -> "Mamba2Config":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MixerCache:
    """Per-layer inference state.

    Attributes:
      conv_state: ``(batch, conv_dim, d_conv)`` the last ``d_conv`` raw (pre-conv) xBC columns.
      ssm_state: ``(batch, heads, headdim, d_state)`` float32 SSM state.
      window: for the sliding-window mitigation only, the last ``window - 1`` SSD inputs
        (``x (b, w, h, p)``, ``dt (b, w, h)``, ``B (b, w, g, n)``): the windowed output needs them, and
        memory stays O(window) however long the stream.
    """

    conv_state: Array
    ssm_state: Array
    window: Optional[Tuple[Array, Array, Array]] = None


# --------------------------------------------------------------------------------------------------
# Small functional pieces (shared with inference, diagnostics and sequence parallelism)
# --------------------------------------------------------------------------------------------------


def rms_norm(x: Array, weight: Array, eps: float, out_dtype) -> Array:
    """RMSNorm over the last axis computed in float32."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(out_dtype)


def gated_rms_norm(y: Array, z: Array, weight: Array, group_size: int, eps: float, out_dtype, *, norm_before_gate: bool = False) -> Array:
    """Grouped RMSNorm with a SiLU gate in float32, one norm per group of ``group_size`` channels.

    ``norm_before_gate=False`` (the public checkpoints): ``RMSNorm_grouped(y * silu(z)) * weight``;
    ``True``: ``RMSNorm_grouped(y) * weight * silu(z)``. ``y, z (..., channels)``.
    """
    gate = jax.nn.silu(z.astype(jnp.float32))
    yf = y.astype(jnp.float32)
    if not norm_before_gate:
        yf = yf * gate
    grouped = yf.reshape(yf.shape[:-1] + (yf.shape[-1] // group_size, group_size))  # (..., groups, group_size)
    grouped = grouped * jax.lax.rsqrt(jnp.mean(jnp.square(grouped), axis=-1, keepdims=True) + eps)
    out = grouped.reshape(yf.shape) * weight.astype(jnp.float32)
    if norm_before_gate:
        out = out * gate
    return out.astype(out_dtype)


def causal_conv1d(
    xBC: Array,
    weight: Array,
    bias: Optional[Array],
    prefix: Optional[Array] = None,
    padded_doc: Optional[Array] = None,
) -> Array:
    """Depthwise causal convolution.

    Args:
      xBC: ``(batch, seqlen, channels)`` raw columns.
      weight: ``(width, channels)``; ``out[t] = sum_k weight[k] * xBC[t - (width - 1) + k]``.
      bias: ``(channels,)`` or None.
      prefix: ``(batch, width - 1, channels)`` raw columns before position 0 (a cache or the previous
        sequence shard), or None for zeros.
      padded_doc: ``(batch, width - 1 + seqlen)`` document ids of ``[prefix; xBC]``; taps that reach into
        another document read zero (packed documents). None: one document.
    """
    width = weight.shape[0]
    b, l, ch = xBC.shape
    if prefix is None:
        prefix = jnp.zeros((b, width - 1, ch), xBC.dtype)
    padded = jnp.concatenate([prefix.astype(xBC.dtype), xBC], axis=1)  # (b, width - 1 + l, ch)
    out = jnp.zeros((b, l, ch), jnp.float32)
    for k in range(width):
        tap = padded[:, k : k + l].astype(jnp.float32)
        if padded_doc is not None and k < width - 1:
            same = padded_doc[:, k : k + l] == padded_doc[:, width - 1 :]
            tap = jnp.where(same[..., None], tap, 0.0)
        out = out + tap * weight[k].astype(jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(xBC.dtype)


def doc_with_prefix(doc: Optional[Array], width: int) -> Optional[Array]:
    """Document ids of ``[prefix; sequence]`` when the prefix continues the sequence's first document."""
    if doc is None:
        return None
    return jnp.concatenate([jnp.zeros((doc.shape[0], width - 1), doc.dtype), doc], axis=1)


@dataclasses.dataclass(frozen=True)
class SSMInputs:
    """What one mixer feeds its SSD scan (and what diagnostics read)."""

    x: Array  # (batch, seqlen, heads, headdim)
    dt: Array  # (batch, seqlen, heads) float32, after softplus and clamping
    A: Array  # (heads,) float32, negative
    B: Array  # (batch, seqlen, groups, d_state)
    C: Array  # (batch, seqlen, groups, d_state)
    z: Array  # (batch, seqlen, d_inner) gate


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def _uniform_fan_in(fan_in: int):
    """PyTorch's default Linear / Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Mamba2Mixer(nnx.Module):
    """The Mamba-2 mixer (SSD layer) with the official initialisation."""

    def __init__(self, config: Mamba2Config, *, layer_idx: int = 0, rngs: nnx.Rngs):
        self.config = config
        self.layer_idx = layer_idx
        # When True, every call sows its SSD inputs as nnx.Intermediate "captured_ssm_inputs" (ssm_jax.diagnostics).
        self.capture_ssm_inputs = False
        cfg = config
        pdt = cfg.jnp_param_dtype
        self.in_proj = nnx.Linear(
            cfg.d_model,
            cfg.d_in_proj,
            use_bias=cfg.proj_bias,
            kernel_init=_uniform_fan_in(cfg.d_model),
            bias_init=nnx.initializers.zeros,
            param_dtype=pdt,
            dtype=cfg.jnp_dtype,
            rngs=rngs,
        )
        conv_init = _uniform_fan_in(cfg.d_conv)
        self.conv_weight = nnx.Param(conv_init(rngs.params(), (cfg.d_conv, cfg.conv_dim), jnp.float32).astype(pdt))
        self.conv_bias = nnx.Param(conv_init(rngs.params(), (cfg.conv_dim,), jnp.float32).astype(pdt)) if cfg.conv_bias else None
        # dt ~ log-uniform in [dt_min, dt_max] (floored); dt_bias = softplus^{-1}(dt).
        u = jax.random.uniform(rngs.params(), (cfg.nheads,), jnp.float32)
        dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(pdt))
        A = jax.random.uniform(rngs.params(), (cfg.nheads,), jnp.float32, *cfg.A_init_range)
        self.A_log = nnx.Param(jnp.log(A).astype(pdt))
        # D: one skip weight per head, or per channel (head x headdim) with D_has_hdim.
        self.D = nnx.Param(jnp.ones((cfg.ssm_dim if cfg.D_has_hdim else cfg.nheads,), pdt))
        self.norm_weight = nnx.Param(jnp.ones((cfg.ssm_dim,), pdt))
        self.out_proj = nnx.Linear(
            cfg.d_inner,
            cfg.d_model,
            use_bias=cfg.proj_bias,
            bias_init=nnx.initializers.zeros,
            kernel_init=_scaled(_uniform_fan_in(cfg.d_inner), 1.0 / math.sqrt(cfg.n_layer)),
            param_dtype=pdt,
            dtype=cfg.jnp_dtype,
            rngs=rngs,
        )

    def init_cache(self, batch_size: int) -> MixerCache:
        cfg = self.config
        return MixerCache(
            conv_state=jnp.zeros((batch_size, cfg.conv_dim, cfg.d_conv), cfg.jnp_dtype),
            ssm_state=jnp.zeros((batch_size, cfg.nheads, cfg.headdim, cfg.d_state), jnp.float32),
        )

    def project(self, u: Array) -> Tuple[Array, Array, Array]:
        """``u (batch, seqlen, d_model) -> z, raw xBC (b, l, conv_dim), raw dt (b, l, heads)``.

        ``z (b, l, 2 * d_mlp + ssm_dim)`` holds the gated-MLP inputs ``[z0, x0]`` (empty unless ``d_ssm`` is
        smaller than ``d_inner``) followed by the SSM's gate; :meth:`output` takes it apart.
        """
        cfg = self.config
        zxbcdt = self.in_proj(u.astype(cfg.jnp_dtype))  # (b, l, d_in_proj)
        gate_width = 2 * cfg.d_mlp + cfg.ssm_dim
        z, xBC_raw, dt_raw = jnp.split(zxbcdt, [gate_width, gate_width + cfg.conv_dim], axis=-1)
        return z, xBC_raw, dt_raw

    def ssm_inputs_from_projection(
        self,
        z: Array,
        xBC_raw: Array,
        dt_raw: Array,
        *,
        conv_prefix: Optional[Array] = None,
        padded_doc: Optional[Array] = None,
    ) -> SSMInputs:
        """Causal conv + SiLU, the split into ``x, B, C``, and ``dt = softplus(dt + dt_bias)`` (clamped)."""
        cfg = self.config
        bias = None if self.conv_bias is None else self.conv_bias[...]
        xBC = causal_conv1d(xBC_raw, self.conv_weight[...], bias, conv_prefix, padded_doc)
        xBC = jax.nn.silu(xBC.astype(jnp.float32)).astype(cfg.jnp_dtype)
        x, B, C = jnp.split(xBC, [cfg.ssm_dim, cfg.ssm_dim + cfg.ngroups * cfg.d_state], axis=-1)
        b, l = xBC_raw.shape[:2]
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        lo, hi = cfg.dt_limit
        if lo > 0.0 or hi < float("inf"):
            dt = jnp.clip(dt, lo, hi)
        return SSMInputs(
            x=x.reshape(b, l, cfg.nheads, cfg.headdim),
            dt=dt,
            A=-jnp.exp(self.A_log[...].astype(jnp.float32)),
            B=B.reshape(b, l, cfg.ngroups, cfg.d_state),
            C=C.reshape(b, l, cfg.ngroups, cfg.d_state),
            z=z,
        )

    def ssm_inputs(self, u: Array, *, conv_prefix: Optional[Array] = None, segment_ids: Optional[Array] = None) -> SSMInputs:
        """The SSD inputs of ``u (batch, seqlen, d_model)`` (what diagnostics read)."""
        z, xBC_raw, dt_raw = self.project(u)
        padded_doc = doc_with_prefix(document_ids(segment_ids, u.shape[:2]), self.config.d_conv)
        return self.ssm_inputs_from_projection(z, xBC_raw, dt_raw, conv_prefix=conv_prefix, padded_doc=padded_doc)

    def head_skip(self) -> Optional[Array]:
        """The ``D`` the SSD scan adds itself, ``(heads,)`` float32; None with ``D_has_hdim`` (see :meth:`__call__`)."""
        return None if self.config.D_has_hdim else self.D[...].astype(jnp.float32)

    def output(self, y: Array, z: Array) -> Array:
        """Gated grouped RMSNorm, the gated MLP (if any) and ``out_proj``.

        ``y (b, l, heads, headdim)``, ``z (b, l, 2 * d_mlp + ssm_dim)`` from :meth:`project` -> ``(b, l, d_model)``.
        """
        cfg = self.config
        b, l = y.shape[:2]
        z0, x0, gate = jnp.split(z, [cfg.d_mlp, 2 * cfg.d_mlp], axis=-1)
        out = gated_rms_norm(
            y.reshape(b, l, cfg.ssm_dim),
            gate,
            self.norm_weight[...],
            cfg.ssm_dim // cfg.ngroups,
            cfg.norm_eps,
            cfg.jnp_dtype,
            norm_before_gate=cfg.norm_before_gate,
        )  # (b, l, ssm_dim)
        if cfg.d_mlp:
            mlp = jax.nn.silu(z0.astype(jnp.float32)) * x0.astype(jnp.float32)  # (b, l, d_mlp)
            out = jnp.concatenate([mlp.astype(cfg.jnp_dtype), out], axis=-1)  # (b, l, d_inner)
        return self.out_proj(out)

    def __call__(
        self,
        u: Array,
        *,
        cache: Optional[MixerCache] = None,
        segment_ids: Optional[Array] = None,
        valid: Optional[Array] = None,
        mitigation: Optional[mitigations_lib.Mitigation] = None,
        impl: Optional[str] = None,
        sequence_axis: Optional[str] = None,
    ) -> Tuple[Array, Optional[MixerCache]]:
        """``u (batch, seqlen, d_model) -> (out (batch, seqlen, d_model), new cache or None)``.

        ``valid (batch, seqlen)`` bool, False at padding: a padding position feeds a zero column to the conv
        and has ``dt = 0`` (decay 1, no input), so it leaves the conv and SSM state as they were. Padding must
        come before a row's first real token (left padding of a fresh cache): the conv then reads zeros
        where a row alone would read its zero prefix, and the state is still zero when the mitigations'
        decay-only terms act. ``sequence_axis``: inside ``shard_map`` with the sequence split over that mesh
        axis, the conv reads the previous shard's last columns and the SSD state passes between shards
        (:mod:`ssm_jax.parallel.sequence`).
        """
        cfg = self.config
        impl = impl or cfg.ssd_impl
        if sequence_axis is not None:
            if cache is not None or valid is not None:
                raise ValueError("`cache` / `valid` (streaming, padding) and `sequence_axis` (sequence sharding) cannot be combined")
            if cfg.D_has_hdim:
                raise ValueError("sequence sharding (`sequence_axis`) does not support D_has_hdim=True models")
            from ssm_jax.parallel import sequence as sequence_parallel

            return sequence_parallel.mixer_in_shard(self, u, segment_ids, mitigation, impl, sequence_axis), None
        z, xBC_raw, dt_raw = self.project(u)
        if valid is not None:
            xBC_raw = jnp.where(valid[..., None], xBC_raw, jnp.zeros((), xBC_raw.dtype))
        conv_prefix = None if cache is None else jnp.swapaxes(cache.conv_state[:, :, 1:], 1, 2)
        padded_doc = doc_with_prefix(document_ids(segment_ids, u.shape[:2]), cfg.d_conv)
        inputs = self.ssm_inputs_from_projection(z, xBC_raw, dt_raw, conv_prefix=conv_prefix, padded_doc=padded_doc)
        if valid is not None:
            inputs = dataclasses.replace(inputs, dt=jnp.where(valid[..., None], inputs.dt, 0.0))
        window = None if mitigation is None else mitigation.window
        if self.capture_ssm_inputs:
            self._sow_ssm_inputs(inputs, mitigation)

        if cache is not None and window is not None:
            y, ssm_state, new_window = _windowed_stream_ssd(inputs, self.head_skip(), cache, mitigation, segment_ids, cfg, impl)
        else:
            y, ssm_state = ssd(
                inputs.x,
                inputs.dt,
                inputs.A,
                inputs.B,
                inputs.C,
                D=self.head_skip(),
                chunk_size=cfg.chunk_size,
                initial_state=None if cache is None else cache.ssm_state,
                segment_ids=segment_ids,
                mitigation=mitigation,
                impl=_streaming_impl(impl, mitigation, cache, cfg, u.shape[1]),
            )
            new_window = None
        if cfg.D_has_hdim:  # per-channel skip, added here since ssd takes one D per head
            skip = self.D[...].astype(jnp.float32).reshape(cfg.nheads, cfg.headdim)
            y = (y.astype(jnp.float32) + skip * inputs.x.astype(jnp.float32)).astype(y.dtype)
        out = self.output(y, inputs.z)
        if cache is None:
            return out, None
        all_raw = jnp.concatenate([jnp.swapaxes(cache.conv_state, 1, 2), xBC_raw.astype(cache.conv_state.dtype)], axis=1)
        conv_state = jnp.swapaxes(all_raw[:, -cfg.d_conv :], 1, 2)
        return out, MixerCache(conv_state=conv_state, ssm_state=ssm_state.astype(jnp.float32), window=new_window)

    def _sow_ssm_inputs(self, inputs: SSMInputs, mitigation) -> None:
        from ssm_jax.ssd import input_weight_and_log_decay

        dt_in, log_a = input_weight_and_log_decay(inputs.dt, inputs.A, mitigation, jnp.float32)
        self.sow(nnx.Intermediate, "captured_ssm_inputs", dict(dt=inputs.dt, log_a=log_a, B=inputs.B, x=inputs.x))


def _streaming_impl(impl: str, mitigation: Optional[mitigations_lib.Mitigation], cache, cfg: Mamba2Config, seqlen: int) -> str:
    """The SSD implementation of a cached (streaming or decoding) call of ``seqlen`` tokens.

    * State normalisation is per step in streaming (exact), so cached calls with it run the recurrence: the
      "stepwise" kernel (time loop inside one Pallas kernel) where the chunked kernels would run on a GPU or
      when asked for explicitly, else the ``lax.scan`` ("recurrent").
    * One token ("auto"): the recurrence, a single state update ``h <- exp(dt A) h + dt x B^T``,
      ``y = h C + D x`` that XLA fuses, instead of a chunked kernel padded to a whole chunk for one position.
    * Otherwise ``impl`` as given.
    """
    if cache is not None and mitigation is not None and mitigation.max_norm is not None:
        if impl == "stepwise":
            return impl
        resolved = resolve_impl(impl, headdim=cfg.headdim, state=cfg.d_state, chunk_size=cfg.chunk_size)
        return "stepwise" if resolved == "pallas" and jax.default_backend() == "gpu" else "recurrent"
    if cache is not None and seqlen == 1 and impl == "auto":
        return "recurrent"
    return impl


def _windowed_stream_ssd(inputs: SSMInputs, D: Optional[Array], cache: MixerCache, mitigation, segment_ids, cfg: Mamba2Config, impl: str):
    """Sliding-window SSD over ``[last window-1 inputs ; this chunk]``: exact and O(window) memory.

    Returns the chunk's output, the windowed state after it (what diagnostics see as the SSM state) and
    the new input window.
    """
    window = mitigation.window
    b, l = inputs.x.shape[:2]
    keep = window - 1
    if cache.window is None:
        prev_x = jnp.zeros((b, keep) + inputs.x.shape[2:], inputs.x.dtype)
        prev_dt = jnp.zeros((b, keep, cfg.nheads), jnp.float32)
        prev_B = jnp.zeros((b, keep) + inputs.B.shape[2:], inputs.B.dtype)
    else:
        prev_x, prev_dt, prev_B = cache.window
        if prev_x.shape[1] != keep:
            raise ValueError(
                f"the cache holds a window of {prev_x.shape[1] + 1} tokens but mitigation.window = {window}; "
                "start a new cache when changing the window"
            )
    x = jnp.concatenate([prev_x.astype(inputs.x.dtype), inputs.x], axis=1)
    dt = jnp.concatenate([prev_dt, inputs.dt], axis=1)
    B = jnp.concatenate([prev_B.astype(inputs.B.dtype), inputs.B], axis=1)
    C = jnp.concatenate([jnp.zeros_like(prev_B, dtype=inputs.C.dtype), inputs.C], axis=1)
    seg = None
    if segment_ids is not None:
        seg = jnp.concatenate([jnp.broadcast_to(segment_ids[:, :1], (b, keep)), segment_ids], axis=1)
    y, windowed_state = ssd(x, dt, inputs.A, B, C, D=D, chunk_size=cfg.chunk_size, segment_ids=seg, mitigation=mitigation, impl=impl)
    if seg is not None:
        # Inputs of earlier documents must not be read again once a reset passed: zero their weight.
        last_doc = document_ids(seg, seg.shape)[:, -keep:] if keep else None
        if keep:
            dt = dt.at[:, -keep:].set(jnp.where((last_doc == last_doc[:, -1:])[..., None], dt[:, -keep:], 0.0))
    new_window = (x[:, -keep:], dt[:, -keep:], B[:, -keep:]) if keep else (x[:, :0], dt[:, :0], B[:, :0])
    return y[:, keep:], windowed_state, new_window


def _scaled(init, factor: float):
    def scaled(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) * factor

    return scaled


class Mamba2Block(nnx.Module):
    """Pre-norm residual block: ``residual += mixer(rms_norm(residual))`` with a float32 residual."""

    def __init__(self, config: Mamba2Config, *, layer_idx: int = 0, rngs: nnx.Rngs):
        self.config = config
        self.norm_weight = nnx.Param(jnp.ones((config.d_model,), config.jnp_param_dtype))
        self.mixer = Mamba2Mixer(config, layer_idx=layer_idx, rngs=rngs)

    def __call__(self, residual: Array, *, cache=None, segment_ids=None, valid=None, mitigation=None, impl=None, sequence_axis=None):
        cfg = self.config
        hidden = rms_norm(residual, self.norm_weight[...], cfg.norm_eps, cfg.jnp_dtype)
        out, cache = self.mixer(
            hidden, cache=cache, segment_ids=segment_ids, valid=valid, mitigation=mitigation, impl=impl, sequence_axis=sequence_axis
        )
        residual_dtype = jnp.float32 if cfg.residual_in_fp32 else cfg.jnp_dtype
        return residual.astype(residual_dtype) + out.astype(residual_dtype), cache


class Mamba2LM(nnx.Module):
    """Mamba-2 language model: embedding, ``n_layer`` blocks, final RMSNorm, (tied) LM head.

    ``model(input_ids) -> logits (batch, seqlen, padded_vocab_size)`` (the vocabulary is padded to a
    multiple of ``pad_vocab_size_multiple``, as in the public checkpoints).
    """

    def __init__(self, config: Mamba2Config, *, rngs: nnx.Rngs):
        self.config = config
        pdt = config.jnp_param_dtype
        self.embedding = nnx.Param((0.02 * jax.random.normal(rngs.params(), (config.padded_vocab_size, config.d_model), jnp.float32)).astype(pdt))
        self.layers = nnx.List([Mamba2Block(config, layer_idx=i, rngs=rngs) for i in range(config.n_layer)])
        self.norm_f_weight = nnx.Param(jnp.ones((config.d_model,), pdt))
        if not config.tie_embeddings:
            self.lm_head = nnx.Param((0.02 * jax.random.normal(rngs.params(), (config.padded_vocab_size, config.d_model))).astype(pdt))

    def init_cache(self, batch_size: int) -> List[MixerCache]:
        return [block.mixer.init_cache(batch_size) for block in self.layers]

    def hidden_states(
        self,
        input_ids: Array,
        *,
        cache: Optional[Sequence[MixerCache]] = None,
        segment_ids: Optional[Array] = None,
        valid: Optional[Array] = None,
        mitigation: Optional[mitigations_lib.Mitigation] = None,
        impl: Optional[str] = None,
        sequence_axis: Optional[str] = None,
    ) -> Tuple[Array, Optional[List[MixerCache]]]:
        """Final-normed hidden states ``(batch, seqlen, d_model)`` and the new cache (when one is given).

        ``valid (batch, seqlen)`` bool marks real tokens; False positions are left padding that leaves every
        layer's state untouched (:meth:`Mamba2Mixer.__call__`); their outputs are meaningless.
        ``sequence_axis`` names the mesh axis the sequence is split over when called inside ``shard_map``.
        """
        cfg = self.config
        _check_input_ids(input_ids, cfg)
        _check_valid(valid, input_ids.shape)
        mitigation = mitigations_lib.resolve(mitigation)
        if cache is not None and len(cache) != cfg.n_layer:
            raise ValueError(f"`cache` has {len(cache)} layers, the model has {cfg.n_layer}")
        residual = jnp.take(self.embedding[...], input_ids, axis=0).astype(cfg.jnp_dtype)
        new_cache = []
        for i, block in enumerate(self.layers):
            layer_mitigation = None if mitigation is None else mitigation.for_layer(i)
            layer_cache = None if cache is None else cache[i]
            call = _block_call(cfg.remat)
            residual, layer_cache = call(block, residual, layer_cache, segment_ids, valid, layer_mitigation, impl, sequence_axis)
            new_cache.append(layer_cache)
        hidden = rms_norm(residual, self.norm_f_weight[...], cfg.norm_eps, cfg.jnp_dtype)
        return hidden, (new_cache if cache is not None else None)

    def logits_from_hidden(self, hidden: Array) -> Array:
        head = self.embedding[...] if self.config.tie_embeddings else self.lm_head[...]
        return jnp.einsum("bld,vd->blv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: Array,
        *,
        segment_ids: Optional[Array] = None,
        valid: Optional[Array] = None,
        mitigation: Optional[mitigations_lib.Mitigation] = None,
        impl: Optional[str] = None,
        sequence_axis: Optional[str] = None,
    ) -> Array:
        """``input_ids (batch, seqlen) -> logits (batch, seqlen, padded_vocab_size)`` in float32."""
        hidden, _ = self.hidden_states(
            input_ids,
            segment_ids=segment_ids,
            valid=valid,
            mitigation=mitigation,
            impl=impl,
            sequence_axis=sequence_axis,
        )
        return self.logits_from_hidden(hidden)

    def forward_with_cache(
        self,
        input_ids: Array,
        cache: Sequence[MixerCache],
        *,
        segment_ids: Optional[Array] = None,
        valid: Optional[Array] = None,
        mitigation: Optional[mitigations_lib.Mitigation] = None,
        impl: Optional[str] = None,
    ) -> Tuple[Array, List[MixerCache]]:
        """Continues from ``cache``: returns the logits of ``input_ids`` and the cache after them."""
        hidden, new_cache = self.hidden_states(input_ids, cache=cache, segment_ids=segment_ids, valid=valid, mitigation=mitigation, impl=impl)
        return self.logits_from_hidden(hidden), new_cache


def _call_block(block, residual, cache, segment_ids, valid, mitigation, impl, sequence_axis):
    return block(residual, cache=cache, segment_ids=segment_ids, valid=valid, mitigation=mitigation, impl=impl, sequence_axis=sequence_axis)


@functools.lru_cache(maxsize=None)
def _block_call(remat: str):
    """The block call for a remat policy name: plain, or wrapped in ``nnx.remat`` with that policy."""
    if remat == "none":
        return _call_block
    return nnx.remat(_call_block, static_argnums=(6, 7), policy=REMAT_POLICIES[remat])


def _check_valid(valid: Any, shape: Tuple[int, ...]) -> None:
    if valid is None:
        return
    if getattr(valid, "shape", None) != tuple(shape) or getattr(valid, "dtype", None) != jnp.bool_:
        raise ValueError(
            f"`valid` must be a bool array shaped like input_ids {tuple(shape)}, got "
            f"{getattr(valid, 'dtype', type(valid).__name__)} {getattr(valid, 'shape', '')}"
        )


def _check_input_ids(input_ids: Any, cfg: Mamba2Config) -> None:
    if getattr(input_ids, "ndim", None) != 2:
        raise ValueError(f"`input_ids` must be (batch, seqlen), got shape {getattr(input_ids, 'shape', None)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"`input_ids` must be integers, got dtype {input_ids.dtype}")
