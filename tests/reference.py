"""Float64 NumPy definitions that the fast paths are tested against (written for clarity, not speed)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def resets_from_segments(segment_ids: Optional[np.ndarray], batch: int, seqlen: int) -> np.ndarray:
    """(batch, seqlen) bool: True where the state must restart (the id differs from the previous one)."""
    reset = np.zeros((batch, seqlen), bool)
    if segment_ids is not None:
        reset[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return reset


def ssd_reference(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    initial_state=None,
    segment_ids=None,
    alpha_scale=1.0,
    b_scale=1.0,
    dt_scale=1.0,
    max_norm=None,
    window=None,
):
    """The Mamba-2 recurrence, step by step in float64, with every mitigation from its definition.

    The sliding window is evaluated as the explicit band sum over the last `window` inputs (not via the
    lagged-state formula that the implementations use), so both sides are independent.
    Returns (y (b, l, h, p), final_state (b, h, p, n)).
    """
    x, dt, A, B, C = (np.asarray(v, np.float64) for v in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    head_group = np.arange(h) // (h // g)
    Bh, Ch = B[:, :, head_group], C[:, :, head_group]  # (b, l, h, n)
    dt = dt * np.broadcast_to(np.asarray(dt_scale, np.float64), (h,))
    alpha = np.exp(dt * A) * np.broadcast_to(np.asarray(alpha_scale, np.float64), (h,))  # (b, l, h)
    reset = resets_from_segments(None if segment_ids is None else np.asarray(segment_ids), b, l)
    alpha = np.where(reset[..., None], 0.0, alpha)
    u = x * (dt * np.broadcast_to(np.asarray(b_scale, np.float64), (h,)))[..., None]  # (b, l, h, p)
    h0 = np.zeros((b, h, p, n)) if initial_state is None else np.asarray(initial_state, np.float64)
    y = np.zeros((b, l, h, p))

    if window is None:
        state = h0.copy()
        for t in range(l):
            state = alpha[:, t, :, None, None] * state + u[:, t, :, :, None] * Bh[:, t, :, None, :]
            if max_norm is not None:
                norm = np.sqrt((state**2).sum(axis=(-2, -1)))
                bound = np.broadcast_to(np.asarray(max_norm, np.float64), (h,))
                state = state * np.minimum(1.0, bound / np.maximum(norm, 1e-300))[..., None, None]
            y[:, t] = np.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        final = state
    else:
        for t in range(l):
            state = np.zeros((b, h, p, n))
            for s in range(max(0, t - window + 1), t + 1):
                decay = np.prod(alpha[:, s + 1 : t + 1], axis=1)  # (b, h)
                state += decay[..., None, None] * u[:, s, :, :, None] * Bh[:, s, :, None, :]
            if t - window < -1:  # the initial state sits at position -1
                state += np.prod(alpha[:, : t + 1], axis=1)[..., None, None] * h0
            y[:, t] = np.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        final = state
    if D is not None:
        y = y + np.asarray(D, np.float64)[:, None] * x
    return y, final


def random_ssd_inputs(rng: np.random.Generator, batch=2, seqlen=37, heads=4, headdim=8, groups=2, state=16, dt_range=(0.01, 0.5), A_range=(0.5, 4.0)):
    """Random, non-degenerate inputs: dt across decades, A spanning slow and fast heads."""
    x = rng.standard_normal((batch, seqlen, heads, headdim))
    dt = np.exp(rng.uniform(np.log(dt_range[0]), np.log(dt_range[1]), (batch, seqlen, heads)))
    A = -rng.uniform(*A_range, heads)
    B = rng.standard_normal((batch, seqlen, groups, state)) / np.sqrt(state)
    C = rng.standard_normal((batch, seqlen, groups, state)) / np.sqrt(state)
    D = rng.standard_normal(heads)
    h0 = rng.standard_normal((batch, heads, headdim, state))
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0)


def random_segment_ids(rng: np.random.Generator, batch: int, seqlen: int, num_breaks: int = 3) -> np.ndarray:
    """Segment ids with a few random boundaries per row (and an id that repeats non-contiguously)."""
    seg = np.zeros((batch, seqlen), np.int32)
    for i in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seqlen), size=min(num_breaks, seqlen - 1), replace=False))
        ids = np.zeros(seqlen, np.int32)
        for j, cut in enumerate(cuts):
            ids[cut:] = (j + 1) % 2 + 7  # ids alternate 8, 7, 8 ...: a change, not a new value, resets
        seg[i] = ids
    return seg
