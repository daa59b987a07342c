"""State-collapse mitigations as pure values that transform the SSM state update.

A mitigation never mutates a model: it is a small pytree passed as ``mitigation=`` to
:func:`ssm_jax.ssd`, to the model call and to the streaming / generation functions, which apply
it to every layer and head. The transforms (the training-free mitigations of Chen et al. 2024, arXiv 2410.07145;
our summary in docs/background.md):

* :func:`forget_more` -- ``alpha_t <- alpha_scale * alpha_t`` (``log alpha_t += log alpha_scale``)
  and ``B_t <- b_scale * B_t``. Published values: ``alpha_scale=0.9999, b_scale=0.75``.
* :func:`dt_scale` -- ``dt <- c * dt`` (the LongMamba baseline, ``c = 0.5``), which scales both
  the log-decay and the input weight.
* :func:`state_norm` -- ``h <- h * min(1, max_norm / ||h||_F)`` per head after every update
  (recurrent form, streaming); the chunked forms apply it at chunk boundaries only.
* :func:`sliding_window` -- ``h_t <- h_t - (prod of the last `window` alphas) h_{t-window}``, i.e.
  the state only holds the last ``window`` inputs. The chunked forms compute it exactly as SSD with
  a band mask ``t - window < s <= t``; the cost of the quadratic part grows to
  ``O(L (window + Q) (N + P))`` because every chunk also reads ``ceil((window - 1) / Q)`` earlier chunks.

Each parameter may be a Python scalar, an array of shape ``(heads,)`` (per head) or of shape
``(layers, heads)`` / ``(layers, 1)`` (per layer and head); the model picks its layer's row with
:meth:`Mitigation.for_layer`. Compose several with :func:`compose` or ``a | b``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[float, np.ndarray, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mitigation:
    """A composable transform of the SSM state update; ``None`` fields are inactive.

    Attributes:
      alpha_scale: multiplies the per-step decay ``alpha_t`` (in (0, 1]).
      b_scale: multiplies ``B_t`` (the write strength of each input into the state).
      dt_scale: multiplies ``dt_t`` before it is used (decay and input weight).
      max_norm: per-head bound on the Frobenius norm of the state (state normalisation).
      window: keep only the contribution of the last ``window`` tokens (static).
    """

    alpha_scale: Optional[ArrayLike] = None
    b_scale: Optional[ArrayLike] = None
    dt_scale: Optional[ArrayLike] = None
    max_norm: Optional[ArrayLike] = None
    window: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, (int, np.integer)) or self.window < 1):
            raise ValueError(f"sliding_window: `window` must be a positive int, got {self.window!r}")
        if self.window is not None and self.max_norm is not None:
            raise ValueError(
                "state_norm and sliding_window cannot be composed: the windowed state is a difference of two "
                "states and clipping one of them would no longer be a window. Use one of them."
            )

    def __or__(self, other: "Mitigation") -> "Mitigation":
        return compose(self, other)

    @property
    def is_identity(self) -> bool:
        return all(getattr(self, f.name) is None for f in dataclasses.fields(self))

    def for_layer(self, layer: int) -> "Mitigation":
        """Returns this mitigation with per-layer parameters ``(layers, heads)`` reduced to ``layer``'s row."""

        def pick(value):
            if value is None:
                return None
            value = jnp.asarray(value)
            return value[layer] if value.ndim == 2 else value

        return dataclasses.replace(
            self,
            alpha_scale=pick(self.alpha_scale),
            b_scale=pick(self.b_scale),
            dt_scale=pick(self.dt_scale),
            max_norm=pick(self.max_norm),
        )

    def check_heads(self, heads: int, where: str = "ssd") -> None:
        """Raises a ValueError naming the field when a per-head parameter does not fit ``heads``."""
        for field in ("alpha_scale", "b_scale", "dt_scale", "max_norm"):
            value = getattr(self, field)
            if value is None:
                continue
            shape = np.shape(value)
            if len(shape) > 1:
                raise ValueError(
                    f"{where}: mitigation.{field} has shape {shape}; per-layer arrays (layers, heads) must be reduced "
                    "with Mitigation.for_layer(i) first (the model does this)"
                )
            if len(shape) == 1 and shape[0] not in (1, heads):
                raise ValueError(f"{where}: mitigation.{field} has shape {shape}; expected a scalar, (1,) or ({heads},)")


def _check_positive(name: str, value: ArrayLike, upper: Optional[float] = None) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"`{name}` must be positive and finite, got {value!r}")
    if upper is not None and np.any(arr > upper):
        raise ValueError(f"`{name}` must be in (0, {upper}], got {value!r}")


def forget_more(alpha_scale: ArrayLike = 0.9999, b_scale: ArrayLike = 0.75) -> Mitigation:
    """Forget more, remember less: ``alpha <- alpha_scale * alpha`` and ``B <- b_scale * B``."""
    _check_positive("alpha_scale", alpha_scale, upper=1.0)
    _check_positive("b_scale", b_scale)
    return Mitigation(alpha_scale=alpha_scale, b_scale=b_scale)


def dt_scale(scale: ArrayLike = 0.5) -> Mitigation:
    """Scale the step size, ``dt <- scale * dt`` (LongMamba's training-free baseline uses 0.5)."""
    _check_positive("scale", scale)
    return Mitigation(dt_scale=scale)


def state_norm(max_norm: ArrayLike) -> Mitigation:
    """Bound each head's state norm: ``h <- h * min(1, max_norm / ||h||_F)`` after every update.

    ``max_norm`` usually comes from :func:`ssm_jax.diagnostics.calibrate_state_norm` (per layer and head).
    """
    _check_positive("max_norm", max_norm)
    return Mitigation(max_norm=max_norm)


def sliding_window(window: int) -> Mitigation:
    """Keep only the last ``window`` tokens in each SSM state (the state difference ``h_t - (prod of the last
    window alphas) h_{t-window}``; docs/background.md)."""
    return Mitigation(window=int(window) if isinstance(window, (int, np.integer)) else window)


def _combine(a: Any, b: Any, op) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return op(jnp.asarray(a), jnp.asarray(b))


def compose(*mitigations: Optional[Mitigation]) -> Mitigation:
    """Applies several mitigations together: scales multiply, norm bounds and windows take the minimum."""
    result = Mitigation()
    for m in mitigations:
        if m is None:
            continue
        if not isinstance(m, Mitigation):
            raise TypeError(f"compose() accepts Mitigation values, got {type(m).__name__}")
        window = m.window if result.window is None else (result.window if m.window is None else min(result.window, m.window))
        result = Mitigation(
            alpha_scale=_combine(result.alpha_scale, m.alpha_scale, jnp.multiply),
            b_scale=_combine(result.b_scale, m.b_scale, jnp.multiply),
            dt_scale=_combine(result.dt_scale, m.dt_scale, jnp.multiply),
            max_norm=_combine(result.max_norm, m.max_norm, jnp.minimum),
            window=window,
        )
    return result


def resolve(mitigation: Optional[Mitigation]) -> Optional[Mitigation]:
    """Normalises ``mitigation=`` arguments: ``None`` and identity mitigations become ``None``."""
    if mitigation is None:
        return None
    if not isinstance(mitigation, Mitigation):
        raise TypeError(
            "`mitigation` must be an ssm_jax.mitigations.Mitigation (forget_more, dt_scale, state_norm, "
            f"sliding_window or compose(...)), got {type(mitigation).__name__}"
        )
    return None if mitigation.is_identity else mitigation
