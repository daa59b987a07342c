"""Training: state, loss, the (sharded, accumulating, NaN-guarded) train step, evaluation and the loop.

Entry point: :func:`train_and_evaluate` (called by ``train.py``). Evaluation code loads a trained model
with :func:`load_model_from_workdir`. The step functions (:func:`make_train_step`, :func:`make_eval_step`,
:func:`init_train_state`) import only jax / flax / optax and can be used without grain or ml_collections
(``benchmarks/train_throughput.py`` does); the data pipelines, orbax and the config library are
imported inside the functions that need them.

The training state (:class:`TrainState`) holds the parameters as the pure dict of ``nnx.split(model)``
(float32 master weights when ``param_dtype="float32"``; the model computes in ``dtype``), the optax
state, the step, an RNG key, the number of skipped (non-finite) steps and, with truncated BPTT, the
carry: per layer the final conv and SSM state of every batch row, fed into the next step when the row
continues the same stream (``is_continuation``) and zeroed otherwise, with ``stop_gradient`` between
steps.

The loss is the next-token cross-entropy in float32, averaged over the targets where ``loss_mask`` is 1;
the logits of padded vocabulary entries (ids >= ``vocab_size``) are masked out of the softmax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssm_jax.loading import load_model_from_workdir  # re-exported: loading lives next to checkpoint / convert
from ssm_jax.model import Mamba2Config, Mamba2LM, MixerCache
from ssm_jax.parallel import mesh as mesh_lib

__all__ = [
    "TrainState",
    "init_train_state",
    "abstract_model",
    "token_loss_sums",
    "lm_loss_sums",
    "make_train_step",
    "make_eval_step",
    "state_shardings",
    "train_and_evaluate",
    "load_model_from_workdir",
    "model_flops_per_token",
    "ConfigChangeError",
]

Array = jax.Array
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree)."""

    step: Array  # int32 (): steps done (including skipped ones)
    params: Any  # pure dict of the model's nnx state
    opt_state: Any
    rng: Array  # uint32 (2,): a raw PRNG key
    num_skipped: Array  # int32 (): steps whose update was not applied (non-finite loss or gradient)
    carry: Optional[List[Dict[str, Array]]] = None  # TBPTT: per layer {"conv_state", "ssm_state"}

    def checkpoint_items(self) -> Tuple[Any, Dict[str, Any]]:
        """``(params, rest)``: the two orbax items of :mod:`ssm_jax.checkpoint`."""
        rest = {"step": self.step, "opt_state": self.opt_state, "rng": self.rng, "num_skipped": self.num_skipped}
        if self.carry is not None:
            rest["carry"] = self.carry
        return self.params, rest

    @classmethod
    def from_checkpoint_items(cls, params: Any, rest: Dict[str, Any]) -> "TrainState":
        return cls(
            step=rest["step"], params=params, opt_state=rest["opt_state"], rng=rest["rng"], num_skipped=rest["num_skipped"], carry=rest.get("carry")
        )


def abstract_model(config: Mamba2Config) -> Tuple[Any, Any]:
    """``(graphdef, abstract pure-dict params)`` of a model, without allocating it."""
    model = nnx.eval_shape(lambda: Mamba2LM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def zero_carry(config: Mamba2Config, batch_size: int) -> List[Dict[str, Array]]:
    """The TBPTT carry of a fresh stream: zero conv and SSM states for ``batch_size`` rows."""
    return [
        {
            "conv_state": jnp.zeros((batch_size, config.conv_dim, config.d_conv), config.jnp_dtype),
            "ssm_state": jnp.zeros((batch_size, config.nheads, config.headdim, config.d_state), jnp.float32),
        }
        for _ in range(config.n_layer)
    ]


def init_train_state(
    config: Mamba2Config,
    optimizer: optax.GradientTransformation,
    rng: Array,
    *,
    carry_batch: Optional[int] = None,
) -> TrainState:
    """A fresh state: parameters initialised from ``rng``; a zero carry of ``carry_batch`` rows if given."""
    init_key, train_key = jax.random.split(rng)
    model = Mamba2LM(config, rngs=nnx.Rngs(params=init_key))
    params = nnx.to_pure_dict(nnx.split(model)[1])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=train_key,
        num_skipped=jnp.zeros((), jnp.int32),
        carry=None if carry_batch is None else zero_carry(config, carry_batch),
    )


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES, *, min_fsdp_size: int = 2**12) -> TrainState:
    """Shardings of a :class:`TrainState`: partition rules for params and optimiser state, the carry split
    over the batch axes, scalars replicated."""
    repl = mesh_lib.replicated(mesh)
    carry = None
    if abstract_state.carry is not None:
        carry = jax.tree.map(lambda x: mesh_lib.batch_sharding(mesh, x.ndim), abstract_state.carry)
    return TrainState(
        step=repl,
        params=mesh_lib.tree_shardings(abstract_state.params, mesh, rules, min_fsdp_size=min_fsdp_size),
        opt_state=mesh_lib.tree_shardings(abstract_state.opt_state, mesh, rules, min_fsdp_size=min_fsdp_size),
        rng=repl,
        num_skipped=repl,
        carry=carry,
    )


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def token_loss_sums(logits: Array, targets: Array, loss_mask: Array, vocab_size: int) -> Tuple[Array, Array, Array]:
    """``(sum of masked cross-entropy, sum of mask, masked count of correct argmax)`` in float32.

    Logits of ids ``>= vocab_size`` (vocabulary padding) are excluded from the softmax.
    """
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] > vocab_size:
        valid = jnp.arange(logits.shape[-1]) < vocab_size
        logits = jnp.where(valid, logits, -1e30)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum((log_z - picked) * mask), jnp.sum(mask), jnp.sum(correct * mask)


def _head(model: Mamba2LM) -> Array:
    return model.embedding[...] if model.config.tie_embeddings else model.lm_head[...]


def lm_loss_sums(head: Array, hidden: Array, targets: Array, loss_mask: Array, *, vocab_size: int, chunk_size: int = 0):
    """:func:`token_loss_sums` of the logits ``hidden @ head.T`` (float32 accumulation, as
    ``Mamba2LM.logits_from_hidden``) for ``hidden (b, l, d)`` and ``head (padded_vocab, d)``.

    With ``chunk_size > 0`` the logits are built ``chunk_size`` positions at a time inside a
    rematerialised scan, so the ``(b, l, vocab)`` float32 logits never exist at once (forward or backward).
    """
    l = hidden.shape[1]

    def piece(h, t, m):
        logits = jnp.einsum("bld,vd->blv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        return token_loss_sums(logits, t, m, vocab_size)

    if chunk_size <= 0 or chunk_size >= l:
        return piece(hidden, targets, loss_mask)
    piece = jax.checkpoint(piece)
    n_full, rem = divmod(l, chunk_size)

    def split(x):
        main = x[:, : n_full * chunk_size]
        return jnp.moveaxis(main.reshape((x.shape[0], n_full, chunk_size) + x.shape[2:]), 1, 0)

    def body(acc, xs):
        out = piece(*xs)
        return tuple(a + o for a, o in zip(acc, out)), None

    zero = jnp.zeros((), jnp.float32)
    acc, _ = jax.lax.scan(body, (zero, zero, zero), (split(hidden), split(targets), split(loss_mask)))
    if rem:
        tail = piece(hidden[:, n_full * chunk_size :], targets[:, n_full * chunk_size :], loss_mask[:, n_full * chunk_size :])
        acc = tuple(a + t for a, t in zip(acc, tail))
    return acc


def _model_loss_sums(model: Mamba2LM, hidden, targets, loss_mask, chunk_size: int):
    return lm_loss_sums(_head(model), hidden, targets, loss_mask, vocab_size=model.config.vocab_size, chunk_size=chunk_size)


def _carry_to_cache(carry, keep: Array) -> List[MixerCache]:
    """Cache for the model: the carried states of rows that continue their stream, zeros elsewhere."""
    caches = []
    for layer in carry:
        conv = jax.lax.stop_gradient(layer["conv_state"])
        ssm = jax.lax.stop_gradient(layer["ssm_state"])
        caches.append(
            MixerCache(
                conv_state=jnp.where(keep[:, None, None], conv, jnp.zeros_like(conv)),
                ssm_state=jnp.where(keep[:, None, None, None], ssm, jnp.zeros_like(ssm)),
            )
        )
    return caches


def _cache_to_carry(cache: List[MixerCache]):
    return [{"conv_state": c.conv_state, "ssm_state": c.ssm_state} for c in cache]


def _forward_loss_sums(
    graphdef,
    params,
    batch,
    carry,
    *,
    use_segment_ids: bool,
    impl: Optional[str],
    loss_chunk_size: int,
    mesh: Optional[Mesh] = None,
):
    """``((loss_sum, count, correct), new_carry)`` of one (micro-)batch."""
    seq_parallel = mesh is not None and mesh.shape.get("seq", 1) > 1
    if seq_parallel:
        return _sequence_parallel_loss_sums(
            graphdef, params, batch, use_segment_ids=use_segment_ids, impl=impl, loss_chunk_size=loss_chunk_size, mesh=mesh
        ), None
    model = nnx.merge(graphdef, params)
    cache = None
    if carry is not None:
        cache = _carry_to_cache(carry, batch["is_continuation"].astype(bool))
    segment_ids = batch["segment_ids"] if use_segment_ids else None
    hidden, new_cache = model.hidden_states(batch["inputs"], cache=cache, segment_ids=segment_ids, impl=impl)
    sums = _model_loss_sums(model, hidden, batch["targets"], batch["loss_mask"], loss_chunk_size)
    return sums, (None if new_cache is None else _cache_to_carry(new_cache))


def _sequence_parallel_loss_sums(graphdef, params, batch, *, use_segment_ids, impl, loss_chunk_size, mesh):
    """Loss sums with the sequence split over mesh axis "seq" (:mod:`ssm_jax.parallel.sequence`)."""
    tokens_spec = P(mesh_lib.BATCH_AXES, "seq")
    keys = ["inputs", "targets", "loss_mask"] + (["segment_ids"] if use_segment_ids else [])
    seq = {k: batch[k] for k in keys}
    reduce_axes = ("seq",) + mesh_lib.BATCH_AXES

    def body(params, seq):
        model = nnx.merge(graphdef, params)
        hidden, _ = model.hidden_states(seq["inputs"], segment_ids=seq.get("segment_ids"), impl=impl, sequence_axis="seq")
        sums = _model_loss_sums(model, hidden, seq["targets"], seq["loss_mask"], loss_chunk_size)
        return tuple(jax.lax.psum(s, reduce_axes) for s in sums)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(), {k: tokens_spec for k in seq}), out_specs=(P(), P(), P()))(params, seq)


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def _split_micro(x: Array, n: int) -> Array:
    """``(B, ...) -> (n, B / n, ...)``; micro-batch ``i`` holds rows ``i, i + n, ...`` (keeps the batch
    sharding local: each device's contiguous block of rows holds whole groups of ``n``)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)


def _merge_micro(x: Array) -> Array:
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def make_train_step(
    graphdef,
    optimizer: optax.GradientTransformation,
    *,
    schedule: Optional[Callable[[Any], Array]] = None,
    grad_accum_steps: int = 1,
    use_segment_ids: bool = True,
    impl: Optional[str] = None,
    loss_chunk_size: int = 0,
    mesh: Optional[Mesh] = None,
) -> Callable[[TrainState, Dict[str, Array]], Tuple[TrainState, Dict[str, Array]]]:
    """The pure training step ``(state, batch) -> (state, metrics)`` (wrap it in ``jax.jit``).

    ``batch``: the pipeline dict (``inputs``, ``targets``, ``segment_ids``, ``loss_mask``,
    ``is_continuation``) of the global batch. With ``grad_accum_steps = n`` the batch is cut into ``n``
    micro-batches (a ``lax.scan``) whose gradients of ``sum(loss) / total targets`` are summed: the
    update is that of the whole batch. The TBPTT carry is used when ``state.carry`` is not None.
    A step whose loss or gradient norm is not finite is not applied: parameters and optimiser state stay,
    the carry is reset, ``num_skipped`` grows and ``metrics["skipped"]`` is 1 (the loop then skips or stops).
    ``mesh`` with a "seq" axis > 1: sequence-parallel forward (no carry).
    """

    def loss_for_grad(params, mb, carry, denom):
        sums, new_carry = _forward_loss_sums(
            graphdef,
            params,
            mb,
            carry,
            use_segment_ids=use_segment_ids,
            impl=impl,
            loss_chunk_size=loss_chunk_size,
            mesh=mesh,
        )
        return sums[0] / denom, (sums, new_carry)

    grad_fn = jax.value_and_grad(loss_for_grad, has_aux=True)

    def train_step(state: TrainState, batch: Dict[str, Array]):
        denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if grad_accum_steps == 1:
            (_, (sums, new_carry)), grads = grad_fn(state.params, batch, state.carry, denom)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, grad_accum_steps), batch)
            micro_carry = None if state.carry is None else jax.tree.map(lambda x: _split_micro(x, grad_accum_steps), state.carry)
            zero_grads = jax.tree.map(jnp.zeros_like, state.params)
            zero = jnp.zeros((), jnp.float32)

            def body(acc, xs):
                mb, carry = xs
                (_, (sums, new_carry)), g = grad_fn(state.params, mb, carry, denom)
                acc_g, acc_s = acc
                return (jax.tree.map(jnp.add, acc_g, g), tuple(a + s for a, s in zip(acc_s, sums))), new_carry

            (grads, sums), new_carry = jax.lax.scan(body, (zero_grads, (zero, zero, zero)), (micro, micro_carry))
            if new_carry is not None:
                new_carry = jax.tree.map(_merge_micro, new_carry)
        loss_sum, count, correct = sums
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        def select(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        carry = None
        if new_carry is not None:
            carry = jax.tree.map(lambda c: jnp.where(finite, c, jnp.zeros_like(c)), new_carry)
        applied = state.step - state.num_skipped
        rng, _ = jax.random.split(state.rng)
        new_state = TrainState(
            step=state.step + 1,
            params=select(new_params, state.params),
            opt_state=select(new_opt_state, state.opt_state),
            rng=rng,
            num_skipped=state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
            carry=carry,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "accuracy": correct / denom,
            "tokens": count,
            "skipped": jnp.logical_not(finite).astype(jnp.int32),
            "num_skipped": new_state.num_skipped,
            "lr": schedule(applied) if schedule is not None else jnp.zeros((), jnp.float32),
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, *, use_segment_ids: bool = True, impl: Optional[str] = None, loss_chunk_size: int = 0, mesh: Optional[Mesh] = None):
    """``(params, batch, carry) -> ({"loss_sum", "count", "correct"}, new_carry)``; carry may be None."""

    def eval_step(params, batch, carry):
        (loss_sum, count, correct), new_carry = _forward_loss_sums(
            graphdef,
            params,
            batch,
            carry,
            use_segment_ids=use_segment_ids,
            impl=impl,
            loss_chunk_size=loss_chunk_size,
            mesh=mesh,
        )
        return {"loss_sum": loss_sum, "count": count, "correct": correct}, new_carry

    return eval_step


def model_flops_per_token(config: Mamba2Config, seq_len: int, *, training: bool = True) -> float:
    """Model FLOPs per token (matmul-like work, 2 per multiply-add), x3 for forward + backward.

    Counts the in/out projections, the depthwise conv, the chunked SSD (intra-chunk ``C B^T`` and its
    product with ``x``, chunk states, inter-chunk output) and the LM head; ignores elementwise work.
    """
    c = config
    q = min(c.chunk_size, seq_len)
    per_layer = (
        2 * c.d_model * c.d_in_proj
        + 2 * c.d_inner * c.d_model
        + 2 * c.conv_dim * c.d_conv
        + 2 * q * c.ngroups * c.d_state  # C B^T within the chunk
        + 2 * q * c.nheads * c.headdim  # (C B^T o L) x
        + 4 * c.nheads * c.headdim * c.d_state  # chunk states + inter-chunk output
    )
    forward = c.n_layer * per_layer + 2 * c.d_model * c.padded_vocab_size
    return float(forward * (3 if training else 1))


# --------------------------------------------------------------------------------------------------
# Data plumbing (grain imported lazily)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Data:
    tokenizer: Any
    train: Any  # grain IterDataset (per-process batches)
    make_validation: Callable[[], Any]  # -> iterable of per-process batches
    validation_tokens: Optional[List[np.ndarray]] = None  # corpus modes: held-out documents' token ids


def _load_documents(config):
    from ssm_jax import data as data_lib

    d = config.data
    if d.corpus == "local":
        return (
            data_lib.load_local_corpus(d.local_data_dir, "train", d.local_name),
            data_lib.load_local_corpus(d.local_data_dir, "validation", d.local_name),
        )
    docs = data_lib.load_corpus(d.corpus)
    return data_lib.split_documents(docs, d.validation_fraction, d.split_seed)


def _build_data(config, shard_index: int, shard_count: int, tokenizer_name: str) -> _Data:
    from ssm_jax import data as data_lib

    d = config.data
    tokenizer = data_lib.get_tokenizer(tokenizer_name)
    local_batch = config.train.batch_size // shard_count
    eval_batch = (config.eval.batch_size or config.train.batch_size) // shard_count
    common = dict(num_threads=d.num_threads, prefetch_buffer_size=d.prefetch_buffer_size, shard_index=shard_index, shard_count=shard_count)
    if d.mode == "passkey":
        kw = dict(seq_len=d.seq_len, min_context_tokens=d.passkey_min_context, max_context_tokens=d.passkey_max_context or None)
        train = data_lib.make_passkey_dataset(tokenizer, batch_size=local_batch, seed=config.seed, **kw, **common)
        n_val = max(config.eval.num_batches, 1) * (config.eval.batch_size or config.train.batch_size)

        def make_validation():
            return data_lib.make_passkey_dataset(tokenizer, batch_size=eval_batch, seed=config.seed + 1_000_003, num_examples=n_val, **kw, **common)
    elif d.corpus == "tokens":
        corpus = data_lib.TokenCorpus(d.tokens_dir)
        if corpus.tokenizer["name"] != tokenizer.name:
            raise ValueError(f"config.data.tokenizer={d.tokenizer!r}, but {d.tokens_dir} was tokenised with {corpus.tokenizer['name']!r}")
        train_tokens = [doc.tokens for doc in corpus.documents("train")]
        val_tokens = [doc.tokens for doc in corpus.documents("validation")]
        train = data_lib.make_token_dataset(
            train_tokens,
            tokenizer.eos_id,
            mode=d.mode,
            seq_len=d.seq_len,
            batch_size=local_batch,
            seed=config.seed,
            shuffle=d.shuffle,
            num_epochs=None,
            **common,
        )

        def make_validation():
            return data_lib.make_token_dataset(
                val_tokens,
                tokenizer.eos_id,
                mode=d.mode,
                seq_len=d.seq_len,
                batch_size=eval_batch,
                seed=config.seed,
                shuffle=False,
                num_epochs=1,
                **common,
            )

        return _Data(tokenizer=tokenizer, train=train, make_validation=make_validation, validation_tokens=val_tokens)
    else:
        train_docs, val_docs = _load_documents(config)
        train = data_lib.make_dataset(
            train_docs,
            tokenizer,
            mode=d.mode,
            seq_len=d.seq_len,
            batch_size=local_batch,
            seed=config.seed,
            shuffle=d.shuffle,
            num_epochs=None,
            **common,
        )

        def make_validation():
            return data_lib.make_dataset(
                val_docs, tokenizer, mode=d.mode, seq_len=d.seq_len, batch_size=eval_batch, seed=config.seed, shuffle=False, num_epochs=1, **common
            )

        return _Data(
            tokenizer=tokenizer,
            train=train,
            make_validation=make_validation,
            validation_tokens=data_lib.iterate_documents_tokens(val_docs, tokenizer),
        )
    return _Data(tokenizer=tokenizer, train=train, make_validation=make_validation)


_BATCH_KEYS = ("inputs", "targets", "segment_ids", "loss_mask", "is_continuation")


def _batch_shardings(mesh: Mesh) -> Dict[str, NamedSharding]:
    """Rows over the batch axes; with a "seq" axis > 1 the token arrays are also split along the sequence."""
    seq = mesh.shape.get("seq", 1) > 1
    token_spec = P(mesh_lib.BATCH_AXES, "seq") if seq else mesh_lib.batch_spec(2)
    return {k: NamedSharding(mesh, mesh_lib.batch_spec(1) if k == "is_continuation" else token_spec) for k in _BATCH_KEYS}


def _global_batch(local: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, Array]:
    """Per-process numpy batch (this process's rows) -> global arrays with :func:`_batch_shardings`."""
    shardings = _batch_shardings(mesh)
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k])) for k in _BATCH_KEYS}


# --------------------------------------------------------------------------------------------------
# Loading trained models
# --------------------------------------------------------------------------------------------------


def _model_config_from_dict(values: Dict[str, Any]) -> Mamba2Config:
    from ssm_jax.train_config import model_config_from

    return model_config_from(values)


def _load_init_params(config, model_cfg: Mamba2Config):
    """``(params, model config, tokenizer name)`` of the ``config.init`` source (params as host arrays)."""
    if config.init.workdir:
        model, src_config = load_model_from_workdir(config.init.workdir, None if config.init.step < 0 else config.init.step)
        tokenizer = src_config["data"]["tokenizer"] if src_config is not None else config.data.tokenizer
    else:
        from ssm_jax.convert import from_pretrained

        model = from_pretrained(config.init.pretrained)
        tokenizer = "neox" if model.config.vocab_size >= 50277 else "byte"
    from ssm_jax.train_config import RUNTIME_MODEL_FIELDS

    # Architecture from the source; numerics / runtime options from this config.
    new_cfg = model.config.replace(**{f: getattr(model_cfg, f) for f in RUNTIME_MODEL_FIELDS})
    params = nnx.to_pure_dict(nnx.split(model)[1])
    params = jax.tree.map(lambda x: np.asarray(x).astype(new_cfg.jnp_param_dtype), params)
    return params, new_cfg, tokenizer


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------


class ConfigChangeError(ValueError):
    """A run resumed with a model config (or tokenizer) other than its checkpoint's."""


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"section.field": value}`` of nested dicts (values as JSON would hold them)."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def _resumed_model_config(config, requested: Mamba2Config, saved: Mamba2Config, saved_config: Dict[str, Any], step: int) -> Mamba2Config:
    """The model config to resume with: the checkpoint's, which ``requested`` (and ``config.data.tokenizer``)
    must equal unless ``config.checkpoint.allow_config_change``; then the requested values of fields that
    leave the parameters' shapes and dtypes unchanged. A fine-tuning run (``config.init``) requests only
    ``RUNTIME_MODEL_FIELDS``: its architecture and tokenizer came from the source. Other settings that changed
    since the checkpoint (``train.num_steps``, ...) apply and are listed in a note.
    """
    from ssm_jax.train_config import RUNTIME_MODEL_FIELDS

    fine_tune = bool(config.init.workdir or config.init.pretrained)
    fields = RUNTIME_MODEL_FIELDS if fine_tune else [f.name for f in dataclasses.fields(Mamba2Config)]
    changed = {f: getattr(requested, f) for f in fields if getattr(requested, f) != getattr(saved, f)}
    rows = [f"config.model.{f}: {getattr(saved, f)!r} in the checkpoint, {v!r} requested" for f, v in changed.items()]
    saved_tokenizer = saved_config.get("data", {}).get("tokenizer", config.data.tokenizer)
    tokenizer_changed = not fine_tune and saved_tokenizer != config.data.tokenizer
    if tokenizer_changed:
        rows.append(f"config.data.tokenizer: {saved_tokenizer!r} in the checkpoint, {config.data.tokenizer!r} requested")
    old = _flatten(saved_config)
    notes = [
        f"{k}: {old[k]!r} -> {v!r}"
        for k, v in _flatten(json.loads(config.to_json_best_effort())).items()
        if k in old and old[k] != v and not k.startswith("model.") and k != "data.tokenizer"
    ]
    if notes:
        _print(f"note: resuming from step {step} with settings changed since that checkpoint: " + "; ".join(notes))
    if not rows:
        return saved
    listing = "\n  ".join(rows)
    if not config.checkpoint.allow_config_change:
        raise ConfigChangeError(
            f"resuming from checkpoint step {step}, whose config differs from the requested one:\n  {listing}\n"
            "Re-run with the checkpoint's values; or add --config.checkpoint.allow_config_change=True to continue "
            "with the requested ones (possible for fields that leave the parameters' shapes and dtypes unchanged); "
            "or train in a new --workdir, starting from this run's weights with --config.init.workdir."
        )

    def layout(cfg: Mamba2Config):
        return jax.tree.map(lambda a: (a.shape, a.dtype), abstract_model(cfg)[1])

    fixed = [f"config.model.{f}" for f in changed if layout(saved.replace(**{f: changed[f]})) != layout(saved)]
    fixed += ["config.data.tokenizer"] * tokenizer_changed
    if fixed:
        raise ConfigChangeError(
            f"resuming from checkpoint step {step}: {', '.join(fixed)} cannot change when resuming, even with "
            f"config.checkpoint.allow_config_change (the checkpoint's parameters would not fit):\n  {listing}\n"
            "Train in a new --workdir instead, starting from this run's weights with --config.init.workdir."
        )
    _print(f"note: resuming from checkpoint step {step} with a changed config (config.checkpoint.allow_config_change=True):\n  {listing}")
    return saved.replace(**changed)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _maybe_initialize_distributed(config) -> None:
    dist = config.distributed
    if not (dist.enabled or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    ids = [int(x) for x in str(dist.local_device_ids).split(",")] if dist.local_device_ids else None
    mesh_lib.initialize_distributed(
        dist.coordinator_address or None,
        dist.num_processes or None,
        None if dist.process_id < 0 else dist.process_id,
        local_device_ids=ids,
        cpu_collectives=dist.cpu_collectives or None,
        num_cpu_devices=dist.num_cpu_devices or None,
    )


def _evaluate(params, eval_fn, data: _Data, mesh: Mesh, *, num_batches: int, carry_fn) -> Dict[str, float]:
    totals = np.zeros(3, np.float64)
    carry = carry_fn()
    for i, local in enumerate(data.make_validation()):
        if num_batches and i >= num_batches:
            break
        sums, carry = eval_fn(params, _global_batch(local, mesh), carry)
        totals += np.array([float(sums["loss_sum"]), float(sums["count"]), float(sums["correct"])])
    loss = totals[0] / max(totals[1], 1.0)
    return {"loss": loss, "bits_per_token": loss / LN2, "accuracy": totals[2] / max(totals[1], 1.0), "tokens": totals[1]}


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Trains the model described by ``config`` in ``workdir``, resuming from its newest checkpoint that restores.

    Resuming never starts over silently: a damaged newest step is moved aside with a warning
    (:meth:`ssm_jax.checkpoint.Checkpointer.restore_newest`), and a model config or tokenizer other than the
    checkpoint's raises :class:`ConfigChangeError` unless ``config.checkpoint.allow_config_change``. A save
    that fails (a full disk) raises :class:`ssm_jax.checkpoint.CheckpointSaveError`.

    Returns a summary: ``{"step", "train_loss", "validation": {loss, bits_per_token, ...}, "wall_time_s",
    "num_skipped"}``. See :mod:`ssm_jax.train_config` for the fields and :mod:`ssm_jax.checkpoint` for
    the workdir layout.
    """
    from ssm_jax import checkpoint as ckpt_lib
    from ssm_jax import optim
    from ssm_jax.metrics_writer import MetricsWriter
    from ssm_jax.train_config import model_config_from, record_model_config, validate_config

    t_start = time.time()
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    validate_config(config)
    _maybe_initialize_distributed(config)
    validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
    workdir = os.path.abspath(workdir)
    process_index, process_count = jax.process_index(), jax.process_count()
    primary = process_index == 0
    os.makedirs(workdir, exist_ok=True)

    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.seq)
    requested_cfg = model_config_from(config.model)
    ckpt = ckpt_lib.Checkpointer(
        ckpt_lib.checkpoint_dir(workdir),
        save_every=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    tbptt = bool(config.train.tbptt)
    batch = config.train.batch_size
    eval_batch = config.eval.batch_size or batch
    num_steps = config.train.num_steps
    o = config.optim
    schedule = optim.make_schedule(
        o.schedule,
        peak_lr=o.lr,
        num_steps=num_steps,
        warmup_steps=o.warmup_steps,
        decay_fraction=o.decay_fraction,
        min_lr_ratio=o.min_lr_ratio,
        decay_shape=o.decay_shape,
    )
    optimizer = optim.make_optimizer(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm)
    rng = jax.random.PRNGKey(config.seed)

    def state_layout(cfg: Mamba2Config):
        """``(init_fn, abstract state, shardings)`` of a training state of the model ``cfg``."""

        def init_fn(key):
            return init_train_state(cfg, optimizer, key, carry_batch=batch if tbptt else None)

        abstract = jax.eval_shape(init_fn, rng)
        return init_fn, abstract, state_shardings(abstract, mesh, min_fsdp_size=config.mesh.min_fsdp_size)

    def restore(step: int):
        """One resume attempt: the step's model, tokenizer, data (iterator at the saved position) and state."""
        meta = ckpt.read_meta(step)
        cfg = _model_config_from_dict(meta["model_config"])
        tokenizer = meta.get("config", {}).get("data", {}).get("tokenizer", config.data.tokenizer)
        data = _build_data(config, process_index, process_count, tokenizer)
        train_iter = iter(data.train)
        _, abstract, shardings = state_layout(cfg)
        abs_params, abs_rest = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings).checkpoint_items()
        params, rest, _ = ckpt.restore(step, abstract_params=abs_params, abstract_train_state=abs_rest, data_iterator=train_iter)
        return meta, cfg, tokenizer, data, train_iter, TrainState.from_checkpoint_items(params, rest)

    resumed = ckpt.restore_newest(restore)
    if resumed is not None:  # the model and tokenizer of the run being resumed, unless changes are allowed
        step, (meta, saved_cfg, tokenizer_name, data, train_iter, state) = resumed
        model_cfg = _resumed_model_config(config, requested_cfg, saved_cfg, meta.get("config", {}), step)
        _, abstract, shardings = state_layout(model_cfg)
        if model_cfg != saved_cfg:  # an allowed change: the parameters keep their dtypes, the carry follows `dtype`
            state = jax.tree.map(lambda x, a: x.astype(a.dtype), state, abstract)
    else:
        model_cfg, tokenizer_name, init_params = requested_cfg, config.data.tokenizer, None
        if config.init.workdir or config.init.pretrained:
            init_params, model_cfg, tokenizer_name = _load_init_params(config, model_cfg)
            if tokenizer_name != config.data.tokenizer:
                _print(
                    f"note: using the {tokenizer_name!r} tokenizer of the model being fine-tuned "
                    f"(config.data.tokenizer was {config.data.tokenizer!r})"
                )
        data = _build_data(config, process_index, process_count, tokenizer_name)
        train_iter = iter(data.train)
        init_fn, abstract, shardings = state_layout(model_cfg)
        state = jax.jit(init_fn, out_shardings=shardings)(rng)
        if init_params is not None:
            params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), init_params, shardings.params)
            state = dataclasses.replace(state, params=params, opt_state=jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params))
    record_model_config(config, model_cfg)
    with config.unlocked() if hasattr(config, "unlocked") else _nullcontext():
        config.data.tokenizer = tokenizer_name
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    graphdef, _ = abstract_model(model_cfg)
    start_step = int(state.step)

    use_segment_ids = config.data.mode == "packed"
    impl = model_cfg.ssd_impl
    batch_shardings = _batch_shardings(mesh)
    step_fn = jax.jit(
        make_train_step(
            graphdef,
            optimizer,
            schedule=schedule,
            grad_accum_steps=config.train.grad_accum_steps,
            use_segment_ids=use_segment_ids,
            impl=impl,
            loss_chunk_size=config.train.loss_chunk_size,
            mesh=mesh,
        ),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    eval_carry_shardings = None
    if tbptt:
        abstract_eval_carry = jax.eval_shape(lambda: zero_carry(model_cfg, eval_batch))
        eval_carry_shardings = jax.tree.map(lambda x: mesh_lib.batch_sharding(mesh, x.ndim), abstract_eval_carry)
    eval_fn = jax.jit(
        make_eval_step(graphdef, use_segment_ids=use_segment_ids, impl=impl, loss_chunk_size=config.train.loss_chunk_size, mesh=mesh),
        in_shardings=(shardings.params, batch_shardings, eval_carry_shardings),
        out_shardings=(None, eval_carry_shardings),
    )
    eval_carry_fn = (lambda: jax.jit(lambda: zero_carry(model_cfg, eval_batch), out_shardings=eval_carry_shardings)()) if tbptt else (lambda: None)

    writer = MetricsWriter(workdir, enabled=primary, tensorboard=config.log.tensorboard)
    tokens_per_step = batch * config.data.seq_len
    meta_base = {"model_config": dataclasses.asdict(model_cfg), "config": json.loads(config.to_json_best_effort()), "process_count": process_count}

    def save(step: int, force: bool = False) -> None:
        params, rest = state.checkpoint_items()
        ckpt.save(
            step, params=params, train_state=rest, data_iterator=train_iter, meta=dict(meta_base, tokens_seen=step * tokens_per_step), force=force
        )

    def run_eval(step: int) -> Dict[str, float]:
        result = _evaluate(state.params, eval_fn, data, mesh, num_batches=config.eval.num_batches, carry_fn=eval_carry_fn)
        writer.write(step, "validation", result)
        if primary:
            _print(
                f"step {step}: validation loss {result['loss']:.4f} nats/token = "
                f"{result['bits_per_token']:.4f} bits/token, accuracy {result['accuracy']:.3f}"
            )
        return result

    progress = None
    if primary and config.train.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=num_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)

    nan_policy = config.train.nan_policy
    log_every = config.train.log_every
    last_train: Dict[str, float] = {}
    pending = None
    t_last, step_last = time.time(), start_step

    def process(step: int, metrics) -> None:
        nonlocal t_last, step_last, last_train
        m = jax.device_get(metrics)
        if int(m["skipped"]):
            msg = (
                f"step {step}: non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}); "
                f"the update was not applied ({int(m['num_skipped'])} skipped so far)"
            )
            if nan_policy == "stop":
                writer.write(step, "train", _train_record(m, 0.0, step * tokens_per_step))
                raise FloatingPointError(msg + " -- stopping (train.nan_policy='stop')")
            _print("WARNING: " + msg)
        if step % log_every == 0 or step == num_steps or int(m["skipped"]):
            now = time.time()
            tps = (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            last_train = _train_record(m, tps, step * tokens_per_step)
            writer.write(step, "train", last_train)
            if progress is not None:
                progress.set_postfix(loss=f"{last_train['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        if progress is not None:
            progress.update(1)

    validation = None
    try:
        for step in range(start_step + 1, num_steps + 1):
            local = next(train_iter)
            state, metrics = step_fn(state, _global_batch(local, mesh))
            if pending is not None:
                process(*pending)
            pending = (step, metrics)
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step < num_steps:
                process(*pending)
                pending = None
                run_eval(step)
            if step < num_steps and step % config.checkpoint.every_steps == 0:
                if pending is not None:  # never checkpoint a state whose step may have to stop the run
                    process(*pending)
                    pending = None
                save(step, force=True)
        if pending is not None:
            process(*pending)
            pending = None
        if progress is not None:
            progress.close()
            progress = None
        final_step = int(state.step)
        validation = run_eval(final_step)
        save(final_step, force=True)
        ckpt.wait()
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()
        writer.close()

    unigram = None
    if primary and data.validation_tokens is not None:
        from ssm_jax.data import unigram_entropy_bits_of_tokens

        unigram = unigram_entropy_bits_of_tokens(data.validation_tokens, data.tokenizer.vocab_size, data.tokenizer.eos_id)
        _print(f"validation unigram entropy: {unigram:.4f} bits/token (a context-free model's loss)")
    if primary and config.log.plot:
        try:
            from ssm_jax.plots import plot_training_curves

            plot_training_curves(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png"), reference_bits=unigram)
        except Exception as e:  # a plot must never fail a finished run
            _print(f"WARNING: could not plot the training curves: {e}")
    summary = {
        "step": int(state.step),
        "train_loss": last_train.get("loss"),
        "validation": validation,
        "num_skipped": int(state.num_skipped),
        "validation_unigram_bits": unigram,
        "wall_time_s": time.time() - t_start,
    }
    if primary:
        _print(f"done: {json.dumps(summary)}")
    return summary


def _train_record(m, tokens_per_s: float, tokens_seen: int) -> Dict[str, float]:
    loss = float(m["loss"])
    return {
        "loss": loss,
        "bits_per_token": loss / LN2,
        "lr": float(m["lr"]),
        "grad_norm": float(m["grad_norm"]),
        "accuracy": float(m["accuracy"]),
        "tokens_per_s": tokens_per_s,
        "skipped": int(m["skipped"]),
        "num_skipped": int(m["num_skipped"]),
        "tokens_seen": int(tokens_seen),
    }


def _print(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
