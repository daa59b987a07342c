"""Per-token losses of long streams, summed into position buckets on the host while streaming.

A prediction's position ``t`` is the number of tokens read so far (``t = 1`` predicts the second token);
a stream of ``length`` L scores ``t = 1 .. L``. Losses go into two sets of buckets at once:

* log-spaced buckets (:func:`log_bucket_edges`): the perplexity-vs-position curves;
* fixed buckets of the collapse rule (:func:`ssm_jax.diagnostics.bucket_index`), which
  :func:`ssm_jax.diagnostics.collapse_verdict` reads.

The device holds one chunk and the O(1) recurrent cache, the host only the bucket sums, so memory does
not grow with the length (1M tokens and beyond).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from ssm_jax import inference
from ssm_jax import mitigations as mitigations_lib
from ssm_jax.diagnostics import bucket_index
from ssm_jax.model import Mamba2LM

__all__ = ["LOG_EVERY_TOKENS", "log_bucket_edges", "BucketedLosses", "stream_bucketed_losses"]

LOG_EVERY_TOKENS = 131072


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
    """Host-side sums of per-token losses (nats): per row and bucket, and the number of positions per bucket."""

    log_edges: np.ndarray  # (log buckets + 1,)
    log_sums: np.ndarray  # (rows, log buckets)
    log_counts: np.ndarray  # (log buckets,)
    fine_width: int  # width of the collapse rule's fixed buckets
    fine_sums: np.ndarray  # (rows, fixed buckets)
    fine_counts: np.ndarray  # (fixed buckets,)
    seconds: float = 0.0
    tokens: int = 0

    def log_mean(self) -> np.ndarray:
        """``(rows, log buckets)`` mean loss per log bucket."""
        return self.log_sums / self.log_counts

    def fine_mean(self) -> np.ndarray:
        """``(rows, fixed buckets)`` mean loss per fixed bucket."""
        return self.fine_sums / self.fine_counts


def _add(idx: np.ndarray, nll: np.ndarray, rows: Sequence[int], sums: np.ndarray, counts: Optional[np.ndarray]) -> None:
    """Adds ``nll (len(rows), c)`` at bucket indices ``idx (c,)`` (non-decreasing) into ``sums`` / ``counts``."""
    lo = int(idx[0])
    span = int(idx[-1]) - lo + 1
    for i, row in enumerate(rows):
        sums[row, lo : lo + span] += np.bincount(idx - lo, weights=nll[i], minlength=span)
    if counts is not None:
        counts[lo : lo + span] += np.bincount(idx - lo, minlength=span)


def stream_bucketed_losses(
    model: Mamba2LM,
    stream: Any,
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
    """Streams ``num_prompts`` prompts (rows of ``stream``, see :mod:`ssm_jax.evaluators.streams`) through
    ``model`` in chunks of ``chunk_len``, carrying conv and SSM state, and sums the losses of the
    predictions at ``t = 1 .. length`` into ``log_edges`` buckets and fixed buckets of ``fine_width``.

    Prompts run ``batch_size`` rows at a time, every chunk but the last of the same shape (one compile).
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    mitigation = mitigations_lib.resolve(mitigation)
    fn, state = inference.chunk_loss_function(model)
    n_log = len(log_edges) - 1
    n_fine = -(-length // fine_width)
    out = BucketedLosses(
        log_edges=np.asarray(log_edges),
        log_sums=np.zeros((num_prompts, n_log)),
        log_counts=np.zeros(n_log),
        fine_width=int(fine_width),
        fine_sums=np.zeros((num_prompts, n_fine)),
        fine_counts=np.zeros(n_fine),
    )
    start_time = time.perf_counter()
    for first in range(0, num_prompts, batch_size):
        rows = list(range(first, min(first + batch_size, num_prompts)))
        cache = inference.init_cache(model, len(rows), mitigation)
        prev = stream.take(rows, 1)  # (rows, 1): the token read before the first prediction
        done, next_log = 0, log_every
        while done < length:
            c = min(chunk_len, length - done)
            new = stream.take(rows, c)  # (rows, c)
            seq = np.concatenate([prev, new], axis=1)  # (rows, c + 1)
            nll, cache = fn(state, jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:]), cache, mitigation)
            nll = np.asarray(nll, np.float64)  # (rows, c)
            prev = new[:, -1:]
            t = np.arange(done + 1, done + c + 1)  # (c,) tokens read at each prediction
            counts_too = first == 0  # every batch covers the same positions: count them once
            _add(np.searchsorted(log_edges, t, side="right") - 1, nll, rows, out.log_sums, out.log_counts if counts_too else None)
            _add(bucket_index(t, fine_width), nll, rows, out.fine_sums, out.fine_counts if counts_too else None)
            done += c
            if done >= next_log or done == length:
                rate = (done * len(rows) + first * length) / max(time.perf_counter() - start_time, 1e-9)
                logging.info(
                    "%s prompts %d-%d: %d / %d tokens (%.0f tok/s), mean loss of this chunk %.3f",
                    label,
                    rows[0],
                    rows[-1],
                    done,
                    length,
                    rate,
                    float(nll.mean()),
                )
                while next_log <= done:
                    next_log += log_every
    out.seconds = time.perf_counter() - start_time
    out.tokens = num_prompts * length
    return out
