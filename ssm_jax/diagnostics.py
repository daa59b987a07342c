"""State diagnostics: watch the SSM state of any model while streaming, and detect state collapse.

:func:`record_states` streams tokens through a model (carrying conv and SSM state, as
:mod:`ssm_jax.inference` does) and every ``every`` tokens records, per layer and head, the state's
Frobenius norm, mean, variance and largest element, the cumulative retention ``prod alpha`` of the
first token, the conv-state norm, traces of ``dt``, ``B`` and ``x`` for chosen heads, snapshots of
one head's state, and the per-token loss -- every diagnostic of the paper (arXiv 2410.07145; our
summary in docs/background.md).

:func:`collapse_verdict` is the project's one collapse rule: on per-token losses averaged over prompts
and over fixed buckets of positions (:func:`bucket_means`), the model collapses when a bucket beyond
``T_train`` exceeds ``factor`` times the largest bucket within ``T_train``, the first bucket excluded.
:func:`detect_state_outliers` flags heads whose state norm leaves the range seen during the training
length. :func:`calibrate_state_norm` turns the state norms seen on a calibration prompt into the
thresholds of :func:`ssm_jax.mitigations.state_norm`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm_jax import inference
from ssm_jax import mitigations as mitigations_lib
from ssm_jax.model import Mamba2LM

Array = jax.Array


@dataclasses.dataclass
class StateDiagnostics:
    """What :func:`record_states` saw. Record axes: ``(num_records, batch, layers, heads)``.

    Attributes:
      positions: ``(num_records,)`` number of tokens consumed at each record.
      norm, mean, var, max_abs: statistics of each head's ``(headdim, d_state)`` state.
      retention: ``prod_{1 <= j <= t} alpha_j`` -- how much of the first token's write survives.
      log_retention: its logarithm (readable where ``retention`` underflows).
      conv_norm: ``(num_records, batch, layers)`` norm of the conv state (stays stable in the paper).
      traces: per-token values of chosen heads, ``{"dt[l.h]": (T, batch), "B[l.g]": (T, batch, d_state),
        "x[l.h]": (T, batch, headdim)}`` at positions ``trace_positions`` (every ``trace_stride`` tokens).
      snapshots: ``{position: (batch, headdim, d_state)}`` of the snapshot head.
      losses: ``(batch, T - 1)`` per-token next-token loss in nats.
    """

    positions: np.ndarray
    norm: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    max_abs: np.ndarray
    retention: np.ndarray
    log_retention: np.ndarray
    conv_norm: np.ndarray
    trace_positions: np.ndarray
    traces: Dict[str, np.ndarray]
    snapshot_head: Tuple[int, int]
    snapshots: Dict[int, np.ndarray]
    losses: np.ndarray

    def to_json(self) -> dict:
        """A JSON-ready summary (batch-averaged records; traces and snapshots omitted)."""
        return {
            "positions": self.positions.tolist(),
            "norm": self.norm.mean(axis=1).tolist(),
            "mean": self.mean.mean(axis=1).tolist(),
            "var": self.var.mean(axis=1).tolist(),
            "max_abs": self.max_abs.max(axis=1).tolist(),
            "retention": self.retention.mean(axis=1).tolist(),
            "conv_norm": self.conv_norm.mean(axis=1).tolist(),
            "mean_loss": float(self.losses.mean()),
        }


def _capture_graphdef(model: Mamba2LM):
    """The model's graph with every mixer sowing its SSD inputs (the model itself is left unchanged)."""
    flags = [block.mixer.capture_ssm_inputs for block in model.layers]
    try:
        for block in model.layers:
            block.mixer.capture_ssm_inputs = True
        graphdef, state = nnx.split(model)
    finally:
        for block, flag in zip(model.layers, flags):
            block.mixer.capture_ssm_inputs = flag
    return graphdef, state


@functools.lru_cache(maxsize=16)
def _chunk_function(graphdef, trace_heads: Tuple[Tuple[int, int], ...], trace_stride: int, snapshot_head):
    """A jitted step: one chunk through the model, returning losses, the new cache and all statistics."""

    def run(state, ids, targets, cache, mitigation, log_retention, offset):
        model = nnx.merge(graphdef, state)
        cfg = model.config
        forward = nnx.capture(lambda m: m.hidden_states(ids, cache=cache, mitigation=mitigation), nnx.Intermediate)
        (hidden, cache), captured = forward(model)
        logits = inference._mask_padded_vocab(model.logits_from_hidden(hidden), cfg.vocab_size)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
        per_layer = [captured["layers"][i]["mixer"]["captured_ssm_inputs"].get_value()[0] for i in range(cfg.n_layer)]

        # Retention of the first token: its write decays by alpha_1, alpha_2, ... (not alpha_0).
        positions = offset + jnp.arange(ids.shape[1])
        log_a = jnp.stack([p["log_a"] for p in per_layer], axis=2)  # (b, l, layers, heads)
        log_a = jnp.where((positions > 0)[None, :, None, None], log_a, 0.0)
        log_retention = log_retention + jnp.sum(log_a, axis=1)  # (b, layers, heads)

        states = jnp.stack([c.ssm_state for c in cache], axis=1)  # (b, layers, heads, p, n)
        stats = dict(
            norm=jnp.sqrt(jnp.sum(jnp.square(states), axis=(-2, -1))),
            mean=jnp.mean(states, axis=(-2, -1)),
            var=jnp.var(states, axis=(-2, -1)),
            max_abs=jnp.max(jnp.abs(states), axis=(-2, -1)),
            retention=jnp.exp(log_retention),
            log_retention=log_retention,
            conv_norm=jnp.stack([jnp.sqrt(jnp.sum(jnp.square(c.conv_state.astype(jnp.float32)), axis=(1, 2))) for c in cache], axis=1),
        )
        heads_per_group = cfg.nheads // cfg.ngroups
        traces = {}
        for layer, head in trace_heads:
            p = per_layer[layer]
            group = head // heads_per_group
            traces[f"dt[{layer}.{head}]"] = p["dt"][:, ::trace_stride, head]
            traces[f"B[{layer}.{group}]"] = p["B"][:, ::trace_stride, group].astype(jnp.float32)
            traces[f"x[{layer}.{head}]"] = p["x"][:, ::trace_stride, head].astype(jnp.float32)
        layer, head = snapshot_head
        snapshot = cache[layer].ssm_state[:, head]
        return nll, cache, log_retention, stats, traces, snapshot

    return jax.jit(run)


def record_states(
    model: Mamba2LM,
    tokens,
    *,
    every: int = 256,
    mitigation: Optional[mitigations_lib.Mitigation] = None,
    trace_heads: Sequence[Tuple[int, int]] = ((0, 0),),
    trace_stride: int = 1,
    snapshot_head: Tuple[int, int] = (0, 0),
    snapshot_positions: Sequence[int] = (),
    progress: bool = False,
) -> StateDiagnostics:
    """Streams ``tokens (batch, T)`` through ``model`` and records state statistics every ``every`` tokens.

    Args:
      every: record interval in tokens (also the streaming chunk length).
      mitigation: applied while streaming (see how each mitigation changes the state).
      trace_heads: ``(layer, head)`` pairs whose ``dt``, ``B`` (of the head's group) and ``x`` are traced.
      trace_stride: keep every ``trace_stride``-th token of the traces (bounded memory on long streams).
      snapshot_head: ``(layer, head)`` whose full state is stored at ``snapshot_positions``.
      snapshot_positions: positions (multiples of ``every``, or the stream end) for the state histograms.
    """
    cfg = model.config
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"`tokens` must be (batch, seqlen >= 2), got shape {tokens.shape}")
    if not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"`every` must be a positive int, got {every!r}")
    if not isinstance(trace_stride, (int, np.integer)) or trace_stride < 1 or every % trace_stride:
        raise ValueError(f"`trace_stride` must be a positive divisor of `every` ({every}), got {trace_stride!r}")
    for layer, head in list(trace_heads) + [tuple(snapshot_head)]:
        if not (0 <= layer < cfg.n_layer and 0 <= head < cfg.nheads):
            raise ValueError(f"(layer, head) = ({layer}, {head}) is outside the model ({cfg.n_layer} layers, {cfg.nheads} heads)")
    total = tokens.shape[1] - 1
    ends = list(range(every, total, every)) + [total]
    bad = [p for p in snapshot_positions if p not in ends]
    if bad:
        raise ValueError(f"snapshot_positions {bad} are not record positions (multiples of every={every} or {total})")

    mitigation = mitigations_lib.resolve(mitigation)
    graphdef, state = _capture_graphdef(model)
    run = _chunk_function(graphdef, tuple(map(tuple, trace_heads)), int(trace_stride), tuple(snapshot_head))
    batch = tokens.shape[0]
    cache = inference.init_cache(model, batch, mitigation)
    log_retention = jnp.zeros((batch, cfg.n_layer, cfg.nheads), jnp.float32)
    inputs, targets = jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)

    records: Dict[str, List[np.ndarray]] = {k: [] for k in ("norm", "mean", "var", "max_abs", "retention", "log_retention", "conv_norm")}
    traces: Dict[str, List[np.ndarray]] = {}
    snapshots, losses = {}, []
    starts = range(0, total, every)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="diagnostics", unit="chunk")
    for start in starts:
        end = min(start + every, total)
        nll, cache, log_retention, stats, chunk_traces, snapshot = run(
            state, inputs[:, start:end], targets[:, start:end], cache, mitigation, log_retention, start
        )
        losses.append(np.asarray(nll))
        for k, v in stats.items():
            records[k].append(np.asarray(v))
        for k, v in chunk_traces.items():
            traces.setdefault(k, []).append(np.asarray(v))
        if end in snapshot_positions:
            snapshots[end] = np.asarray(snapshot)

    stacked = {k: np.stack(v) for k, v in records.items()}
    trace_positions = np.concatenate([np.arange(s, min(s + every, total), trace_stride) for s in range(0, total, every)])
    return StateDiagnostics(
        positions=np.asarray(ends),
        trace_positions=trace_positions,
        traces={k: np.moveaxis(np.concatenate(v, axis=1), 1, 0) for k, v in traces.items()},
        snapshot_head=tuple(snapshot_head),
        snapshots=snapshots,
        losses=np.concatenate(losses, axis=1),
        **stacked,
    )


def calibrate_state_norm(model: Mamba2LM, tokens, *, every: int = 256, reduce: str = "max", margin: float = 1.0) -> np.ndarray:
    """Per-layer, per-head state-norm thresholds ``(layers, heads)`` for :func:`ssm_jax.mitigations.state_norm`.

    Streams the calibration prompt ``tokens (batch, T)`` -- usually ``T`` = the training length -- and
    takes, per head, the largest norm seen (``reduce="max"``) or the norm at the end (``"final"``),
    the maximum over the batch, times ``margin``.
    """
    if reduce not in ("max", "final"):
        raise ValueError(f"`reduce` must be 'max' or 'final', got {reduce!r}")
    if margin <= 0:
        raise ValueError(f"`margin` must be positive, got {margin}")
    diag = record_states(model, tokens, every=every)
    norms = diag.norm.max(axis=1)  # (records, layers, heads): worst batch row
    tau = norms.max(axis=0) if reduce == "max" else norms[-1]
    return np.maximum(tau * margin, np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------------------------------
# The collapse rule
# --------------------------------------------------------------------------------------------------

COLLAPSE_FACTOR = 2.0


def collapse_bucket_width(train_len: int) -> int:
    """The default bucket width of :func:`collapse_verdict`: ``max(128, T_train // 8)`` positions.

    Below ``T_train = 256`` that width leaves no bucket within ``T_train`` besides the first, so tiny
    (byte-level, test) models get ``T_train // 2`` instead: ``max(1, min(128, T // 2), T // 8)``.
    """
    train_len = int(train_len)
    return max(1, min(128, train_len // 2), train_len // 8)


def bucket_index(positions: np.ndarray, width: int) -> np.ndarray:
    """The bucket of each prediction position ``t >= 1`` (tokens read): bucket ``j`` holds ``t`` in
    ``[1 + j width, (j + 1) width]``."""
    return (np.asarray(positions, np.int64) - 1) // int(width)


def bucket_means(losses: np.ndarray, width: int) -> np.ndarray:
    """Per-position losses ``(T,)`` or ``(prompts, T)`` (position ``t = 1 .. T``), averaged over prompts and
    then over the buckets of :func:`bucket_index`: ``(ceil(T / width),)``; the last bucket may be partial."""
    losses = np.asarray(losses, np.float64)
    if losses.ndim == 2:
        losses = losses.mean(axis=0)  # (T,)
    idx = bucket_index(np.arange(1, losses.size + 1), width)  # (T,)
    return np.bincount(idx, weights=losses) / np.bincount(idx)


@dataclasses.dataclass(frozen=True)
class CollapseVerdict:
    """What :func:`collapse_verdict` found on one bucketed loss curve (positions are bucket starts)."""

    collapsed: bool
    first_position: Optional[int]  # first bucket beyond T_train whose loss exceeds factor x reference
    reference: float  # largest bucket loss within T_train, the first bucket excluded
    threshold: float  # factor x reference
    max_loss_after_train: float  # largest bucket loss beyond T_train
    max_ratio: float  # max_loss_after_train / reference
    factor: float
    bucket_width: int
    unigram_loss: Optional[float]  # a context-free model's loss (nats/token), when given
    first_position_above_unigram: Optional[int]  # first bucket after the first whose loss exceeds unigram_loss

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def collapse_verdict(
    bucket_loss: Sequence[float],
    train_len: int,
    *,
    width: Optional[int] = None,
    factor: float = COLLAPSE_FACTOR,
    unigram_loss: Optional[float] = None,
) -> CollapseVerdict:
    """The paper's collapse rule (arXiv 2410.07145, its T_forget test; docs/background.md), made robust: the
    model collapses when its loss beyond ``T_train`` exceeds ``factor`` times the largest loss it had within
    ``T_train``.

    Args:
      bucket_loss: the loss averaged over prompts and over buckets of ``width`` positions
        (:func:`bucket_means`; bucket ``j`` = positions ``[1 + j width, (j + 1) width]``). NaN buckets
        (no data) are ignored.
      train_len: ``T_train``.
      width: the bucket width; default :func:`collapse_bucket_width`.
      factor: 2.0 in the paper.
      unigram_loss: if given, also report the first position whose bucket loss exceeds it.

    The reference is the largest loss over the buckets lying entirely within ``[1, T_train]`` except the
    first: at a document start every model's loss is high (near the unigram loss), so a reference taken
    there gives a threshold that no loss can reach. A bucket straddling ``T_train`` counts on neither side.
    The same first bucket is skipped when looking for the unigram crossing.
    """
    loss = np.asarray(bucket_loss, np.float64)
    train_len = int(train_len)
    width = collapse_bucket_width(train_len) if width is None else int(width)
    if width < 1 or train_len < 1:
        raise ValueError(f"need width >= 1 and train_len >= 1, got width={width}, train_len={train_len}")
    n_within = train_len // width  # buckets 0 .. n_within - 1 end at or before T_train
    first_after = -(-train_len // width)  # buckets from here on start after T_train
    if n_within < 2:
        raise ValueError(
            f"train_len={train_len} spans {n_within} bucket(s) of width={width}; the reference "
            "excludes the first bucket, so it needs at least 2 (use a smaller width)"
        )
    if loss.ndim != 1 or loss.size <= first_after:
        raise ValueError(
            f"bucket_loss has shape {loss.shape}: the rule needs a 1-D curve reaching bucket "
            f"{first_after} (positions from {first_after * width + 1}, beyond train_len={train_len})"
        )
    within, after = loss[1:n_within], loss[first_after:]
    if not np.isfinite(within).any():
        raise ValueError(f"bucket_loss has no finite bucket within train_len={train_len} besides the first")
    reference = float(np.nanmax(within))
    threshold = factor * reference
    over = np.flatnonzero(np.nan_to_num(after, nan=-np.inf) > threshold)
    max_after = float(np.nanmax(after)) if np.isfinite(after).any() else float("nan")
    above = None
    if unigram_loss is not None:
        crossed = np.flatnonzero(np.nan_to_num(loss[1:], nan=-np.inf) > unigram_loss)
        above = int((crossed[0] + 1) * width + 1) if crossed.size else None
    return CollapseVerdict(
        collapsed=bool(over.size),
        first_position=int((over[0] + first_after) * width + 1) if over.size else None,
        reference=reference,
        threshold=threshold,
        max_loss_after_train=max_after,
        max_ratio=max_after / reference if reference > 0 else float("inf"),
        factor=float(factor),
        bucket_width=width,
        unigram_loss=None if unigram_loss is None else float(unigram_loss),
        first_position_above_unigram=above,
    )


@dataclasses.dataclass(frozen=True)
class StateOutlier:
    layer: int
    head: int
    first_position: int
    ratio: float  # largest norm after T_train / largest norm within T_train


def detect_state_outliers(diag: StateDiagnostics, train_len: int, *, ratio: float = 4.0) -> List[StateOutlier]:
    """Heads whose state norm exceeds ``ratio`` x the largest norm they had within the first ``train_len``
    tokens (batch-averaged): the out-of-distribution channels that the paper blames for collapse."""
    norms = diag.norm.mean(axis=1)  # (records, layers, heads)
    inside = diag.positions <= train_len
    if not inside.any() or inside.all():
        raise ValueError(f"train_len={train_len} must lie inside the recorded positions {diag.positions[0]}..{diag.positions[-1]}")
    reference = norms[inside].max(axis=0)  # (layers, heads)
    after = norms[~inside]
    outliers = []
    for layer, head in zip(*np.nonzero(after.max(axis=0) > ratio * reference)):
        first = int(np.argmax(after[:, layer, head] > ratio * reference[layer, head]))
        outliers.append(
            StateOutlier(
                layer=int(layer),
                head=int(head),
                first_position=int(diag.positions[~inside][first]),
                ratio=float(after[:, layer, head].max() / max(reference[layer, head], 1e-30)),
            )
        )
    return outliers


def state_norm_growth(norm: np.ndarray, positions: np.ndarray, train_len: int) -> Dict[str, np.ndarray]:
    """How far each head's state norm leaves the range it had within the training length.

    ``norm (records, layers, heads)`` recorded at ``positions``. Returns ``(layers, heads)`` arrays:

    * ``peak``: largest norm after ``train_len`` / largest norm within it. Sensitive to single spikes (a
      longer stream simply meets more unusual text), so it overstates growth on natural text;
    * ``sustained``: median norm over the second half of the stream / median norm within ``train_len``:
      the steady drift that the paper blames for collapse (a head that never forgets grows here).
    """
    norm = np.asarray(norm, np.float64)
    positions = np.asarray(positions)
    inside = positions <= train_len
    late = positions > positions[-1] / 2
    if not inside.any() or inside.all() or not (late & ~inside).any():
        raise ValueError(f"train_len={train_len} must lie inside the recorded positions {positions[0]}..{positions[-1]}, well before their end")
    tiny = np.finfo(np.float64).tiny
    return {
        "peak": norm[~inside].max(axis=0) / np.maximum(norm[inside].max(axis=0), tiny),
        "sustained": np.median(norm[late], axis=0) / np.maximum(np.median(norm[inside], axis=0), tiny),
    }


def plot_all(diag: StateDiagnostics, directory: str, *, train_len: Optional[int] = None, prefix: str = "") -> List[str]:
    """Writes the paper's diagnostic figures for ``diag`` into ``directory``; returns the PNG paths."""
    from ssm_jax import plots

    layer, head = diag.snapshot_head
    paths = [
        plots.plot_state_norm_heatmap(diag.positions, diag.norm.mean(axis=1), f"{directory}/{prefix}state_norm_heatmap.png", train_len=train_len),
        plots.plot_state_norm_curves(diag.positions, diag.norm.mean(axis=1), f"{directory}/{prefix}state_norm.png", train_len=train_len),
        plots.plot_retention(diag.positions, diag.retention.mean(axis=1), f"{directory}/{prefix}retention.png", layer=layer, train_len=train_len),
    ]
    if diag.snapshots:
        paths.append(
            plots.plot_state_histograms(
                {p: s[0] for p, s in diag.snapshots.items()}, f"{directory}/{prefix}state_histograms.png", layer=layer, head=head
            )
        )
    if diag.traces:
        summary = {}
        for name, values in diag.traces.items():
            values = values[:, 0]  # first batch row
            summary[name if values.ndim == 1 else f"|{name}|"] = values if values.ndim == 1 else np.abs(values)
        paths.append(plots.plot_traces(np.maximum(diag.trace_positions, 1), summary, f"{directory}/{prefix}traces.png", train_len=train_len))
    return paths
