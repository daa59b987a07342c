"""The mitigations an evaluation compares, built from their names in the config.

A name is one of :data:`MITIGATION_NAMES` or several joined by ``+`` (composed). Their parameters come
from the config sections of the same names. ``state_norm`` thresholds are calibrated per layer and head
on held-out prompts of the training length (:func:`ssm_jax.diagnostics.calibrate_state_norm`), once
however many names use it; ``sliding_window``'s window defaults to the training length.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from ssm_jax import mitigations as mitigations_lib

__all__ = ["MITIGATION_NAMES", "build_mitigations"]

MITIGATION_NAMES = ("none", "forget_more", "dt_scale", "state_norm", "sliding_window")

Built = Dict[str, Optional[mitigations_lib.Mitigation]]
Described = Dict[str, Dict[str, Any]]


def build_mitigations(
    names: Iterable[str],
    model: Any,
    *,
    train_len: int,
    params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    calibration_tokens: Optional[Callable[[], np.ndarray]] = None,
) -> Tuple[Built, Described]:
    """Builds the named mitigations for ``model`` (a ``Mamba2LM``).

    Args:
      names: entries of :data:`MITIGATION_NAMES` or ``+``-joined combinations.
      params: per-name parameters: ``forget_more {alpha_scale, b_scale}``, ``dt_scale {scale}``,
        ``state_norm {margin, reduce}``, ``sliding_window {window}`` (0: ``train_len``).
      calibration_tokens: returns ``(batch, train_len + 1)`` held-out tokens for state_norm.

    Returns ``({name: Mitigation or None}, {name: {part: its parameters}})``.
    """
    params = {k: dict(v) for k, v in (params or {}).items()}
    taus: Dict[str, np.ndarray] = {}

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
            margin, reduce = float(p.get("margin", 1.0)), str(p.get("reduce", "max"))
            if "tau" not in taus:
                if calibration_tokens is None:
                    raise ValueError("state_norm needs calibration tokens (held-out prompts of the training length)")
                from ssm_jax.diagnostics import calibrate_state_norm

                taus["tau"] = calibrate_state_norm(
                    model, calibration_tokens(), every=max(1, train_len // 8), reduce=reduce, margin=margin
                )  # (layers, heads)
            tau = taus["tau"]
            return mitigations_lib.state_norm(jnp.asarray(tau, jnp.float32)), {
                "margin": margin,
                "reduce": reduce,
                "calibration_len": int(train_len),
                "tau_min": float(tau.min()),
                "tau_mean": float(tau.mean()),
                "tau_max": float(tau.max()),
            }
        raise ValueError(f"unknown mitigation {name!r}; accepted: {', '.join(MITIGATION_NAMES)} (join with '+')")

    built: Built = {}
    described: Described = {}
    for spec in names:
        parts = [p.strip() for p in spec.split("+") if p.strip()]
        made = [single(p) for p in parts]
        mits = [m for m, _ in made if m is not None]
        built[spec] = mitigations_lib.compose(*mits) if mits else None
        described[spec] = {p: d for p, (_, d) in zip(parts, made) if d}
    return built, described
