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


def plot_state_norm_heatmap(positions: np.ndarray, norms: np.ndarray, path: str, *, train_len: Optional[int] = None,
                            title: str = "SSM state norm") -> str:
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
    mesh = ax.pcolormesh(np.arange(n_rec + 1), np.arange(layers * heads + 1), np.maximum(grid, vmin),
                         norm=matplotlib.colors.LogNorm(vmin=vmin, vmax=max(float(grid.max()), vmin * 10)),
                         shading="flat", cmap="magma")
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


def plot_state_norm_curves(positions: np.ndarray, norms: np.ndarray, path: str, *, train_len: Optional[int] = None,
                           layers: Optional[Sequence[int]] = None) -> str:
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
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    fig.supxlabel("position (tokens)")
    fig.supylabel("||h||_F per head")
    return save_figure(fig, path)


def plot_retention(positions: np.ndarray, retention: np.ndarray, path: str, *, layer: int = 0,
                   train_len: Optional[int] = None) -> str:
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


def plot_traces(positions: np.ndarray, traces: Mapping[str, np.ndarray], path: str, *,
                train_len: Optional[int] = None) -> str:
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


def plot_loss_vs_position(curves: Mapping[str, Dict[str, np.ndarray]], path: str, *, train_len: Optional[int] = None,
                          perplexity: bool = True, title: str = "loss vs position") -> str:
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
