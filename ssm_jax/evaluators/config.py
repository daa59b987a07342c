"""The evaluation configuration: its fields (:func:`base_config`) and their validation.

Config files under ``configs/eval/`` start from :func:`base_config` and change what they need; every
field can be overridden on the command line (``--config.loss.length=8x``). Lengths are token counts
(``"4096"``) or multiples of the training length ``T_train`` (``"8x"``, ``"0.5x"``); lists are
comma-separated strings.

Validation runs in two steps, each raising one ``ValueError`` that lists every bad field as
``config.<field>=<value>: <why>`` with what is accepted:

* :func:`validate_config` before anything is loaded: types, choices, bounds, and that the checkpoint,
  its steps, the data and capacity directories exist;
* :func:`validate_for_model` once the model and its ``T_train`` are known: the lengths against
  ``T_train`` (a collapse verdict needs positions beyond it, state-norm growth a stream of at least
  ``2 T_train``).
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any, List, Sequence

import ml_collections

from ssm_jax.evaluators.named_mitigations import MITIGATION_NAMES
from ssm_jax.evaluators.streams import SOURCES, HeldOutData, group_stream_tokens, heldout_documents, token_corpus

__all__ = [
    "MODES",
    "MODEL_MODES",
    "DTYPES",
    "base_config",
    "parse_list",
    "parse_length",
    "parse_lengths",
    "parse_steps",
    "expand_runs",
    "loss_bucket_width",
    "states_every",
    "validate_config",
    "validate_for_model",
]

MODES = ("loss_vs_position", "passkey", "states", "capacity")  # also the order in which they run
MODEL_MODES = ("loss_vs_position", "passkey", "states")  # the modes that evaluate a model
DTYPES = ("float32", "bfloat16", "float16")
STATE_NORM_REDUCTIONS = ("max", "final")


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default: loss vs position to 64x T_train and a passkey sweep, with every
    training-free mitigation, sized for the small byte-level default model on a 2-core CPU."""
    c = ml_collections.ConfigDict()
    # What to evaluate.
    c.checkpoint = ""  # train.py workdir | from_pretrained dir (config.json + weights) | "random"
    c.steps = "-1"  # checkpoint steps of a workdir, e.g. "1000,2000,-1"; -1: the latest
    c.tokenizer = ""  # "byte" | "neox"; "": from the training config, else from the vocabulary size
    c.train_len = 0  # T_train; 0: from the training config (else 2048, the public checkpoints')
    c.dtype = "float32"  # compute dtype
    c.random_model = ml_collections.ConfigDict(  # Mamba2Config fields of checkpoint="random" (smoke tests)
        dict(d_model=64, n_layer=2, vocab_size=257, d_state=16, headdim=32, chunk_size=64)
    )
    c.output_dir = ""  # "": <checkpoint>/eval ("eval_output" without a checkpoint directory)
    c.modes = "loss_vs_position,passkey"  # any of MODES
    c.seed = 0  # prompt order, passkey digits and depths

    # One curve / heatmap per entry; "a+b" composes mitigations.
    c.mitigations = "none,forget_more,dt_scale,state_norm,sliding_window"
    c.forget_more = ml_collections.ConfigDict(dict(alpha_scale=0.9999, b_scale=0.75))
    c.dt_scale = ml_collections.ConfigDict(dict(scale=0.5))
    # Threshold per layer and head: margin x the state norm seen on `num_prompts` held-out prompts of the
    # training length (ssm_jax.diagnostics.calibrate_state_norm; reduce "max" or "final").
    c.state_norm = ml_collections.ConfigDict(dict(margin=1.0, reduce="max", num_prompts=2))
    c.sliding_window = ml_collections.ConfigDict(dict(window=0))  # 0: T_train

    # Held-out documents; "" / -1: from the training config when there is one.
    c.data = ml_collections.ConfigDict(dict(corpus="", validation_fraction=-1.0, split_seed=-1, local_data_dir="", local_name="", tokens_dir=""))

    c.loss = ml_collections.ConfigDict()
    # documents | newlines (the paper's prompt of newline characters) | shakespeare | kjv (bundled corpora)
    c.loss.sources = "documents"
    c.loss.length = "64x"  # prompt length
    c.loss.num_prompts = 4
    c.loss.batch_size = 4  # prompts streamed together
    c.loss.chunk_len = 4096
    c.loss.num_buckets = 48  # log-spaced position buckets of the curves
    c.loss.bucket_width = 0  # buckets of the collapse rule; 0: max(128, T_train // 8) (T_train // 2 below 256)
    c.loss.collapse_factor = 2.0  # collapse: a loss beyond T_train above this x the reference
    c.loss.unigram_loss = 0.0  # nats/token of a context-free model; 0: from the held-out documents

    c.passkey = ml_collections.ConfigDict()
    c.passkey.context_lengths = "0.5x,1x,2x,4x,8x"  # lengths below the shortest prompt are skipped
    c.passkey.num_depths = 10
    c.passkey.trials = 1  # prompts per (depth bucket, context length)
    c.passkey.batch_size = 8  # prompts of equal token length decoded together
    c.passkey.max_new_tokens = 0  # 0: 10 for the byte tokenizer, 6 for NeoX
    c.passkey.chunk_len = 4096

    c.states = ml_collections.ConfigDict()  # state norms and first-token retention while streaming documents
    c.states.length = "64x"  # at least 2x; retention is reported at 1x and 16x T_train
    c.states.every = 0  # record interval, a divisor of T_train; 0: about T_train / 8
    c.states.outlier_ratio = 4.0  # a head is an outlier when its norm exceeds this x its max within T_train
    c.states.num_prompts = 1

    c.capacity = ml_collections.ConfigDict()
    c.capacity.runs = ""  # evaluation output dirs or globs; "": this evaluation's (with loss_vs_position)
    c.capacity.mitigation = "none"
    c.capacity.source = "documents"
    return c


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def parse_list(value: Any) -> List[str]:
    """``"a, b,c"`` or a sequence -> ``["a", "b", "c"]`` (empty items dropped)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def parse_length(value: Any, train_len: int) -> int:
    """A length: an int, ``"4096"``, or a multiple of the training length such as ``"8x"`` / ``"0.5x"``."""
    text = str(value).strip().lower()
    if text.endswith("x"):
        return int(round(float(text[:-1]) * train_len))
    number = float(text)
    if number != int(number):
        raise ValueError(f"{value!r} is not a whole number of tokens")
    return int(number)


def parse_lengths(value: Any, train_len: int) -> List[int]:
    """A comma-separated list of :func:`parse_length` values, sorted and de-duplicated."""
    return sorted({parse_length(v, train_len) for v in parse_list(value)})


def parse_steps(value: Any) -> List[int]:
    """``"1000,2000,-1"`` -> ``[1000, 2000, -1]``: checkpoint steps, -1 the latest."""
    return [int(v) for v in parse_list(value)]


def expand_runs(spec: Any) -> List[str]:
    """Evaluation directories of ``config.capacity.runs``: each item, or the paths its glob matches."""
    paths: List[str] = []
    for item in parse_list(spec):
        paths.extend(sorted(glob.glob(item)) or [item])
    return paths


def loss_bucket_width(config: Any, train_len: int) -> int:
    """The collapse rule's bucket width: ``config.loss.bucket_width``, or the rule's default."""
    from ssm_jax.diagnostics import collapse_bucket_width

    return int(config.loss.bucket_width) or collapse_bucket_width(train_len)


def states_every(config: Any, train_len: int) -> int:
    """The state-record interval: ``config.states.every``, or ``T_train / k`` for the smallest ``k >= 8``
    dividing ``T_train`` (records must fall on ``T_train`` itself)."""
    if config.states.every:
        return int(config.states.every)
    return train_len // next((k for k in range(8, train_len + 1) if train_len % k == 0), train_len)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Errors:
    """Collects ``config.<path>=<value>: <why>`` lines; :meth:`raise_any` raises them as one ValueError."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.lines: List[str] = []

    def value(self, path: str) -> Any:
        node = self.config
        for part in path.split("."):
            node = node[part]
        return node

    def bad(self, path: str, why: str) -> None:
        self.lines.append(f"config.{path}={self.value(path)!r}: {why}")

    def int_at_least(self, path: str, minimum: int) -> bool:
        ok = _is_int(self.value(path)) and self.value(path) >= minimum
        if not ok:
            self.bad(path, f"must be an integer >= {minimum}")
        return ok

    def positive(self, path: str) -> None:
        if not (_is_num(self.value(path)) and self.value(path) > 0):
            self.bad(path, "must be a finite number > 0")

    def choice(self, path: str, choices: Sequence[str]) -> bool:
        ok = self.value(path) in choices
        if not ok:
            self.bad(path, f"must be one of {', '.join(map(repr, choices))}")
        return ok

    def names(self, path: str, choices: Sequence[str], what: str) -> List[str]:
        """The comma-separated names of a list field, each checked against ``choices``."""
        items = parse_list(self.value(path))
        if not items:
            self.bad(path, f"lists no {what}; accepted: {', '.join(choices)} (comma-separated)")
        unknown = [i for i in items if i not in choices]
        if unknown:
            self.bad(path, f"unknown {what} {', '.join(map(repr, unknown))}; accepted: {', '.join(choices)}")
        return items

    def mitigations(self, path: str) -> None:
        """Each comma-separated item a mitigation name or several joined by ``+``."""
        for spec in parse_list(self.value(path)) or [""]:
            if not all(p.strip() in MITIGATION_NAMES for p in spec.split("+")):
                self.bad(
                    path,
                    f"{spec!r} is not a mitigation; accepted: {', '.join(MITIGATION_NAMES)}, "
                    "'+' composing several (comma-separated where a list is accepted)",
                )

    def lengths(self, path: str, *, single: bool = False) -> None:
        """Each item a whole number of tokens >= 1 or a positive multiple of T_train (``"8x"``)."""
        items = parse_list(self.value(path))
        try:
            if not items or any(parse_length(v, 1 << 20) < 1 for v in items) or (single and len(items) > 1):
                raise ValueError
        except ValueError:
            what = "a length >= 1" if single else "lengths >= 1, comma-separated"
            self.bad(path, f"must be {what}: token counts ('4096') or multiples of T_train ('8x')")

    def raise_any(self, title: str) -> None:
        if self.lines:
            raise ValueError(f"{title}:\n  " + "\n  ".join(self.lines))


def _check_checkpoint(e: _Errors, modes: Sequence[str]) -> None:
    from ssm_jax import loading

    config = e.config
    try:
        steps = parse_steps(config.steps)
    except ValueError:
        steps = None
    if not steps or any(s < -1 for s in steps) or len(set(steps)) != len(steps):
        e.bad("steps", "must list distinct checkpoint steps >= 0 or -1 (the latest), comma-separated")
        steps = None
    if not any(m in MODEL_MODES for m in modes):
        return
    if not config.checkpoint:
        e.bad(
            "checkpoint",
            f"is required by the modes {', '.join(m for m in modes if m in MODEL_MODES)}; accepted: "
            "a train.py work directory, a from_pretrained directory or 'random'",
        )
        return
    try:
        kind = loading.checkpoint_kind(config.checkpoint)
    except FileNotFoundError as err:
        e.bad("checkpoint", str(err))
        return
    if kind == "random":
        from ssm_jax.model import Mamba2Config

        try:
            Mamba2Config(**config.random_model.to_dict())
        except (TypeError, ValueError) as err:
            e.bad("random_model", f"is not a valid Mamba2Config: {err}")
    if kind != "workdir" and steps not in (None, [-1]):
        e.bad("steps", f"selects checkpoints of a train.py work directory; a {kind} checkpoint takes only '-1'")
    elif kind == "workdir" and steps:
        for step in steps:
            try:
                loading.resolve_step(config.checkpoint, step)
            except FileNotFoundError as err:
                e.bad("steps", f"step {step}: {err}")


def _check_capacity(e: _Errors, modes: Sequence[str]) -> None:
    e.mitigations("capacity.mitigation")
    e.choice("capacity.source", SOURCES)
    if "capacity" not in modes:
        return
    runs = expand_runs(e.config.capacity.runs)
    if not runs and "loss_vs_position" not in modes:
        e.bad(
            "capacity.runs",
            "lists no evaluation directories; give directories or globs of earlier evaluations, or add loss_vs_position to config.modes",
        )
    from ssm_jax.evaluators.capacity import load_run

    for run in runs:  # each run's verdict and accuracies must be there for the chosen curve
        try:
            load_run(run, mitigation=e.config.capacity.mitigation, source=e.config.capacity.source)
        except (FileNotFoundError, ValueError, KeyError) as err:
            e.bad("capacity.runs", f"{err}; accepted: output directories of earlier evaluations")


def validate_config(config: Any) -> None:
    """Checks every field before anything is loaded; raises ``ValueError`` listing each bad field."""
    e = _Errors(config)
    modes = e.names("modes", MODES, "mode")
    _check_checkpoint(e, modes)
    e.choice("tokenizer", ("", "byte", "neox"))
    e.int_at_least("train_len", 0)
    e.choice("dtype", DTYPES)
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        e.bad("output_dir", "exists and is not a directory")
    e.int_at_least("seed", 0)
    e.mitigations("mitigations")
    if not (_is_num(config.forget_more.alpha_scale) and 0 < config.forget_more.alpha_scale <= 1):
        e.bad("forget_more.alpha_scale", "must be in (0, 1]")
    e.positive("forget_more.b_scale")
    e.positive("dt_scale.scale")
    e.positive("state_norm.margin")
    e.choice("state_norm.reduce", STATE_NORM_REDUCTIONS)
    e.int_at_least("state_norm.num_prompts", 1)
    e.int_at_least("sliding_window.window", 0)
    # data
    from ssm_jax.data import CORPUS_NAMES

    if (
        e.choice("data.corpus", ("",) + CORPUS_NAMES + ("local", "tokens"))
        and config.data.corpus == "local"
        and not (os.path.isdir(config.data.local_data_dir))
    ):
        e.bad("data.local_data_dir", "must be the directory of a corpus prepared with build_local_corpus when data.corpus='local'")
    if config.data.tokens_dir and not os.path.isfile(os.path.join(config.data.tokens_dir, "manifest.json")):
        e.bad("data.tokens_dir", "must be a token corpus directory holding manifest.json (python -m ssm_jax.data.linux_corpus writes one)")
    vf = config.data.validation_fraction
    if not (_is_num(vf) and (vf == -1 or 0 <= vf < 1)):
        e.bad("data.validation_fraction", "must be in [0, 1) (0: every document) or -1 (from the training config)")
    e.int_at_least("data.split_seed", -1)
    # loss
    e.names("loss.sources", SOURCES, "source")
    e.lengths("loss.length", single=True)
    for name in ("num_prompts", "batch_size", "chunk_len", "num_buckets"):
        e.int_at_least(f"loss.{name}", 1)
    e.int_at_least("loss.bucket_width", 0)
    if not (_is_num(config.loss.collapse_factor) and config.loss.collapse_factor > 1):
        e.bad("loss.collapse_factor", "must be a finite number > 1 (the paper's rule uses 2)")
    if not (_is_num(config.loss.unigram_loss) and config.loss.unigram_loss >= 0):
        e.bad("loss.unigram_loss", "must be >= 0 nats/token (0: computed from the held-out documents)")
    # passkey
    e.lengths("passkey.context_lengths")
    for name in ("num_depths", "trials", "batch_size", "chunk_len"):
        e.int_at_least(f"passkey.{name}", 1)
    e.int_at_least("passkey.max_new_tokens", 0)
    # states
    e.lengths("states.length", single=True)
    e.int_at_least("states.every", 0)
    e.positive("states.outlier_ratio")
    e.int_at_least("states.num_prompts", 1)
    _check_capacity(e, modes)
    e.raise_any("invalid eval config")


def validate_for_model(config: Any, train_len: int, data: HeldOutData, tokenizer: Any = None) -> None:
    """Checks the fields that depend on the model's ``T_train``, the resolved held-out ``data`` and (when
    given) the model's ``tokenizer``, which sets the shortest passkey prompt."""
    e = _Errors(config)
    modes = parse_list(config.modes)
    from ssm_jax.data import CORPUS_NAMES

    if data.corpus == "local" and not os.path.isdir(data.local_data_dir):  # the held-out documents
        e.bad(
            "data.local_data_dir",
            f"must be the directory of the local corpus the model trained on (the training config names {data.local_data_dir!r})",
        )
    elif data.corpus == "tokens" and tokenizer is not None:
        try:
            longest = group_stream_tokens(token_corpus(data, tokenizer))
        except (ValueError, OSError) as err:
            e.bad("data.tokens_dir", f"{err}; accepted: a token corpus of the model's tokenizer with a validation split")
        else:  # each prompt row reads one held-out group: the stream (and its next token) must fit in it
            for mode, field in (("loss_vs_position", "loss.length"), ("states", "states.length")):
                if mode in modes and longest is not None and (mode == "states" or "documents" in parse_list(config.loss.sources)):
                    need = parse_length(config[field.split(".")[0]].length, train_len) + 1
                    if need > longest:
                        e.bad(
                            field,
                            f"needs {need} tokens per prompt, but the shortest held-out group of "
                            f"{data.tokens_dir} holds {longest}; accepted: at most {longest - 1}",
                        )
    elif data.corpus != "local" and data.corpus not in CORPUS_NAMES:
        e.bad("data.corpus", f"the training config names corpus {data.corpus!r}; accepted: {', '.join(CORPUS_NAMES + ('local', 'tokens'))}")
    elif data.corpus != "local":
        try:
            heldout_documents(data)
        except ValueError as err:
            e.bad("data.validation_fraction", f"splits corpus {data.corpus!r} into no held-out or training document: {err}")
    if "loss_vs_position" in modes:
        width = loss_bucket_width(config, train_len)
        first_after = -(-train_len // width) * width + 1  # start of the first bucket beyond T_train
        if train_len // width < 2:
            e.bad(
                "loss.bucket_width",
                f"T_train={train_len} spans {train_len // width} bucket(s) of {width}; the "
                "collapse reference excludes the first bucket, so T_train must span at least 2: "
                f"accepted 1 .. {max(1, train_len // 2)}",
            )
        elif parse_length(config.loss.length, train_len) < first_after:
            e.bad(
                "loss.length",
                f"is {parse_length(config.loss.length, train_len)} tokens; the collapse rule needs "
                f"at least {first_after} (a bucket of {width} beyond T_train={train_len})",
            )
    if "passkey" in modes:
        lengths = parse_lengths(config.passkey.context_lengths, train_len)
        if lengths[0] < 1:
            e.bad("passkey.context_lengths", f"resolves to a length below 1 token at T_train={train_len}")
        elif tokenizer is not None:
            import numpy as np

            from ssm_jax.data import make_passkey_example

            try:  # shorter lengths are skipped, but one must remain
                make_passkey_example(tokenizer, lengths[-1], 0.0, np.random.default_rng(0))
            except ValueError as err:
                e.bad("passkey.context_lengths", f"every length {lengths} (T_train={train_len}) is too short: {err}")
    if "states" in modes:
        length, every = parse_length(config.states.length, train_len), states_every(config, train_len)
        if length < 2 * train_len:
            e.bad(
                "states.length",
                f"is {length} tokens; state-norm growth compares the stream's second half with "
                f"T_train={train_len}: accepted >= {2 * train_len} ('2x')",
            )
        if every > train_len or train_len % every:
            e.bad("states.every", f"must divide T_train={train_len} (records fall on T_train); 0 picks one")
    e.raise_any(f"invalid eval config for this model (T_train={train_len})")
