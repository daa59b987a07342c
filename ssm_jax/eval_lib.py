"""Evaluation (PAPER.md sections 3, 5, 6): loss vs position, passkey retrieval and state capacity.

:func:`run` is what ``eval.py`` calls: it loads a model (a ``train.py`` work directory, a
``from_pretrained`` directory, or ``"random"`` for smoke tests), builds the requested mitigations and
runs the modes listed in ``config.modes``, writing into one output directory::

    config.json                    the evaluation config
    loss_vs_position.json          bucketed per-token loss, one curve per (source, mitigation)
    loss_vs_position_fine.npz      the fixed-width buckets the collapse rule reads
    loss_vs_position_<source>.png  perplexity vs position (log x), training length marked
    passkey.json, passkey.png      accuracy per (depth bucket, context length) and mitigation
    states.json, states_*.png      per-layer/per-head state norms while streaming one held-out prompt
                                   (the paper's collapse diagnostics), heads that leave their range
    capacity.json, capacity.png    T_forget / T_recall per state size and the fitted laws
    summary.md                     the key numbers

Choices (documented here because the paper leaves them open):

* **Positions.** A prediction's position ``t`` is the number of tokens read so far (``t = 1`` predicts
  the second token). A loss evaluation of ``length`` L scores ``t = 1 .. L`` (its prompts hold ``L + 1``
  tokens), so with ``L`` a multiple of the chunk length every chunk has the same shape (one compile).
* **Loss buckets.** Per-token losses are summed on the host into log-spaced buckets (the curves) and
  into fixed buckets of ``max(1, T_train // 8)`` positions (the collapse rule, see
  :mod:`ssm_jax.capacity`); the device only ever holds one chunk and the O(1) cache, the host
  only the bucket sums, so memory does not grow with the length (1M tokens and beyond).
* **Documents.** The ``documents`` source concatenates the held-out documents of a bundled corpus
  (the same split as training: corpus, validation fraction and split seed are read from the training
  config when there is one), each followed by EOS, in a seeded random order per prompt; when the
  held-out text is shorter than the prompt it is repeated in a fresh order. The ``newlines`` source is
  the paper's stress prompt: the tokens of ``"\\n"`` repeated.
* **Passkey batching.** Left padding would change an SSM's state, so prompts are grouped by exact
  token length and each group is run in batches of one fixed size (``min(batch_size, next power of two
  of the largest group)``); short batches are filled by repeating their last prompt (the copies'
  answers are dropped), so decoding compiles once per mitigation.
  Depth bucket ``i`` of ``n`` draws the needle depth uniformly in ``[i / n, (i + 1) / n)`` (seeded).
* **state_norm** thresholds come from :func:`ssm_jax.diagnostics.calibrate_state_norm` on held-out
  prompts of the training length; **sliding_window**'s window defaults to the training length.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from ssm_jax import capacity as capacity_lib
from ssm_jax import inference
from ssm_jax import mitigations as mitigations_lib
from ssm_jax.model import Mamba2Config, Mamba2LM

MODES = ("loss_vs_position", "passkey", "states", "capacity")
MITIGATION_NAMES = ("none", "forget_more", "dt_scale", "state_norm", "sliding_window")
SOURCES = ("documents", "newlines")
PUBLIC_TRAIN_LEN = 2048  # the public Mamba-2 checkpoints were trained at 2K tokens
LOG_EVERY_TOKENS = 131072

# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def parse_list(value: Any) -> List[str]:
    """``"a, b,c"`` or a sequence -> ``["a", "b", "c"]`` (empty items dropped)."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    else:
        items = list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def parse_length(value: Any, train_len: int) -> int:
    """A length: an int, ``"4096"``, or a multiple of the training length such as ``"8x"`` / ``"0.5x"``."""
    text = str(value).strip().lower()
    if text.endswith("x"):
        return int(round(float(text[:-1]) * train_len))
    return int(float(text))


def parse_lengths(value: Any, train_len: int) -> List[int]:
    """A comma-separated list of :func:`parse_length` values, sorted and de-duplicated."""
    return sorted({parse_length(v, train_len) for v in parse_list(value)})


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN / inf -> None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def write_json(path: str, obj: Any) -> str:
    """Writes ``obj`` as JSON atomically (a killed evaluation leaves the old file or none, never half of one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_jsonable(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return path


def _to_dict(cfg: Any) -> Any:
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return cfg


def _find(tree: Any, names: Sequence[str]) -> Any:
    """The first value stored under one of ``names`` in a nested dict (breadth-first), or None."""
    queue = [_to_dict(tree)]
    while queue:
        node = queue.pop(0)
        if not isinstance(node, Mapping):
            continue
        for name in names:
            if name in node and node[name] not in (None, "") and not isinstance(node[name], Mapping):
                return node[name]
        queue.extend(v for v in node.values() if isinstance(v, Mapping))
    return None


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalModel:
    """A model to evaluate with what evaluation needs to know about it."""

    model: Mamba2LM
    tokenizer: Any
    tokenizer_name: str
    train_len: int
    kind: str  # "workdir" | "pretrained" | "random"
    path: str
    data: Dict[str, Any]  # corpus, validation_fraction, split_seed of the training data (when known)

    @property
    def config(self) -> Mamba2Config:
        return self.model.config

    def describe(self) -> Dict[str, Any]:
        cfg = self.config
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))
        return {
            "kind": self.kind, "path": self.path, "tokenizer": self.tokenizer_name, "train_len": self.train_len,
            "state_size": cfg.state_size, "n_s_millions": cfg.state_size / 1e6, "params": params,
            "d_model": cfg.d_model, "n_layer": cfg.n_layer, "nheads": cfg.nheads, "headdim": cfg.headdim,
            "d_state": cfg.d_state, "vocab_size": cfg.vocab_size, "data": self.data,
        }


def checkpoint_kind(path: str) -> str:
    """``"random"``, ``"pretrained"`` (config.json + weights: state-spaces / Hugging Face) or ``"workdir"``."""
    if path == "random":
        return "random"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} is not a directory (and not 'random')")
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, w)) for w in weights
    ):
        return "pretrained"
    return "workdir"


def tokenizer_name_for_vocab(vocab_size: int) -> str:
    """``"byte"`` for byte-level vocabularies (257, padded 272), ``"neox"`` for GPT-NeoX sized ones."""
    if vocab_size <= 512:
        return "byte"
    if vocab_size >= 50277:
        return "neox"
    raise ValueError(f"cannot tell the tokenizer of a vocabulary of {vocab_size}: set config.tokenizer")


def load_eval_model(
    path: str,
    *,
    step: Optional[int] = None,
    tokenizer: str = "",
    train_len: int = 0,
    dtype: str = "float32",
    random_model: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
) -> EvalModel:
    """Loads a model for evaluation.

    Args:
      path: a ``train.py`` work directory (orbax; loaded with
        ``ssm_jax.train_lib.load_model_from_workdir``), a ``from_pretrained`` directory, or ``"random"``
        (a randomly initialised ``Mamba2Config(**random_model)``, for smoke tests).
      step: checkpoint step of a work directory (None: the latest).
      tokenizer: ``"byte"`` / ``"neox"``; empty: from the training config, else from the vocabulary size.
      train_len: the training length; 0: from the training config, else 2048 (public checkpoints).
    """
    from ssm_jax.data import get_tokenizer

    kind = checkpoint_kind(path)
    train_config = None
    if kind == "random":
        model = Mamba2LM(Mamba2Config(**dict(random_model or {})), rngs=nnx.Rngs(seed))
    elif kind == "pretrained":
        from ssm_jax.convert import from_pretrained

        model = from_pretrained(path, dtype=dtype)
        info = os.path.join(path, "ssm_jax_train.json")  # optional: written next to exported models
        if os.path.isfile(info):
            with open(info, encoding="utf-8") as f:
                train_config = json.load(f)
    else:
        try:
            from ssm_jax.train_lib import load_model_from_workdir
        except ImportError as e:
            raise ImportError(
                f"{path!r} is not a from_pretrained directory (no config.json + weights), so it must be a train.py "
                "work directory, which needs ssm_jax.train_lib.load_model_from_workdir"
            ) from e
        model, train_config = load_model_from_workdir(path, step=step)

    tree = _to_dict(train_config)
    data_tree = tree.get("data") if isinstance(tree, Mapping) else None

    def lookup(names):  # the training config's `data` section first (train.py), then anywhere
        found = _find(data_tree, names)
        return found if found is not None else _find(tree, names)

    found_tok = lookup(("tokenizer", "tokenizer_name"))
    tok_name = tokenizer or (str(found_tok) if found_tok else tokenizer_name_for_vocab(model.config.vocab_size))
    if not train_len:
        found = lookup(("train_len", "seq_len", "seqlen", "sequence_length", "max_len"))
        if found:
            train_len = int(found)
            if lookup(("tbptt",)):
                logging.warning("%s was trained with truncated BPTT (state carried across windows): T_train = %d is "
                                "the window length, not the longest context seen", path, train_len)
        else:
            train_len = PUBLIC_TRAIN_LEN
            logging.warning("training length unknown for %s: using %d (set config.train_len)", path, train_len)
    data = {}
    for key, names in (("corpus", ("corpus", "corpus_name")),
                       ("validation_fraction", ("validation_fraction", "val_fraction")),
                       ("split_seed", ("split_seed",)), ("local_data_dir", ("local_data_dir",)),
                       ("local_name", ("local_name",))):
        value = lookup(names)
        if value is not None:
            data[key] = value
    tok = get_tokenizer(tok_name)
    if tok.vocab_size > model.config.padded_vocab_size:
        raise ValueError(
            f"tokenizer {tok_name!r} has {tok.vocab_size} ids but the model's vocabulary is "
            f"{model.config.padded_vocab_size}: set config.tokenizer"
        )
    return EvalModel(model=model, tokenizer=tok, tokenizer_name=tok_name, train_len=int(train_len), kind=kind,
                     path=path, data=data)


# --------------------------------------------------------------------------------------------------
# Token streams
# --------------------------------------------------------------------------------------------------


class DocumentStream:
    """Endless rows of documents (each followed by EOS) in a seeded random order per row and pass."""

    def __init__(self, doc_tokens: Sequence[np.ndarray], eos_id: int, num_rows: int, seed: int):
        self._docs = [np.asarray(d, np.int32) for d in doc_tokens if len(d)]
        if not self._docs:
            raise ValueError("DocumentStream needs at least one non-empty document")
        self._eos = np.array([eos_id], np.int32)
        self._rngs = [np.random.default_rng([seed, row]) for row in range(num_rows)]
        self._buffers = [np.zeros((0,), np.int32) for _ in range(num_rows)]
        self._orders: List[List[int]] = [[] for _ in range(num_rows)]

    def _next_doc(self, row: int) -> np.ndarray:
        if not self._orders[row]:
            self._orders[row] = list(self._rngs[row].permutation(len(self._docs)))
        return np.concatenate([self._docs[self._orders[row].pop(0)], self._eos])

    def take(self, rows: Sequence[int], n: int) -> np.ndarray:
        """The next ``n`` tokens of each row in ``rows``: ``(len(rows), n)`` int32."""
        out = np.empty((len(rows), n), np.int32)
        for i, row in enumerate(rows):
            buf = self._buffers[row]
            pieces, have = [buf], len(buf)
            while have < n:
                doc = self._next_doc(row)
                pieces.append(doc)
                have += len(doc)
            buf = np.concatenate(pieces)
            out[i] = buf[:n]
            self._buffers[row] = buf[n:]
        return out


class RepeatStream:
    """The same token pattern repeated forever in every row (the ``newlines`` prompt)."""

    def __init__(self, pattern: Sequence[int]):
        self._pattern = np.asarray(pattern, np.int32)
        if self._pattern.size == 0:
            raise ValueError("RepeatStream needs a non-empty pattern")
        self._offset: Dict[int, int] = {}

    def take(self, rows: Sequence[int], n: int) -> np.ndarray:
        out = np.empty((len(rows), n), np.int32)
        k = self._pattern.size
        for i, row in enumerate(rows):
            start = self._offset.get(row, 0)
            out[i] = self._pattern[(start + np.arange(n)) % k]
            self._offset[row] = (start + n) % k
        return out


def heldout_documents(corpus: str, validation_fraction: float, split_seed: int, local_data_dir: str = "",
                      local_name: str = "default"):
    """The validation documents of a bundled corpus split as in training (all documents when the fraction
    is 0), or the ``validation`` split of a local corpus prepared with ``build_local_corpus``."""
    from ssm_jax.data import load_corpus, split_documents

    if corpus == "local":
        from ssm_jax.data import load_local_corpus

        if not local_data_dir:
            raise ValueError("corpus 'local' needs config.data.local_data_dir (or a training config naming it)")
        return load_local_corpus(local_data_dir, "validation", local_name or "default")
    docs = load_corpus(corpus)
    if validation_fraction <= 0:
        return docs
    return split_documents(docs, validation_fraction, split_seed)[1]


def make_stream(source: str, tokenizer, *, num_rows: int, seed: int, corpus: str = "shakespeare",
                validation_fraction: float = 0.1, split_seed: int = 0, local_data_dir: str = "",
                local_name: str = "default"):
    """A token stream for ``source`` in :data:`SOURCES`."""
    if source == "documents":
        from ssm_jax.data import iterate_documents_tokens

        docs = heldout_documents(corpus, validation_fraction, split_seed, local_data_dir, local_name)
        return DocumentStream(iterate_documents_tokens(docs, tokenizer), tokenizer.eos_id, num_rows, seed)
    if source == "newlines":
        return RepeatStream(tokenizer.encode("\n"))
    raise ValueError(f"unknown loss source {source!r}; accepted: {', '.join(SOURCES)}")


# --------------------------------------------------------------------------------------------------
# Mitigations
# --------------------------------------------------------------------------------------------------


def build_mitigations(
    names: Iterable[str],
    model: Mamba2LM,
    *,
    train_len: int,
    params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    calibration_tokens: Optional[Callable[[], np.ndarray]] = None,
) -> Tuple[Dict[str, Optional[mitigations_lib.Mitigation]], Dict[str, Dict[str, Any]]]:
    """Builds named mitigations; ``"a+b"`` composes ``a`` and ``b``.

    Args:
      names: entries of :data:`MITIGATION_NAMES` or ``+``-joined combinations.
      params: per-name parameters: ``forget_more {alpha_scale, b_scale}``, ``dt_scale {scale}``,
        ``state_norm {margin, reduce}``, ``sliding_window {window}`` (0: ``train_len``).
      calibration_tokens: returns ``(batch, train_len + 1)`` held-out tokens for state_norm.

    Returns ``({name: Mitigation or None}, {name: description})``.
    """
    params = {k: dict(v) for k, v in (params or {}).items()}
    built: Dict[str, Optional[mitigations_lib.Mitigation]] = {}
    described: Dict[str, Dict[str, Any]] = {}
    tau_cache: Dict[str, np.ndarray] = {}

    def single(name: str) -> Tuple[Optional[mitigations_lib.Mitigation], Dict[str, Any]]:
        p = params.get(name, {})
        if name == "none":
            return None, {}
        if name == "forget_more":
            a, b = float(p.get("alpha_scale", 0.9999)), float(p.get("b_scale", 0.75))
            return mitigations_lib.forget_more(a, b), {"alpha_scale": a, "b_scale": b}
        if name == "dt_scale":
            c = float(p.get("scale", 0.5))
            return mitigations_lib.dt_scale(c), {"scale": c}
        if name == "sliding_window":
            w = int(p.get("window", 0)) or int(train_len)
            return mitigations_lib.sliding_window(w), {"window": w}
        if name == "state_norm":
            if "tau" not in tau_cache:
                if calibration_tokens is None:
                    raise ValueError("state_norm needs calibration tokens (a prompt of the training length)")
                from ssm_jax.diagnostics import calibrate_state_norm

                tokens = calibration_tokens()
                every = max(1, min(int(p.get("every", 0)) or train_len // 8, train_len))
                tau_cache["tau"] = calibrate_state_norm(
                    model, tokens, every=every, reduce=str(p.get("reduce", "max")), margin=float(p.get("margin", 1.0))
                )
            tau = tau_cache["tau"]
            return mitigations_lib.state_norm(jnp.asarray(tau, jnp.float32)), {
                "margin": float(p.get("margin", 1.0)), "reduce": str(p.get("reduce", "max")),
                "calibration_len": int(train_len), "tau_min": float(tau.min()), "tau_mean": float(tau.mean()),
                "tau_max": float(tau.max()),
            }
        raise ValueError(f"unknown mitigation {name!r}; accepted: {', '.join(MITIGATION_NAMES)} (join with '+')")

    for spec in names:
        parts = [p.strip() for p in spec.split("+") if p.strip()]
        made = [single(p) for p in parts]
        mits = [m for m, _ in made if m is not None]
        built[spec] = mitigations_lib.compose(*mits) if mits else None
        described[spec] = {p: d for p, (_, d) in zip(parts, made) if d}
    return built, described


# --------------------------------------------------------------------------------------------------
# Loss vs position
# --------------------------------------------------------------------------------------------------


def log_bucket_edges(max_position: int, num_buckets: int, include: Iterable[int] = ()) -> np.ndarray:
    """Log-spaced integer bucket edges over positions ``1 .. max_position``: bucket ``i`` is
    ``[edges[i], edges[i + 1])``; ``edges[0] = 1``, ``edges[-1] = max_position + 1``, strictly increasing.
    ``include`` adds edges (e.g. ``T_train + 1`` so that no bucket straddles the training length)."""
    if max_position < 1:
        raise ValueError(f"max_position must be >= 1, got {max_position}")
    edges = np.round(np.geomspace(1, max_position + 1, max(1, int(num_buckets)) + 1)).astype(np.int64)
    extra = [int(e) for e in include if 1 < int(e) <= max_position]
    return np.unique(np.concatenate([edges, extra, [1, max_position + 1]]))


@dataclasses.dataclass
class BucketedLosses:
    """Host-side sums of per-token losses: ``(rows, buckets)`` sums and ``(buckets,)`` counts per row."""

    log_edges: np.ndarray
    log_sums: np.ndarray
    log_counts: np.ndarray
    fine_width: int
    fine_sums: np.ndarray
    fine_counts: np.ndarray
    seconds: float = 0.0
    tokens: int = 0

    def log_mean(self) -> np.ndarray:
        """``(rows, buckets)`` mean loss per log bucket."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.log_sums / self.log_counts

    def fine_mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.fine_sums / self.fine_counts


def stream_bucketed_losses(
    model: Mamba2LM,
    stream,
    length: int,
    *,
    num_prompts: int,
    log_edges: np.ndarray,
    fine_width: int,
    batch_size: int = 1,
    chunk_len: int = 8192,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    label: str = "",
    log_every: int = LOG_EVERY_TOKENS,
) -> BucketedLosses:
    """Streams ``num_prompts`` prompts (rows of ``stream``) through ``model`` in chunks, carrying conv and
    SSM state, and accumulates the losses of the predictions at ``t = 1 .. length`` (tokens read) into
    buckets on the host: ``log_edges`` (see :func:`log_bucket_edges`) and fixed buckets of ``fine_width``.

    Prompts run ``batch_size`` rows at a time. Memory: one chunk on the device, bucket sums on the host.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    mitigation = mitigations_lib.resolve(mitigation)
    fn, state = inference.chunk_loss_function(model)
    n_log = len(log_edges) - 1
    n_fine = -(-length // fine_width)
    out = BucketedLosses(
        log_edges=np.asarray(log_edges), log_sums=np.zeros((num_prompts, n_log)), log_counts=np.zeros(n_log),
        fine_width=int(fine_width), fine_sums=np.zeros((num_prompts, n_fine)), fine_counts=np.zeros(n_fine),
    )
    start_time = time.perf_counter()
    for first in range(0, num_prompts, batch_size):
        rows = list(range(first, min(first + batch_size, num_prompts)))
        cache = inference.init_cache(model, len(rows), mitigation)
        prev = stream.take(rows, 1)
        done, next_log = 0, log_every
        total = length
        while done < total:
            c = min(chunk_len, total - done)
            new = stream.take(rows, c)
            seq = np.concatenate([prev, new], axis=1)
            nll, cache = fn(state, jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:]), cache, mitigation)
            nll = np.asarray(nll, np.float64)
            prev = new[:, -1:]
            t = np.arange(done + 1, done + c + 1)  # tokens read at each prediction
            for idx, sums, counts in (
                (np.searchsorted(log_edges, t, side="right") - 1, out.log_sums, out.log_counts),
                (capacity_lib.fixed_bucket_index(t, fine_width), out.fine_sums, out.fine_counts),
            ):
                lo = int(idx[0])
                span = int(idx[-1]) - lo + 1
                for i, row in enumerate(rows):
                    sums[row, lo : lo + span] += np.bincount(idx - lo, weights=nll[i], minlength=span)
                if first == 0:
                    counts[lo : lo + span] += np.bincount(idx - lo, minlength=span)
            done += c
            if done >= next_log or done == total:
                rate = (done * len(rows) + first * total) / max(time.perf_counter() - start_time, 1e-9)
                logging.info("%s prompts %d-%d: %d / %d tokens (%.0f tok/s), mean loss of this chunk %.3f",
                             label, rows[0], rows[-1], done, length, rate, float(nll.mean()))
                while next_log <= done:
                    next_log += log_every
    out.seconds = time.perf_counter() - start_time
    out.tokens = num_prompts * length
    return out


def _curve_json(b: BucketedLosses, train_len: int) -> Dict[str, Any]:
    per_prompt = b.log_mean()
    mean = per_prompt.mean(axis=0)
    edges = b.log_edges
    centers = np.sqrt(edges[:-1] * (edges[1:] - 1).clip(min=edges[:-1]))
    fine = b.fine_mean().mean(axis=0)
    collapse = capacity_lib.detect_collapse_bucketed(fine, b.fine_width, train_len) if (
        fine.size > max(1, train_len // b.fine_width)) else None
    return {
        "positions": centers, "loss": mean, "perplexity": np.exp(mean), "count": b.log_counts,
        "per_prompt_loss": per_prompt,
        "collapse": collapse.to_json() if collapse else None,
        "loss_at_train_len": float(np.interp(np.log(train_len), np.log(centers), mean)),
        "loss_at_end": float(mean[-1]),
        "seconds": b.seconds, "tokens_per_second": b.tokens / max(b.seconds, 1e-9),
    }


def loss_vs_position(
    em: EvalModel,
    mitigations: Mapping[str, Optional[mitigations_lib.Mitigation]],
    *,
    sources: Sequence[str] = ("documents",),
    length: int,
    num_prompts: int = 2,
    batch_size: int = 2,
    chunk_len: int = 8192,
    num_buckets: int = 48,
    seed: int = 0,
    corpus: str = "shakespeare",
    validation_fraction: float = 0.1,
    split_seed: int = 0,
    local_data_dir: str = "",
    local_name: str = "default",
) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """Per-token loss vs position for each source and mitigation.

    Returns the JSON-ready result and the fixed-bucket (collapse-rule) curves as arrays for an npz:
    ``{"<source>/<mitigation>": (prompts, buckets)}``.
    """
    train_len = em.train_len
    edges = log_bucket_edges(length, num_buckets, include=(train_len + 1,))
    width = capacity_lib.smoothing_width(train_len)
    result = {
        "length": int(length), "num_prompts": int(num_prompts), "batch_size": int(batch_size),
        "chunk_len": int(chunk_len), "train_len": train_len, "bucket_edges": edges, "fine_width": width,
        "position_definition": "t = tokens read before the predicted token (1 .. length)",
        "corpus": corpus, "validation_fraction": validation_fraction, "split_seed": split_seed, "seed": seed,
        "sources": {},
    }
    arrays: Dict[str, np.ndarray] = {}
    for source in sources:
        curves = {}
        for name, mitigation in mitigations.items():
            stream = make_stream(source, em.tokenizer, num_rows=num_prompts, seed=seed, corpus=corpus,
                                 validation_fraction=validation_fraction, split_seed=split_seed,
                                 local_data_dir=local_data_dir, local_name=local_name)
            b = stream_bucketed_losses(
                em.model, stream, length, num_prompts=num_prompts, log_edges=edges, fine_width=width,
                batch_size=batch_size, chunk_len=chunk_len, mitigation=mitigation, label=f"{source}/{name}",
            )
            curves[name] = _curve_json(b, train_len)
            arrays[f"{source}/{name}"] = b.fine_mean()
            c = curves[name]["collapse"]
            logging.info("%s/%s: loss %.3f at T_train, %.3f at %d; collapsed=%s (%.1fs)", source, name,
                         curves[name]["loss_at_train_len"], curves[name]["loss_at_end"], length,
                         None if c is None else c["collapsed"], b.seconds)
        result["sources"][source] = {"curves": curves}
    return result, arrays


# --------------------------------------------------------------------------------------------------
# Passkey retrieval
# --------------------------------------------------------------------------------------------------


def default_max_new_tokens(tokenizer_name: str) -> int:
    """Enough greedy tokens for " 12345": 10 bytes for the byte tokenizer, 6 BPE tokens for NeoX."""
    return 10 if tokenizer_name == "byte" else 6


def make_passkey_examples(tokenizer, context_lengths: Sequence[int], *, num_depths: int = 10, trials: int = 1,
                          seed: int = 0) -> Tuple[List[Dict[str, Any]], List[int]]:
    """Seeded prompts for every (context length, depth bucket, trial); lengths too short for a prompt are
    skipped and returned second."""
    from ssm_jax.data import make_passkey_example

    examples, skipped = [], []
    for length in context_lengths:
        try:
            make_passkey_example(tokenizer, int(length), 0.0, np.random.default_rng(0))
        except ValueError:
            skipped.append(int(length))
            continue
        for d in range(num_depths):
            for trial in range(trials):
                rng = np.random.default_rng([seed, int(length), d, trial])
                depth = float(min((d + rng.uniform()) / num_depths, 1.0))
                ex = make_passkey_example(tokenizer, int(length), depth, rng)
                examples.append({"context_length": int(length), "depth_bucket": d, "trial": trial, "depth": depth,
                                 "passkey": ex.passkey, "prompt_ids": ex.prompt_ids})
    return examples, skipped


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def run_passkey_examples(
    model: Mamba2LM,
    tokenizer,
    examples: Sequence[Dict[str, Any]],
    *,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    batch_size: int = 8,
    max_new_tokens: int = 10,
    chunk_len: int = 2048,
) -> List[Dict[str, Any]]:
    """Greedy answers for ``examples``: prompts of equal token length are batched together (no padding
    inside a row); returns one ``{"generated", "correct", "prompt_len"}`` per example, in order."""
    from ssm_jax.data import passkey_is_correct

    by_len: Dict[int, List[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex["prompt_ids"]), []).append(i)
    results: List[Optional[Dict[str, Any]]] = [None] * len(examples)
    # One batch shape for the whole sweep (decoding compiles once): short batches repeat their last prompt.
    rows = min(int(batch_size), _next_pow2(max((len(v) for v in by_len.values()), default=1)))
    for plen, idxs in sorted(by_len.items()):
        for first in range(0, len(idxs), rows):
            part = idxs[first : first + rows]
            fill = rows - len(part)
            ids = np.stack([examples[i]["prompt_ids"] for i in part + [part[-1]] * fill])
            out = inference.generate(model, ids, max_new_tokens, temperature=0.0, mitigation=mitigation,
                                     chunk_len=chunk_len)
            for row, i in enumerate(part):
                text = tokenizer.decode(out[row].tolist())
                results[i] = {"generated": text, "correct": bool(passkey_is_correct(text, examples[i]["passkey"])),
                              "prompt_len": plen}
    return results  # type: ignore[return-value]


def passkey_eval(
    em: EvalModel,
    mitigations: Mapping[str, Optional[mitigations_lib.Mitigation]],
    *,
    context_lengths: Sequence[int],
    num_depths: int = 10,
    trials: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 0,
    chunk_len: int = 2048,
) -> Dict[str, Any]:
    """Passkey accuracy per (depth bucket, context length) for each mitigation (the same prompts for all)."""
    max_new_tokens = int(max_new_tokens) or default_max_new_tokens(em.tokenizer_name)
    examples, skipped = make_passkey_examples(em.tokenizer, context_lengths, num_depths=num_depths, trials=trials,
                                              seed=seed)
    lengths = sorted({ex["context_length"] for ex in examples})
    result = {
        "context_lengths": lengths, "skipped_context_lengths": skipped, "num_depths": num_depths,
        "depth_buckets": [[d / num_depths, (d + 1) / num_depths] for d in range(num_depths)],
        "trials_per_cell": trials, "seed": seed, "max_new_tokens": max_new_tokens, "train_len": em.train_len,
        "tokenizer": em.tokenizer_name, "results": {},
    }
    if skipped:
        logging.warning("passkey: context lengths %s are shorter than the shortest prompt; skipped", skipped)
    for name, mitigation in mitigations.items():
        t0 = time.perf_counter()
        answers = run_passkey_examples(em.model, em.tokenizer, examples, mitigation=mitigation,
                                       batch_size=batch_size, max_new_tokens=max_new_tokens, chunk_len=chunk_len)
        hits = np.zeros((num_depths, len(lengths)))
        counts = np.zeros((num_depths, len(lengths)))
        samples = []
        for ex, ans in zip(examples, answers):
            j = lengths.index(ex["context_length"])
            hits[ex["depth_bucket"], j] += ans["correct"]
            counts[ex["depth_bucket"], j] += 1
            samples.append({k: ex[k] for k in ("context_length", "depth_bucket", "depth", "passkey")} | ans)
        by_length = hits.sum(0) / counts.sum(0)
        acc_by_len = {length: float(a) for length, a in zip(lengths, by_length)}
        result["results"][name] = {
            "accuracy": hits / counts, "accuracy_by_length": by_length, "accuracy_by_depth": hits.sum(1) / counts.sum(1),
            "overall": float(hits.sum() / counts.sum()) if counts.sum() else None,
            "t_recall": capacity_lib.t_recall(acc_by_len), "seconds": time.perf_counter() - t0, "samples": samples,
        }
        logging.info("passkey/%s: accuracy by length %s (%.1fs)", name,
                     {k: round(v, 3) for k, v in acc_by_len.items()}, time.perf_counter() - t0)
    return result


# --------------------------------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------------------------------


def states_eval(em: "EvalModel", *, length: int, every: int, seed: int, outlier_ratio: float = 4.0,
                corpus: str = "shakespeare", validation_fraction: float = 0.1, split_seed: int = 0,
                local_data_dir: str = "", local_name: str = "default") -> Tuple[Dict[str, Any], Any]:
    """State diagnostics (PAPER.md section 3) on one held-out document prompt of ``length`` tokens, streamed
    without mitigation: per-layer/per-head state norm every ``every`` tokens, the heads whose norm grows past
    ``outlier_ratio`` x its largest value within ``T_train`` (:func:`ssm_jax.diagnostics.detect_state_outliers`)
    and each head's peak and sustained norm growth (:func:`ssm_jax.diagnostics.state_norm_growth`); the head
    with the largest sustained growth is traced and snapshotted. Returns the JSON-ready record and the raw
    ``StateDiagnostics``."""
    from ssm_jax import diagnostics

    if every < 1 or every > em.train_len:
        raise ValueError(f"config.states.every={every} must be in [1, T_train={em.train_len}] so that records "
                         "fall inside the training length")
    if length <= em.train_len:
        raise ValueError(f"config.states.length={length} must exceed T_train={em.train_len}")
    stream = make_stream("documents", em.tokenizer, num_rows=1, seed=seed + 777, corpus=corpus,
                         validation_fraction=validation_fraction, split_seed=split_seed,
                         local_data_dir=local_data_dir, local_name=local_name)
    tokens = stream.take([0], length + 1)  # (1, length + 1)
    diag = diagnostics.record_states(em.model, tokens, every=every, trace_heads=())
    inside = diag.positions <= em.train_len
    growth = diagnostics.state_norm_growth(diag.norm[:, 0], diag.positions, em.train_len)  # (layers, heads) each
    # A second pass traces and snapshots the head whose norm drifted most (the histogram and trace figures).
    layer, head = np.unravel_index(int(np.argmax(growth["sustained"])), growth["sustained"].shape)
    diag = diagnostics.record_states(
        em.model, tokens, every=every, trace_heads=((int(layer), int(head)),), trace_stride=1,
        snapshot_head=(int(layer), int(head)),
        snapshot_positions=(int(diag.positions[inside][-1]), int(diag.positions[-1])))
    outliers = diagnostics.detect_state_outliers(diag, em.train_len, ratio=outlier_ratio)
    res = {
        "length": int(length), "every": int(every), "train_len": int(em.train_len),
        "positions": diag.positions, "norm": diag.norm[:, 0], "max_abs": diag.max_abs[:, 0],
        "conv_norm": diag.conv_norm[:, 0], "norm_within_train": diag.norm[inside, 0].max(axis=0),
        "norm_growth": growth["peak"], "max_norm_growth": float(growth["peak"].max()),
        "sustained_norm_growth": growth["sustained"], "max_sustained_norm_growth": float(growth["sustained"].max()),
        "most_grown_head": [int(layer), int(head)],
        "outlier_ratio": float(outlier_ratio),
        "outliers": [dataclasses.asdict(o) for o in outliers],
        "conv_norm_growth": float(diag.conv_norm[~inside, 0].max() / max(diag.conv_norm[inside, 0].max(), 1e-30)),
        "mean_loss": float(diag.losses.mean()),
    }
    return res, diag


def _expand_runs(spec: Any) -> List[str]:
    paths = []
    for item in parse_list(spec):
        matches = sorted(glob.glob(item))
        paths.extend(matches if matches else [item])
    return paths


def load_capacity_run(path: str, *, mitigation: str = "none", source: str = "documents") -> Dict[str, Any]:
    """One run for :func:`ssm_jax.capacity.capacity_study` from an evaluation output directory (or the
    path of its ``loss_vs_position.json`` / ``passkey.json``)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    run: Dict[str, Any] = {"name": directory}
    loss_file = os.path.join(directory, "loss_vs_position.json")
    pk_file = os.path.join(directory, "passkey.json")
    if not (os.path.isfile(loss_file) or os.path.isfile(pk_file)):
        raise FileNotFoundError(f"{directory!r} holds neither loss_vs_position.json nor passkey.json")
    for file in (loss_file, pk_file):
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model", {})
        run.setdefault("state_size", model.get("state_size"))
        run.setdefault("train_len", model.get("train_len"))
        if file == loss_file:
            curve = data["sources"].get(source, {}).get("curves", {}).get(mitigation)
            if curve is None or curve.get("collapse") is None:
                raise ValueError(f"{loss_file}: no collapse verdict for source {source!r}, mitigation {mitigation!r}")
            run["collapsed"] = bool(curve["collapse"]["collapsed"])
            run["length"] = data["length"]
        else:
            res = data["results"].get(mitigation)
            if res is None:
                raise ValueError(f"{pk_file}: no passkey results for mitigation {mitigation!r}")
            run["passkey_accuracy"] = {int(k): float(v) for k, v in
                                       zip(data["context_lengths"], res["accuracy_by_length"]) if v is not None}
    if run.get("state_size") is None or run.get("train_len") is None:
        raise ValueError(f"{directory}: the JSON files lack model.state_size / model.train_len")
    return run


def capacity_eval(runs: Sequence[str], *, mitigation: str = "none", source: str = "documents") -> Dict[str, Any]:
    """The state-capacity study over evaluation output directories (globs allowed)."""
    paths = _expand_runs(runs)
    if not paths:
        raise ValueError("capacity: config.capacity.runs lists no evaluation directories")
    loaded = [load_capacity_run(p, mitigation=mitigation, source=source) for p in paths]
    study = capacity_lib.capacity_study(loaded)
    study["runs"] = loaded
    study["mitigation"], study["source"] = mitigation, source
    return study


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summarize(results: Mapping[str, Any]) -> str:
    """A short markdown summary of the key numbers of an evaluation."""
    lines = ["# Evaluation summary", ""]
    model = results.get("model")
    if model:
        lines += [f"Model: `{model['path']}` ({model['kind']}), tokenizer {model['tokenizer']}, "
                  f"{model['params']:,} parameters, state N_S = {model['state_size']:,} "
                  f"({model['n_layer']} layers x {model['nheads']} heads x {model['headdim']} x {model['d_state']}), "
                  f"T_train = {model['train_len']:,}.", ""]
    lv = results.get("loss_vs_position")
    if lv:
        lines += [f"## Loss vs position ({lv['num_prompts']} prompts of {lv['length']:,} tokens)", "",
                  "Collapse rule: the loss (averaged over prompts and over buckets of "
                  f"{lv['fine_width']} positions) exceeds 2x its maximum within the first T_train tokens.", "",
                  "| source | mitigation | loss @ T_train | loss @ end | max ratio after T_train | collapsed | "
                  "first collapse position | tok/s |", "|---|---|---|---|---|---|---|---|"]
        for source, s in lv["sources"].items():
            for name, c in s["curves"].items():
                col = c.get("collapse") or {}
                lines.append(f"| {source} | {name} | {_fmt(c['loss_at_train_len'])} | {_fmt(c['loss_at_end'])} | "
                             f"{_fmt(col.get('max_ratio'), 2)} | {_fmt(col.get('collapsed'))} | "
                             f"{_fmt(col.get('first_position'))} | {c['tokens_per_second']:.0f} |")
        lines.append("")
    pk = results.get("passkey")
    if pk:
        lines += [f"## Passkey retrieval ({pk['num_depths']} depth buckets x {pk['trials_per_cell']} trials)", "",
                  "| mitigation | " + " | ".join(f"{n:,}" for n in pk["context_lengths"]) + " | overall | T_recall |",
                  "|---|" + "---|" * (len(pk["context_lengths"]) + 2)]
        for name, r in pk["results"].items():
            accs = " | ".join(_fmt(float(a), 2) for a in r["accuracy_by_length"])
            lines.append(f"| {name} | {accs} | {_fmt(r['overall'], 2)} | {_fmt(r['t_recall'])} |")
        lines.append("")
    st = results.get("states")
    if st:
        lines += [f"## State norms ({st['length']:,} tokens of one held-out prompt, no mitigation)", "",
                  f"Largest sustained growth of a head's state norm (median over the second half / median "
                  f"within T_train): {st['max_sustained_norm_growth']:.2f}x (layer {st['most_grown_head'][0]}, "
                  f"head {st['most_grown_head'][1]}); largest peak growth (max after / max within T_train): "
                  f"{st['max_norm_growth']:.2f}x; heads whose peak exceeds "
                  f"{st['outlier_ratio']:g}x: {len(st['outliers'])}; conv-state norm growth "
                  f"{st['conv_norm_growth']:.2f}x.", ""]
    cap = results.get("capacity")
    if cap:
        lines += ["## State capacity", "", "| N_S (M) | T_train tried | T_forget (K) | T_recall (K) |", "|---|---|---|---|"]
        for p in cap["points"]:
            lines.append(f"| {p['n_s_millions']:.4f} | {p['train_lens']} | {_fmt(p.get('t_forget_k'))} "
                         f"({p.get('t_forget_bound', '-')}) | {_fmt(p.get('t_recall_k'))} |")
        f, r = cap["fits"]["forget"], cap["fits"]["recall"]
        lines += ["", "Fits (N_S in millions, T in K tokens):",
                  f"- T_forget = {f['a']:.3f} N_S + {f['b']:.3f} (rmse {f['rmse']:.3f})" if f else "- T_forget: not fitted",
                  f"- T_recall = {r['a']:.3f} ({r['b']:.3f}^N_S - 1) + {r['c']:.3f} (rmse {r['rmse']:.3f})"
                  if r else "- T_recall: not fitted",
                  "- paper: T_forget = 5.172 N_S - 4.469; T_recall = 4.756 (1.365^N_S - 1) - 0.742"]
        lines += [f"- note: {n}" for n in cap["notes"]]
        lines.append("")
    lines += [f"Files: {', '.join(results.get('files', []))}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _mitigation_params(config) -> Dict[str, Dict[str, Any]]:
    return {name: dict(_to_dict(config.get(name)) or {}) for name in MITIGATION_NAMES[1:] if config.get(name)}


def run(config) -> Dict[str, Any]:
    """Runs the evaluation described by an ``ml_collections`` config (see ``configs/eval/default.py``);
    writes JSON, PNG and summary.md into ``config.output_dir`` and returns the results."""
    from ssm_jax import plots

    modes = parse_list(config.modes)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; accepted: {', '.join(MODES)}")
    needs_model = any(m != "capacity" for m in modes)
    if needs_model and not config.checkpoint:
        raise ValueError("config.checkpoint is required (a train.py workdir, a from_pretrained directory or 'random')")
    out_dir = config.output_dir or (
        os.path.join(config.checkpoint, "eval") if needs_model and config.checkpoint != "random" else "eval_output")
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "config.json"), _to_dict(config))
    results: Dict[str, Any] = {"output_dir": out_dir, "files": ["config.json"]}
    t_start = time.perf_counter()

    em = None
    mitigations: Dict[str, Optional[mitigations_lib.Mitigation]] = {}
    if needs_model:
        em = load_eval_model(
            config.checkpoint, step=None if config.step < 0 else int(config.step), tokenizer=config.tokenizer,
            train_len=int(config.train_len), dtype=config.dtype, random_model=_to_dict(config.get("random_model")),
            seed=config.seed,
        )
        results["model"] = em.describe()
        dc = config.data
        data = dict(corpus=dc.corpus or em.data.get("corpus", "shakespeare"),
                    validation_fraction=float(dc.validation_fraction if dc.validation_fraction >= 0
                                              else em.data.get("validation_fraction", 0.1)),
                    split_seed=int(dc.split_seed if dc.split_seed >= 0 else em.data.get("split_seed", 0)),
                    local_data_dir=dc.get("local_data_dir", "") or em.data.get("local_data_dir", ""),
                    local_name=dc.get("local_name", "") or em.data.get("local_name", "default"))
        results["data"] = data

        def calibration_tokens() -> np.ndarray:
            n = int(config.state_norm.num_prompts)
            stream = make_stream("documents", em.tokenizer, num_rows=n, seed=config.seed + 12345, **data)
            return stream.take(list(range(n)), em.train_len + 1)

        mitigations, described = build_mitigations(
            parse_list(config.mitigations), em.model, train_len=em.train_len, params=_mitigation_params(config),
            calibration_tokens=calibration_tokens,
        )
        results["mitigations"] = described
        logging.info("model %s: %s", config.checkpoint, results["model"])

    if "loss_vs_position" in modes:
        lc = config.loss
        length = parse_length(lc.length, em.train_len)
        res, arrays = loss_vs_position(
            em, mitigations, sources=parse_list(lc.sources), length=length, num_prompts=int(lc.num_prompts),
            batch_size=int(lc.batch_size), chunk_len=int(lc.chunk_len), num_buckets=int(lc.num_buckets),
            seed=int(config.seed), **results["data"],
        )
        res["model"], res["mitigations"] = results["model"], results["mitigations"]
        results["loss_vs_position"] = res
        write_json(os.path.join(out_dir, "loss_vs_position.json"), res)
        np.savez_compressed(os.path.join(out_dir, "loss_vs_position_fine.npz"), fine_width=res["fine_width"],
                            **{k.replace("/", "__"): v for k, v in arrays.items()})
        results["files"] += ["loss_vs_position.json", "loss_vs_position_fine.npz"]
        for source, s in res["sources"].items():
            png = f"loss_vs_position_{source}.png"
            plots.plot_loss_vs_position(
                {name: {"positions": c["positions"], "loss": c["loss"]} for name, c in s["curves"].items()},
                os.path.join(out_dir, png), train_len=em.train_len,
                title=f"{source}: perplexity vs position ({res['num_prompts']} prompts)")
            results["files"].append(png)

    if "passkey" in modes:
        pc = config.passkey
        res = passkey_eval(
            em, mitigations, context_lengths=parse_lengths(pc.context_lengths, em.train_len),
            num_depths=int(pc.num_depths), trials=int(pc.trials), seed=int(config.seed), batch_size=int(pc.batch_size),
            max_new_tokens=int(pc.max_new_tokens), chunk_len=int(pc.chunk_len),
        )
        res["model"], res["mitigations"] = results["model"], results["mitigations"]
        results["passkey"] = res
        write_json(os.path.join(out_dir, "passkey.json"), res)
        plots.plot_passkey_heatmaps(
            {name: r["accuracy"] for name, r in res["results"].items()}, res["context_lengths"],
            os.path.join(out_dir, "passkey.png"), train_len=em.train_len, title="passkey accuracy")
        results["files"] += ["passkey.json", "passkey.png"]

    if "states" in modes:
        sc = config.states
        res, diag = states_eval(em, length=parse_length(sc.length, em.train_len),
                                every=int(sc.every) or max(1, em.train_len // 8),
                                seed=int(config.seed), outlier_ratio=float(sc.outlier_ratio), **results["data"])
        res["model"] = results["model"]
        results["states"] = res
        write_json(os.path.join(out_dir, "states.json"), res)
        from ssm_jax import diagnostics

        pngs = diagnostics.plot_all(diag, out_dir, train_len=em.train_len, prefix="states_")
        results["files"] += ["states.json"] + [os.path.basename(p) for p in pngs]

    if "capacity" in modes:
        cc = config.capacity
        runs = parse_list(cc.runs)
        if not runs and "loss_vs_position" in modes:
            runs = [out_dir]
        res = capacity_eval(runs, mitigation=cc.mitigation, source=cc.source)
        results["capacity"] = res
        write_json(os.path.join(out_dir, "capacity.json"), res)
        plots.plot_capacity(res["points"], res["fits"], os.path.join(out_dir, "capacity.png"))
        results["files"] += ["capacity.json", "capacity.png"]

    results["seconds"] = time.perf_counter() - t_start
    results["files"].append("summary.md")
    summary = summarize(results) + f"Total time: {results['seconds']:.1f} s.\n"
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary)
    results["summary"] = summary
    return results
