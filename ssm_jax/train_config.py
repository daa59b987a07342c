"""The training configuration: its fields (:func:`base_config`) and their validation (:func:`validate_config`).

Config files under ``configs/`` start from :func:`base_config` and change what they need; every field can
be overridden on the command line (``--config.model.d_model=256``). Fields:

* ``seed``: parameter initialisation, data order and the training RNG.
* ``model``: the fields of :class:`ssm_jax.model.Mamba2Config` (``dtype`` is the compute dtype,
  ``param_dtype`` the master-weight dtype, each a string, a jnp type or a np.dtype; ``remat`` a
  rematerialisation policy: "none", "full", "dots", or a bool).
* ``data``: ``corpus`` ("shakespeare", "kjv", "tiny", "local": a text corpus prepared with
  :func:`ssm_jax.data.build_local_corpus` under ``local_data_dir`` / ``local_name``, or "tokens": a
  tokenised corpus directory ``tokens_dir`` such as ``python -m ssm_jax.data.linux_corpus`` builds, whose
  ``train`` / ``validation`` splits are read as token ids), ``tokenizer``
  ("byte", "neox"), ``mode`` ("packed": documents packed with segment ids, no state crosses a document
  boundary; "concat": documents joined by EOS and read across; "stream": consecutive windows of
  document streams, for truncated BPTT; "passkey": synthetic passkey fine-tuning examples),
  ``seq_len``, ``validation_fraction`` / ``split_seed`` (held-out documents), ``shuffle``, grain
  ``num_threads`` / ``prefetch_buffer_size``, ``passkey_min_context`` / ``passkey_max_context``
  (0: up to ``seq_len``).
* ``train``: ``batch_size`` (global, in sequences), ``num_steps``, ``grad_accum_steps`` (the batch is split
  into that many micro-batches whose gradients are summed: the update equals the full-batch update),
  ``tbptt`` (carry each row's final conv and SSM state into the next step; needs ``data.mode="stream"``),
  ``nan_policy`` ("skip": a step with a non-finite loss or gradient leaves the parameters and the
  optimiser state unchanged, resets the TBPTT carry, and is counted and reported; "stop": raise
  ``FloatingPointError`` naming the step), ``log_every``, ``loss_chunk_size`` (0: whole sequence;
  otherwise the logits are computed and differentiated in sequence chunks of that length to save
  memory), ``progress_bar``.
* ``optim``: ``lr`` (peak), ``schedule`` ("wsd", "cosine", "constant"), ``warmup_steps``,
  ``decay_fraction`` / ``decay_shape`` (wsd), ``min_lr_ratio``, ``b1``, ``b2``, ``eps``,
  ``weight_decay``, ``clip_norm`` (0 disables clipping).
* ``eval``: ``every_steps`` (0: only at the end), ``num_batches`` (0: the whole validation split),
  ``batch_size`` (0: ``train.batch_size``).
* ``checkpoint``: ``every_steps``, ``max_to_keep``, ``async_save``, ``allow_config_change``. Re-running with the
  same workdir resumes from its newest checkpoint that restores; the model config (and tokenizer) must then
  equal the checkpoint's, else the run stops listing the fields that differ. ``allow_config_change=True``
  continues with the requested values instead, for fields that leave the parameters' shapes and dtypes
  unchanged (``dtype``, ``ssd_impl``, ``remat``, ``chunk_size``, ...).
* ``mesh``: ``data`` (-1: all remaining devices), ``fsdp``, ``seq``, ``min_fsdp_size``.
* ``distributed``: ``enabled``, ``coordinator_address``, ``num_processes`` (0: from the environment),
  ``process_id`` (-1: from the environment), ``local_device_ids`` ("" or "0,1"), ``cpu_collectives``
  ("" or "gloo"), ``num_cpu_devices`` (0: default). Also enabled when ``JAX_COORDINATOR_ADDRESS`` is set.
* ``init``: ``workdir`` (fine-tune from another run's checkpoint; ``step`` -1: its latest) or
  ``pretrained`` (a state-spaces / Hugging Face checkpoint directory, :func:`ssm_jax.from_pretrained`);
  the architecture then comes from that source and only the fields of ``RUNTIME_MODEL_FIELDS`` from
  ``model``. ``required``: fail unless one of them is given.
* ``log``: ``tensorboard``, ``plot`` (loss-curve PNG at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
from typing import Any, List, Optional

from ssm_jax.model import Mamba2Config

__all__ = [
    "DATA_MODES",
    "NAN_POLICIES",
    "CORPORA",
    "RUNTIME_MODEL_FIELDS",
    "base_config",
    "public_size_config",
    "paper_small_config",
    "model_config_from",
    "record_model_config",
    "validate_config",
]

DATA_MODES = ("packed", "concat", "stream", "passkey")
NAN_POLICIES = ("skip", "stop")
CORPORA = ("shakespeare", "kjv", "tiny", "local", "tokens")
_TOKENIZER_VOCAB = {"byte": 257, "neox": 50277}
# The model fields a fine-tuning run takes from its own config; the others come from the init source.
RUNTIME_MODEL_FIELDS = ("dtype", "param_dtype", "ssd_impl", "remat", "chunk_size")


def base_config():
    """All fields with their defaults (a small byte-level model on Shakespeare)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.seed = 0

    model = {f.name: f.default for f in dataclasses.fields(Mamba2Config)}
    model.update(d_model=128, n_layer=2, vocab_size=257, d_state=32, headdim=32, chunk_size=64, dtype="float32")
    # Fields that take several forms (dtypes: a string, jnp.bfloat16 or a np.dtype; remat: a policy name or a
    # bool) hold any object; d_ssm is an optional int. Mamba2Config stores the canonical value, which the
    # training loop writes back (record_model_config), so the saved config stays JSON.
    for name in ("dtype", "param_dtype", "remat"):
        model[name] = ml_collections.FieldReference(model[name], field_type=object)
    model["d_ssm"] = ml_collections.FieldReference(None, field_type=int)
    c.model = ml_collections.ConfigDict(model)

    c.data = ml_collections.ConfigDict(
        dict(
            corpus="shakespeare",
            tokenizer="byte",
            mode="packed",
            seq_len=256,
            validation_fraction=0.1,
            split_seed=0,
            shuffle=True,
            num_threads=2,
            prefetch_buffer_size=8,
            local_data_dir="",
            local_name="default",
            tokens_dir="",
            passkey_min_context=0,
            passkey_max_context=0,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=16,
            num_steps=1000,
            grad_accum_steps=1,
            tbptt=False,
            nan_policy="skip",
            log_every=10,
            loss_chunk_size=0,
            progress_bar=True,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            schedule="wsd",
            warmup_steps=100,
            decay_fraction=0.2,
            decay_shape="linear",
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
        )
    )
    c.eval = ml_collections.ConfigDict(dict(every_steps=200, num_batches=20, batch_size=0))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, max_to_keep=3, async_save=True, allow_config_change=False))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, seq=1, min_fsdp_size=4096))
    c.distributed = ml_collections.ConfigDict(
        dict(
            enabled=False,
            coordinator_address="",
            num_processes=0,
            process_id=-1,
            local_device_ids="",
            cpu_collectives="",
            num_cpu_devices=0,
        )
    )
    c.init = ml_collections.ConfigDict(dict(workdir="", step=-1, pretrained="", required=False))
    c.log = ml_collections.ConfigDict(dict(tensorboard=True, plot=True))
    return c


def public_size_config(*, d_model: int, n_layer: int, lr: float, grad_accum_steps: int, fsdp: bool = False, remat="none"):
    """A Mamba-2 of a public checkpoint's architecture (arXiv 2410.07145 section 1: d_state 128, headdim 64, one group,
    conv 4, chunk 256, GPT-NeoX tokenizer with 50277 ids padded to 50288) with the paper's recipe (section 6):
    AdamW (weight decay 0.1, clip 1.0), warmup-stable-decay, bf16 compute with float32 master weights,
    about 0.5M tokens per batch (256 x 2048), logits computed in chunks of 512 positions.

    The data default is the bundled Shakespeare corpus so that the config runs anywhere; for real training
    prepare a local corpus (``ssm_jax.data.build_local_corpus``, e.g. PG19) and pass
    ``--config.data.corpus=local --config.data.local_data_dir=DIR``. ``fsdp``: shard parameters and
    optimiser state over every device (``mesh.data=1, mesh.fsdp=-1``).
    """
    config = base_config()
    config.model.update(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=50277,
        pad_vocab_size_multiple=16,
        d_state=128,
        headdim=64,
        ngroups=1,
        expand=2,
        d_conv=4,
        chunk_size=256,
        dtype="bfloat16",
        param_dtype="float32",
        remat=remat,
    )
    config.data.update(corpus="shakespeare", tokenizer="neox", mode="packed", seq_len=2048)
    config.train.update(batch_size=256, num_steps=20000, grad_accum_steps=grad_accum_steps, log_every=50, loss_chunk_size=512)
    config.optim.update(
        lr=lr,
        schedule="wsd",
        warmup_steps=1000,
        decay_fraction=0.2,
        decay_shape="sqrt",
        min_lr_ratio=0.0,
        weight_decay=0.1,
        clip_norm=1.0,
        b1=0.9,
        b2=0.95,
    )
    config.eval.update(every_steps=1000, num_batches=50, batch_size=32)
    config.checkpoint.update(every_steps=1000, max_to_keep=3, async_save=True)
    if fsdp:
        config.mesh.update(data=1, fsdp=-1)
    return config


def paper_small_config(*, d_model: int, n_layer: int, lr: float = 1.5e-3):
    """The paper's small from-scratch models (arXiv 2410.07145 section 5): ``d_model / 32`` heads of dim 64 (expand 2),
    d_state 128, GPT-NeoX vocabulary (tied embedding), trained at ``seq_len`` = T_train (2048 here; the
    state-capacity study sweeps it: ``--config.data.seq_len=...``), 0.5M tokens per batch."""
    config = public_size_config(d_model=d_model, n_layer=n_layer, lr=lr, grad_accum_steps=4)
    config.train.update(num_steps=10000)
    config.optim.update(warmup_steps=500)
    return config


def model_config_from(model_cfg: Any) -> Mamba2Config:
    """``Mamba2Config`` from ``config.model`` (a ConfigDict or a mapping); lists become tuples."""
    values = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    names = {f.name for f in dataclasses.fields(Mamba2Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config.model has unknown fields {unknown}; known: {sorted(names)}")
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return Mamba2Config(**values)


def record_model_config(config: Any, model_cfg: Mamba2Config) -> None:
    """Writes ``model_cfg``'s canonical values (dtype names, the remat policy name) into ``config.model``, so the
    config says what is trained and stays JSON; any field type is replaced (``jnp.bfloat16`` by "bfloat16")."""
    unlocked = config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext()
    any_type = config.model.ignore_type() if hasattr(config.model, "ignore_type") else contextlib.nullcontext()
    with unlocked, any_type:
        for k, v in dataclasses.asdict(model_cfg).items():
            config.model[k] = v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_config(config: Any, *, num_devices: Optional[int] = None, process_count: Optional[int] = None) -> None:
    """Raises ``ValueError`` listing every invalid field as ``config.<section>.<field>=<value>: <why>``.

    With ``num_devices`` / ``process_count`` (known once JAX is up) it also checks the mesh and that the
    batch splits over processes, data-parallel devices and micro-batches.
    """
    errors: List[str] = []

    def bad(path: str, value: Any, why: str) -> None:
        errors.append(f"config.{path}={value!r}: {why}")

    def need_int(path: str, value: Any, minimum: int) -> bool:
        if not _is_int(value) or value < minimum:
            bad(path, value, f"must be an integer >= {minimum}")
            return False
        return True

    def need_choice(path: str, value: Any, choices) -> bool:
        if value not in choices:
            bad(path, value, f"must be one of {', '.join(map(str, choices))}")
            return False
        return True

    # ---- model
    try:
        model_cfg = model_config_from(config.model)
    except (ValueError, TypeError) as e:
        model_cfg = None
        msg = str(e).replace("Mamba2Config.", "config.model.").replace("Mamba2Config:", "config.model:")
        errors.append(msg if "config.model" in msg else f"config.model: {msg}")
    # ---- data
    d = config.data
    need_choice("data.corpus", d.corpus, CORPORA)
    if d.corpus == "local" and not d.local_data_dir:
        bad("data.local_data_dir", d.local_data_dir, "must name the prepared corpus directory when data.corpus='local'")
    if d.corpus == "tokens" and not d.tokens_dir:
        bad("data.tokens_dir", d.tokens_dir, "must name a token corpus directory (manifest.json) when data.corpus='tokens'")
    if d.corpus == "tokens" and d.mode == "passkey":
        bad("data.mode", d.mode, "is not available with data.corpus='tokens' (use packed, concat or stream)")
    if need_choice("data.tokenizer", d.tokenizer, tuple(_TOKENIZER_VOCAB)) and model_cfg is not None:
        if not (config.init.workdir or config.init.pretrained) and model_cfg.vocab_size < _TOKENIZER_VOCAB[d.tokenizer]:
            bad(
                "model.vocab_size",
                model_cfg.vocab_size,
                f"is smaller than the {d.tokenizer!r} tokenizer's vocabulary ({_TOKENIZER_VOCAB[d.tokenizer]})",
            )
    need_choice("data.mode", d.mode, DATA_MODES)
    need_int("data.seq_len", d.seq_len, 1)
    if not (_is_num(d.validation_fraction) and 0.0 < d.validation_fraction < 1.0) and d.mode != "passkey":
        bad("data.validation_fraction", d.validation_fraction, "must be in (0, 1)")
    need_int("data.num_threads", d.num_threads, 0)
    need_int("data.prefetch_buffer_size", d.prefetch_buffer_size, 0)
    need_int("data.passkey_min_context", d.passkey_min_context, 0)
    need_int("data.passkey_max_context", d.passkey_max_context, 0)
    # ---- train
    t = config.train
    need_int("train.batch_size", t.batch_size, 1)
    steps_ok = need_int("train.num_steps", t.num_steps, 1)
    if need_int("train.grad_accum_steps", t.grad_accum_steps, 1) and _is_int(t.batch_size) and t.batch_size >= 1:
        if t.batch_size % t.grad_accum_steps:
            bad("train.batch_size", t.batch_size, f"must be divisible by train.grad_accum_steps={t.grad_accum_steps}")
    if t.tbptt and d.mode != "stream":
        bad("train.tbptt", t.tbptt, f"truncated BPTT needs data.mode='stream' (got {d.mode!r})")
    need_choice("train.nan_policy", t.nan_policy, NAN_POLICIES)
    need_int("train.log_every", t.log_every, 1)
    need_int("train.loss_chunk_size", t.loss_chunk_size, 0)
    # ---- optim
    o = config.optim
    if not (_is_num(o.lr) and o.lr > 0):
        bad("optim.lr", o.lr, "must be a finite number > 0")
    from ssm_jax.optim import DECAY_SHAPES, SCHEDULES

    need_choice("optim.schedule", o.schedule, SCHEDULES)
    need_choice("optim.decay_shape", o.decay_shape, DECAY_SHAPES)
    if need_int("optim.warmup_steps", o.warmup_steps, 0) and steps_ok and o.warmup_steps > t.num_steps:
        bad("optim.warmup_steps", o.warmup_steps, f"exceeds train.num_steps={t.num_steps}")
    if not (_is_num(o.decay_fraction) and 0.0 <= o.decay_fraction <= 1.0):
        bad("optim.decay_fraction", o.decay_fraction, "must be in [0, 1]")
    elif o.schedule == "wsd" and steps_ok and _is_int(o.warmup_steps):
        decay_steps = int(round(o.decay_fraction * t.num_steps))
        if o.warmup_steps + decay_steps > t.num_steps:
            bad(
                "optim.warmup_steps",
                o.warmup_steps,
                f"plus the {decay_steps} decay steps (optim.decay_fraction={o.decay_fraction}) exceed train.num_steps={t.num_steps}",
            )
    if not (_is_num(o.min_lr_ratio) and 0.0 <= o.min_lr_ratio <= 1.0):
        bad("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    for name in ("b1", "b2"):
        if not (_is_num(o[name]) and 0.0 <= o[name] < 1.0):
            bad(f"optim.{name}", o[name], "must be in [0, 1)")
    if not (_is_num(o.eps) and o.eps > 0):
        bad("optim.eps", o.eps, "must be > 0")
    if not (_is_num(o.weight_decay) and o.weight_decay >= 0):
        bad("optim.weight_decay", o.weight_decay, "must be >= 0")
    if not (_is_num(o.clip_norm) and o.clip_norm >= 0):
        bad("optim.clip_norm", o.clip_norm, "must be >= 0 (0 disables clipping)")
    # ---- eval / checkpoint / log
    need_int("eval.every_steps", config.eval.every_steps, 0)
    need_int("eval.num_batches", config.eval.num_batches, 0)
    need_int("eval.batch_size", config.eval.batch_size, 0)
    need_int("checkpoint.every_steps", config.checkpoint.every_steps, 1)
    need_int("checkpoint.max_to_keep", config.checkpoint.max_to_keep, 1)
    # ---- mesh
    m = config.mesh
    for name in ("data", "fsdp", "seq"):
        v = m[name]
        if not _is_int(v) or (v < 1 and v != -1):
            bad(f"mesh.{name}", v, "must be a positive integer (or -1: the remaining devices)")
    need_int("mesh.min_fsdp_size", m.min_fsdp_size, 0)
    if _is_int(m.seq) and m.seq > 1:
        if t.tbptt:
            bad("mesh.seq", m.seq, "sequence parallelism cannot be combined with train.tbptt")
        if _is_int(d.seq_len) and d.seq_len % m.seq:
            bad("data.seq_len", d.seq_len, f"must be divisible by mesh.seq={m.seq}")
    # ---- distributed / init
    dist = config.distributed
    need_int("distributed.num_processes", dist.num_processes, 0)
    if not _is_int(dist.process_id) or dist.process_id < -1:
        bad("distributed.process_id", dist.process_id, "must be -1 (from the environment) or a process index >= 0")
    need_choice("distributed.cpu_collectives", dist.cpu_collectives, ("", "gloo", "mpi"))
    need_int("distributed.num_cpu_devices", dist.num_cpu_devices, 0)
    if dist.local_device_ids:
        try:
            [int(x) for x in str(dist.local_device_ids).split(",")]
        except ValueError:
            bad("distributed.local_device_ids", dist.local_device_ids, "must be comma-separated integers")
    init = config.init
    if init.workdir and init.pretrained:
        bad("init.workdir", init.workdir, "give init.workdir or init.pretrained, not both")
    if init.workdir and not os.path.isdir(os.path.join(init.workdir, "checkpoints")):
        bad("init.workdir", init.workdir, "has no checkpoints/ directory (not a train.py workdir)")
    if init.pretrained and not os.path.isdir(init.pretrained):
        bad("init.pretrained", init.pretrained, "is not a directory")
    if init.required and not (init.workdir or init.pretrained):
        bad("init.workdir", init.workdir, "this config fine-tunes: set init.workdir (a train.py workdir) or init.pretrained")

    # ---- device-dependent checks
    if num_devices is not None and not errors:
        sizes = {k: m[k] for k in ("data", "fsdp", "seq")}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if -1 in sizes.values():
            if num_devices % fixed:
                bad("mesh", sizes, f"fixed axes (product {fixed}) do not divide the {num_devices} devices")
            else:
                sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
        if -1 not in sizes.values() and math.prod(sizes.values()) != num_devices:
            bad("mesh", sizes, f"the axis sizes multiply to {math.prod(sizes.values())}, not the {num_devices} devices")
        if not errors:
            if sizes["seq"] > 1 and d.seq_len % sizes["seq"]:
                bad("data.seq_len", d.seq_len, f"must be divisible by the {sizes['seq']} devices of mesh axis seq")
            dp = sizes["data"] * sizes["fsdp"]
            micro = t.batch_size // t.grad_accum_steps
            if micro % dp:
                bad(
                    "train.batch_size",
                    t.batch_size,
                    f"the micro-batch (batch_size / grad_accum_steps = {micro}) must be divisible by the "
                    f"data-parallel size mesh.data * mesh.fsdp = {dp}",
                )
            eval_batch = config.eval.batch_size or t.batch_size
            if eval_batch % dp:
                bad("eval.batch_size", eval_batch, f"must be divisible by the data-parallel size {dp}")
            if process_count and process_count > 1:
                for path, value in (("train.batch_size", t.batch_size), ("eval.batch_size", eval_batch)):
                    if value % process_count:
                        bad(path, value, f"must be divisible by the {process_count} processes")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def load_sibling_config(config_file: str, name: str = "default.py"):
    """``get_config()`` of the config file ``name`` beside ``config_file`` (usually ``__file__``).

    Config files are loaded by path (``--config=configs/...``), not as a package, so one config that extends
    another loads it by path too; this works from any working directory.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    spec = importlib.util.spec_from_file_location(f"_ssm_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
