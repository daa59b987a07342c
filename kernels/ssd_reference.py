"""The SSD recurrence step by step: the definition every fast path is compared with, at the bottom of the imports.

Per head, with ``alpha_t = exp(log_a_t)`` and a ``(headdim, state)`` state ``h``::

    h_t = alpha_t * h_{t-1} + dt_in_t * x_t B_t^T        y_t = h_t C_t

(the ``D`` skip is added by :func:`ssm_jax.ssd`). The kernels need it (the stepwise kernel differentiates it in
its backward pass) and :mod:`ssm_jax.ssd` exposes it as ``impl="recurrent"``; it lives here, below both, so
that the kernels never import :mod:`ssm_jax.ssd`. It imports nothing from the project.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def matmul_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for 32/64-bit operands: the references must not silently drop to TF32 / bf16 passes on GPU and TPU."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else jax.lax.Precision.DEFAULT


def clip_norm(state: Array, max_norm) -> Array:
    """``state (..., heads, headdim, n) * min(1, max_norm / ||state||_F)`` per head (state normalisation)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(state), axis=(-2, -1)))  # (..., heads)
    bound = jnp.broadcast_to(jnp.asarray(max_norm, state.dtype), norm.shape)
    scale = jnp.minimum(1.0, bound / jnp.maximum(norm, jnp.finfo(state.dtype).tiny))
    return state * scale[..., None, None]


def expand_groups(M: Array, heads: int) -> Array:
    """``(batch, seqlen, groups, n) -> (batch, seqlen, heads, n)`` (head h reads group h // (heads/groups))."""
    return jnp.repeat(M, heads // M.shape[2], axis=2)


def ssd_recurrent(
    x: Array,
    dt_in: Array,
    log_a: Array,
    B: Array,
    C: Array,
    initial_state: Optional[Array],
    doc: Optional[Array],
    *,
    max_norm=None,
    window: Optional[int] = None,
) -> Tuple[Array, Array]:
    """Step-by-step recurrence (without the ``D`` skip). Returns ``y (b, l, h, p)`` in the accumulation
    dtype and the final state.

    Args:
      x: ``(b, l, h, p)``; dt_in, log_a: ``(b, l, h)`` input weights and log-decays; B, C: ``(b, l, g, n)``.
      initial_state: ``(b, h, p, n)`` or None (zeros); doc: ``(b, l)`` document ids or None (the state restarts
        from zero wherever the id changes).
      max_norm: state normalisation after every step (a scalar or ``(h,)``), or None.
      window: keep only the last ``window`` inputs. The recurrence carries the lagged state ``g_t = h_{t-window}``
        and a running sum of the last ``window`` log-decays (never a product) and outputs
        ``C_t (h_t - exp(S_t) g_t)`` (the state-difference sliding window of Chen et al. 2024, arXiv 2410.07145,
        section 4; docs/background.md).
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    acc = accumulation_dtype(x.dtype)
    # Cast before broadcasting to heads: the gradient of a group is the sum over its heads, which then runs
    # in the accumulation dtype (the other order sums up to 24 bf16 terms in bf16: 6e-3 relative error).
    Bh = expand_groups(B.astype(acc), h)  # (b, l, h, n)
    Ch = expand_groups(C.astype(acc), h)  # (b, l, h, n)
    u = x.astype(acc) * dt_in[..., None]  # (b, l, h, p)
    reset = jnp.zeros((b, l), bool) if doc is None else jnp.concatenate([jnp.zeros((b, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    h0 = jnp.zeros((b, h, p, n), acc) if initial_state is None else initial_state.astype(acc)

    def advance(state, u_t, B_t, log_a_t, reset_t):
        alpha = jnp.where(reset_t[:, None], 0.0, jnp.exp(log_a_t))  # (b, h)
        return alpha[..., None, None] * state + u_t[..., None] * B_t[..., None, :]

    time_major = lambda a: jnp.moveaxis(a, 1, 0)

    if window is None:

        def step(state, inputs):
            u_t, B_t, C_t, log_a_t, reset_t = inputs
            state = advance(state, u_t, B_t, log_a_t, reset_t)
            if max_norm is not None:
                state = clip_norm(state, max_norm)
            return state, jnp.einsum("bhpn,bhn->bhp", state, C_t, precision=matmul_precision(acc))

        final, y = jax.lax.scan(step, h0, tuple(map(time_major, (u, Bh, Ch, log_a, reset))))
        return time_major(y), final

    r = int(window)

    def lag(a):  # a[t - r] at position t (zeros before the start)
        pad = jnp.zeros((a.shape[0], r) + a.shape[2:], a.dtype)
        return jnp.concatenate([pad, a], axis=1)[:, :l]

    positions = jnp.arange(l, dtype=jnp.int32)

    def step(carry, inputs):
        state, lagged, log_decay_sum, resets_in_window = carry
        t, u_t, B_t, C_t, log_a_t, reset_t, u_l, B_l, log_a_l, reset_l = inputs
        state = advance(state, u_t, B_t, log_a_t, reset_t)
        # The lagged state h_{t-r}: zero before position -1, the initial state at t - r = -1.
        lagged = jnp.where(t >= r, advance(lagged, u_l, B_l, log_a_l, reset_l), jnp.where(t == r - 1, h0, jnp.zeros_like(h0)))
        leaving = t >= r
        log_decay_sum = log_decay_sum + log_a_t - jnp.where(leaving, log_a_l, 0.0)
        resets_in_window = resets_in_window + reset_t.astype(jnp.int32) - jnp.where(leaving, reset_l, False).astype(jnp.int32)
        decay = jnp.where(resets_in_window[:, None] > 0, 0.0, jnp.exp(log_decay_sum))  # (b, h)
        windowed = state - decay[..., None, None] * lagged
        y_t = jnp.einsum("bhpn,bhn->bhp", windowed, C_t, precision=matmul_precision(acc))
        return (state, lagged, log_decay_sum, resets_in_window), (y_t, windowed)

    carry0 = (h0, jnp.zeros_like(h0), jnp.zeros((b, h), acc), jnp.zeros((b,), jnp.int32))
    xs = (positions,) + tuple(map(time_major, (u, Bh, Ch, log_a, reset, lag(u), lag(Bh), lag(log_a), lag(reset))))

    def step_y(carry, inputs):
        carry, (y_t, _) = step(carry, inputs)
        return carry, y_t

    carry, y = jax.lax.scan(step_y, carry0, xs)
    state, lagged, log_decay_sum, resets_in_window = carry
    decay = jnp.where(resets_in_window[:, None] > 0, 0.0, jnp.exp(log_decay_sum))
    return time_major(y), state - decay[..., None, None] * lagged
