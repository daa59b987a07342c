"""Matplotlib figures (PNG) for diagnostics, training and evaluation; all headless (Agg backend)."""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path: str) -> str:
    """Saves ``fig`` as a PNG at ``path`` (creating the directory) and closes it; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# State diagnostics (ssm_jax.diagnostics)
# --------------------------------------------------------------------------------------------------


def plot_state_norm_heatmap(
    positions: np.ndarray, norms: np.ndarray, path: str, *, train_len: Optional[int] = None, title: str = "SSM state norm"
) -> str:
    """Heatmap of the state Frobenius norm: rows ``layer.head``, columns positions (log colour scale).

    Args:
      positions: ``(num_records,)`` token positions.
      norms: ``(num_records, layers, heads)``.
    """
    n_rec, layers, heads = norms.shape
    grid = norms.reshape(n_rec, layers * heads).T  # (layers * heads, num_records)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.08 * layers * heads + 1.5)))
    positive = grid[grid > 0]
    vmin = float(positive.min()) if positive.size else 1e-6
    mesh = ax.pcolormesh(
        np.arange(n_rec + 1),
        np.arange(layers * heads + 1),
        np.maximum(grid, vmin),
        norm=matplotlib.colors.LogNorm(vmin=vmin, vmax=max(float(grid.max()), vmin * 10)),
        shading="flat",
        cmap="magma",
    )
    fig.colorbar(mesh, ax=ax, label="||h||_F")
    ticks = np.linspace(0, n_rec - 1, min(n_rec, 8)).astype(int)
    ax.set_xticks(ticks + 0.5)
    ax.set_xticklabels([f"{int(positions[t]):,}" for t in ticks], rotation=30)
    ax.set_yticks(np.arange(0, layers * heads, heads) + heads / 2)
    ax.set_yticklabels([f"layer {i}" for i in range(layers)])
    ax.set_xlabel("position (tokens)")
    if train_len is not None:
        after = np.searchsorted(positions, train_len, side="right")  # cells are records at `positions`
        ax.axvline(after, color="cyan", linestyle="--", label=f"T_train = {train_len:,}")
        ax.legend(loc="upper left")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_state_norm_curves(
    positions: np.ndarray, norms: np.ndarray, path: str, *, train_len: Optional[int] = None, layers: Optional[Sequence[int]] = None
) -> str:
    """State norm vs position, one panel per layer, one line per head (log-log axes)."""
    layers = list(range(norms.shape[1])) if layers is None else list(layers)
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    for ax, layer in zip(axes.flat, layers):
        for head in range(norms.shape[2]):
            ax.plot(positions, norms[:, layer, head], linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}")
        if train_len is not None:
            ax.axvline(train_len, color="k", linestyle="--", linewidth=0.8)
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    fig.supxlabel("position (tokens)")
    fig.supylabel("||h||_F per head")
    return save_figure(fig, path)


def plot_retention(positions: np.ndarray, retention: np.ndarray, path: str, *, layer: int = 0, train_len: Optional[int] = None) -> str:
    """Cumulative retention ``prod alpha`` of the first token vs position for every head of ``layer``."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for head in range(retention.shape[2]):
        ax.plot(positions, retention[:, layer, head], label=f"head {head}" if retention.shape[2] <= 12 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("position t (tokens)")
    ax.set_ylabel("prod_{j<=t} alpha_j")
    ax.set_title(f"retention of the first token, layer {layer}")
    if train_len is not None:
        ax.axvline(train_len, color="k", linestyle="--", linewidth=0.8, label="T_train")
    if retention.shape[2] <= 12:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_state_histograms(snapshots: Mapping[int, np.ndarray], path: str, *, layer: int, head: int) -> str:
    """Histograms of one head's state elements at several positions (``{position: state (p, n)}``)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    values = [np.ravel(v) for v in snapshots.values()]
    top = max(float(np.max(np.abs(v))) for v in values) if values else 1.0
    bins = np.linspace(-top, top, 81)
    for position, v in zip(snapshots, values):
        ax.hist(v, bins=bins, alpha=0.5, label=f"t = {position:,}", log=True)
    ax.set_xlabel("state element")
    ax.set_ylabel("count")
    ax.set_title(f"state of layer {layer}, head {head}")
    ax.legend()
    return save_figure(fig, path)


def plot_traces(positions: np.ndarray, traces: Mapping[str, np.ndarray], path: str, *, train_len: Optional[int] = None) -> str:
    """One panel per trace (``name -> (num_records, ...)``; extra axes are drawn as several lines)."""
    fig, axes = plt.subplots(len(traces), 1, figsize=(9, 2.4 * len(traces)), squeeze=False, sharex=True)
    for ax, (name, values) in zip(axes[:, 0], traces.items()):
        values = np.asarray(values).reshape(len(positions), -1)
        ax.plot(positions, values, linewidth=0.6)
        ax.set_ylabel(name)
        if train_len is not None:
            ax.axvline(train_len, color="k", linestyle="--", linewidth=0.8)
    axes[-1, 0].set_xscale("log")
    axes[-1, 0].set_xlabel("position (tokens)")
    return save_figure(fig, path)


def plot_loss_vs_position(
    curves: Mapping[str, Dict[str, np.ndarray]],
    path: str,
    *,
    train_len: Optional[int] = None,
    perplexity: bool = True,
    title: str = "loss vs position",
) -> str:
    """Per-token loss (or perplexity) vs position, one curve per label: ``{label: {"positions", "loss"}}``."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in curves.items():
        loss = np.asarray(curve["loss"], np.float64)
        ax.plot(np.asarray(curve["positions"]), np.exp(loss) if perplexity else loss, label=label, linewidth=1.2)
    ax.set_xscale("log")
    if perplexity:
        ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("perplexity" if perplexity else "loss (nats)")
    if train_len is not None:
        ax.axvline(train_len, color="k", linestyle="--", linewidth=0.9, label=f"T_train = {train_len:,}")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Evaluation (ssm_jax.evaluators): passkey heatmaps and the state-capacity study
# --------------------------------------------------------------------------------------------------


def plot_passkey_heatmaps(
    accuracies: Mapping[str, np.ndarray],
    context_lengths: Sequence[int],
    path: str,
    *,
    train_len: Optional[int] = None,
    title: str = "passkey accuracy",
) -> str:
    """Passkey accuracy heatmaps, one panel per label: ``{label: (depth buckets, context lengths)}`` in [0, 1].

    Cells show their accuracy when the grid is small; a dashed line separates the context lengths up to
    ``train_len`` from the longer ones.
    """
    labels = list(accuracies)
    n_len = max(1, len(context_lengths))
    cols = min(3, max(1, len(labels)))
    rows = -(-len(labels) // cols)
    panel_w = max(2.6, 0.55 * n_len + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols + 1.2, 3.8 * rows), squeeze=False, sharey=True, constrained_layout=True)
    mesh = None
    lengths = np.asarray(context_lengths, np.float64)
    for k, (ax, label) in enumerate(zip(axes.flat, labels)):
        acc = np.asarray(accuracies[label], np.float64)
        depths = acc.shape[0]
        mesh = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        if acc.size <= 120:
            for (i, j), v in np.ndenumerate(acc):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(np.arange(len(context_lengths)))
        ax.set_xticklabels([f"{int(n):,}" for n in context_lengths], rotation=45, fontsize=7)
        ax.set_yticks(np.arange(depths))
        ax.set_yticklabels([f"{d / depths:.1f}" for d in range(depths)], fontsize=7)
        if k % cols == 0:
            ax.set_ylabel("needle depth (bucket start)")
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_title(label, fontsize=10)
        if train_len is not None and lengths.size and lengths[0] <= train_len < lengths[-1]:
            # Between the longest context <= T_train and the next one.
            ax.axvline(np.searchsorted(lengths, train_len, side="right") - 0.5, color="k", linestyle="--", linewidth=1.2)
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    if mesh is not None:
        fig.colorbar(mesh, ax=axes.ravel().tolist(), label="accuracy", shrink=0.8)
    fig.suptitle(title + ("" if train_len is None else f" (dashed line: T_train = {train_len:,})"))
    return save_figure(fig, path)


def plot_capacity(points: Sequence[Mapping], fits: Mapping[str, Optional[Mapping]], path: str, *, title: str = "state capacity") -> str:
    """T_forget and T_recall (K tokens) vs state size N_S (millions): points, our fits and the paper's fits.

    ``points``: ``[{"n_s_millions", "t_forget_k", "t_recall_k"}, ...]`` (missing values skipped; a
    ``t_forget_bound`` of "upper" is drawn as a downward triangle);
    ``fits``: ``{"forget": {"a", "b"} or None, "recall": {"a", "b", "c"} or None}``.
    """
    from ssm_jax import capacity as capacity_lib

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [p["n_s_millions"] for p in points]
    top = max(xs) * 1.15 if xs else 1.0
    grid = np.linspace(0.0, top, 200)
    specs = (
        ("forget", "t_forget_k", "T_forget (K tokens)", capacity_lib.linear_law, capacity_lib.paper_t_forget, "paper: 5.172 N_S - 4.469"),
        (
            "recall",
            "t_recall_k",
            "T_recall (K tokens)",
            capacity_lib.exponential_law,
            capacity_lib.paper_t_recall,
            "paper: 4.756 (1.365^N_S - 1) - 0.742",
        ),
    )
    for ax, (key, field, ylabel, law, paper, paper_label) in zip(axes, specs):
        bound_of = lambda p: p.get("t_forget_bound", "exact") if key == "forget" else "exact"
        exact = [p for p in points if p.get(field) is not None and bound_of(p) == "exact"]
        upper = [p for p in points if p.get(field) is not None and bound_of(p) == "upper"]
        if exact or not upper:
            ax.scatter([p["n_s_millions"] for p in exact], [p[field] for p in exact], color="C0", zorder=3, label="measured")
        if upper:
            ax.scatter(
                [p["n_s_millions"] for p in upper],
                [p[field] for p in upper],
                color="C0",
                marker="v",
                zorder=3,
                label="upper bound (no collapse at the shortest T_train)",
            )
        fit = fits.get(key)
        if fit:
            params = {k: fit[k] for k in (("a", "b") if key == "forget" else ("a", "b", "c"))}
            text = (
                f"fit: {fit['a']:.3g} N_S + {fit['b']:.3g}" if key == "forget" else f"fit: {fit['a']:.3g} ({fit['b']:.3g}^N_S - 1) + {fit['c']:.3g}"
            )
            ax.plot(grid, law(grid, **params), color="C0", label=text)
        ax.plot(grid, paper(grid), color="C3", linestyle="--", label=paper_label)
        ax.set_xlabel("state size N_S (millions)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Training (ssm_jax.train_lib)
# --------------------------------------------------------------------------------------------------


def plot_training_curves(metrics_path: str, path: str, *, title: str = "training", reference_bits: Optional[float] = None) -> str:
    """Loss curves from a ``metrics.jsonl`` (ssm_jax.metrics_writer): train and validation loss in bits per
    token against the step, the learning rate on a second axis, and optionally a horizontal reference
    (e.g. the unigram entropy of the validation data)."""
    from ssm_jax.metrics_writer import read_metrics

    train = read_metrics(metrics_path, "train")
    val = read_metrics(metrics_path, "validation")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot([r["step"] for r in train], [r["bits_per_token"] for r in train], color="C0", lw=1, label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["bits_per_token"] for r in val], "o-", color="C3", label="validation")
    if reference_bits is not None:
        ax.axhline(reference_bits, color="0.3", ls=":", label=f"unigram entropy {reference_bits:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (bits per token)")
    ax.grid(alpha=0.3)
    if train and any("lr" in r for r in train):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r.get("lr", np.nan) for r in train], color="0.6", lw=0.8, ls="--")
        ax2.set_ylabel("learning rate", color="0.4")
    ax.legend(loc="upper right")
    ax.set_title(title)
    return save_figure(fig, path)
