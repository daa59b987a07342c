"""State capacity (arXiv 2410.07145; docs/background.md): T_forget and T_recall per state size, and their laws.

Units follow the paper: the model state ``N_S = layers * heads * headdim * d_state`` in millions of
elements and lengths in K tokens (``1K = TOKENS_PER_K = 1024`` tokens, as in "a 64K context").

* **T_forget** (LM capacity): the smallest training length at which a model does *not* collapse, each
  run's verdict coming from the one collapse rule, :func:`ssm_jax.diagnostics.collapse_verdict`.
* **T_recall** (passkey capacity): the largest context length whose passkey accuracy (over all
  depths) is above 95%.
* Fits: ``T_forget = a * N_S + b`` (ordinary least squares) and ``T_recall = a * (b ** N_S - 1) + c``
  (for each ``b`` the model is linear in ``(a, c)``, solved exactly; ``b`` is found by a log-spaced
  grid search refined by golden-section search). No scipy needed.

Pure numpy; the study's figure is drawn by :func:`ssm_jax.plots.plot_capacity`.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

TOKENS_PER_K = 1024
RECALL_THRESHOLD = 0.95

# The paper's published fits (N_S in millions, T in K tokens).
PAPER_FORGET_FIT = {"a": 5.172, "b": -4.469}
PAPER_RECALL_FIT = {"a": 4.756, "b": 1.365, "c": -0.742}


def paper_t_forget(n_s_millions):
    """The paper's fit ``T_forget(K) = 5.172 N_S(M) - 4.469``."""
    return linear_law(n_s_millions, **PAPER_FORGET_FIT)


def paper_t_recall(n_s_millions):
    """The paper's fit ``T_recall(K) = 4.756 (1.365 ** N_S(M) - 1) - 0.742``."""
    return exponential_law(n_s_millions, **PAPER_RECALL_FIT)


def linear_law(x, a: float, b: float):
    return a * np.asarray(x, np.float64) + b


def exponential_law(x, a: float, b: float, c: float):
    return a * (np.power(b, np.asarray(x, np.float64)) - 1.0) + c


# --------------------------------------------------------------------------------------------------
# Capacities from sets of runs
# --------------------------------------------------------------------------------------------------


def t_forget(runs: Iterable[Mapping]) -> Dict:
    """T_forget of one state size from runs ``{"train_len": int, "collapsed": bool}`` (several T_train).

    Returns ``{"t_forget": smallest T_train without collapse or None, "bound": "exact" | "upper" |
    "lower", "monotone": bool}``. ``"upper"``: even the smallest T_train tried did not collapse (the
    capacity may be smaller); ``"lower"``: every run collapsed (the capacity exceeds the largest T_train
    tried; ``t_forget`` is None). ``monotone`` is False when a longer T_train collapses again.
    """
    runs = sorted(runs, key=lambda r: int(r["train_len"]))
    if not runs:
        raise ValueError("t_forget needs at least one run")
    ok = [int(r["train_len"]) for r in runs if not r["collapsed"]]
    if not ok:
        return {"t_forget": None, "bound": "lower", "monotone": True, "max_train_len": int(runs[-1]["train_len"])}
    first = min(ok)
    monotone = all(not r["collapsed"] for r in runs if int(r["train_len"]) >= first)
    bound = "upper" if first == int(runs[0]["train_len"]) else "exact"
    return {"t_forget": first, "bound": bound, "monotone": monotone}


def t_recall(accuracy_by_length: Mapping[int, float], *, threshold: float = RECALL_THRESHOLD) -> Optional[int]:
    """The largest context length whose passkey accuracy is above ``threshold`` (None if none is)."""
    good = [int(length) for length, acc in accuracy_by_length.items() if float(acc) > threshold]
    return max(good) if good else None


# --------------------------------------------------------------------------------------------------
# Least-squares fits
# --------------------------------------------------------------------------------------------------


def _clean(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def fit_linear(x, y) -> Dict[str, float]:
    """Least-squares ``y = a x + b``; needs two distinct x. Returns ``{"a", "b", "rmse", "n"}``."""
    x, y = _clean(x, y)
    if np.unique(x).size < 2:
        raise ValueError(f"a linear fit needs at least 2 distinct x values, got {np.unique(x).size}")
    design = np.stack([x, np.ones_like(x)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    rmse = float(np.sqrt(np.mean((design @ np.array([a, b]) - y) ** 2)))
    return {"a": float(a), "b": float(b), "rmse": rmse, "n": int(x.size)}


def _solve_ac(x, y, log_b):
    """For fixed ``b = exp(log_b)``: least-squares ``(a, c)`` of ``y = a (b^x - 1) + c`` and its SSE."""
    feature = np.expm1(log_b * x)  # b^x - 1, accurate for small log_b * x
    design = np.stack([feature, np.ones_like(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    sse = float(np.sum((design @ coef - y) ** 2))
    return coef, sse


def fit_exponential(x, y, *, num_grid: int = 400, max_log_b: Optional[float] = None) -> Dict[str, float]:
    """Least-squares ``y = a (b ** x - 1) + c`` with ``b > 1``; needs three distinct x.

    The model is linear in ``(a, c)`` for a fixed ``b``, so only ``log b`` is searched: a log-spaced grid
    of ``num_grid`` values in ``[1e-4, max_log_b]`` (default ``max_log_b = 30 / max|x|``: ``b ** x`` up
    to ``e^30``), then golden-section refinement between the best point's neighbours.
    Returns ``{"a", "b", "c", "rmse", "n"}``.
    """
    x, y = _clean(x, y)
    if np.unique(x).size < 3:
        raise ValueError(f"an exponential fit needs at least 3 distinct x values, got {np.unique(x).size}")
    scale = float(np.max(np.abs(x)))
    hi = float(max_log_b) if max_log_b is not None else 30.0 / scale
    lo = min(1e-4, hi / 1e3)
    grid = np.geomspace(lo, hi, num_grid)
    sses = np.array([_solve_ac(x, y, k)[1] for k in grid])
    i = int(np.argmin(sses))
    left, right = grid[max(i - 1, 0)], grid[min(i + 1, num_grid - 1)]
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    c1, c2 = right - phi * (right - left), left + phi * (right - left)
    f1, f2 = _solve_ac(x, y, c1)[1], _solve_ac(x, y, c2)[1]
    for _ in range(100):
        if f1 <= f2:
            right, c2, f2 = c2, c1, f1
            c1 = right - phi * (right - left)
            f1 = _solve_ac(x, y, c1)[1]
        else:
            left, c1, f1 = c1, c2, f2
            c2 = left + phi * (right - left)
            f2 = _solve_ac(x, y, c2)[1]
    candidates = [(sses[i], grid[i]), (f1, c1), (f2, c2)]
    _, log_b = min(candidates)
    (a, c), sse = _solve_ac(x, y, log_b)
    return {"a": float(a), "b": float(math.exp(log_b)), "c": float(c), "rmse": float(math.sqrt(sse / x.size)), "n": int(x.size)}


# --------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------


def capacity_study(runs: Sequence[Mapping]) -> Dict:
    """Capacities per state size and the fitted laws from a set of runs.

    Each run is a mapping with ``state_size`` (elements), ``train_len`` (tokens), optionally
    ``collapsed`` (bool, from a loss-vs-position evaluation) and optionally ``passkey_accuracy``
    (``{context_length: accuracy}``) and ``name``. Runs of one state size with different training
    lengths give its T_forget; T_recall of a state size is the largest over its runs.

    Returns a JSON-ready dict: ``points`` (one per state size: ``n_s_millions``, ``t_forget`` and
    ``t_recall`` in tokens and K tokens, bounds), ``fits`` (``forget``: linear, ``recall``:
    exponential; None when too few points), the paper's fits, and notes.
    """
    by_size: Dict[int, List[Mapping]] = {}
    for run in runs:
        by_size.setdefault(int(run["state_size"]), []).append(run)
    points, notes = [], []
    for size in sorted(by_size):
        group = by_size[size]
        point = {
            "state_size": size,
            "n_s_millions": size / 1e6,
            "runs": [r.get("name", "") for r in group],
            "train_lens": sorted(int(r["train_len"]) for r in group),
        }
        forget_runs = [r for r in group if r.get("collapsed") is not None]
        if forget_runs:
            tf = t_forget(forget_runs)
            point.update(t_forget=tf["t_forget"], t_forget_bound=tf["bound"], t_forget_monotone=tf["monotone"])
            point["t_forget_k"] = None if tf["t_forget"] is None else tf["t_forget"] / TOKENS_PER_K
            if tf["bound"] == "lower":
                notes.append(f"N_S={size}: every run collapsed (T_forget > {tf['max_train_len']}); not fitted")
            elif tf["bound"] == "upper":
                notes.append(f"N_S={size}: the smallest T_train tried ({tf['t_forget']}) did not collapse; T_forget is an upper bound")
            if not tf["monotone"]:
                notes.append(f"N_S={size}: a longer T_train collapsed again (non-monotone)")
        recall = [t_recall(r["passkey_accuracy"]) for r in group if r.get("passkey_accuracy")]
        if recall:
            best = max((v for v in recall if v is not None), default=None)
            point["t_recall"] = best
            point["t_recall_k"] = None if best is None else best / TOKENS_PER_K
            if best is None:
                notes.append(f"N_S={size}: no context length reached {RECALL_THRESHOLD:.0%} passkey accuracy")
        points.append(point)

    fits: Dict[str, Optional[Dict]] = {"forget": None, "recall": None}
    # Only exact capacities enter the fit: an upper bound (no collapse even at the shortest T_train) says
    # nothing about where the law lies below it.
    exact = [p for p in points if p.get("t_forget_k") is not None and p.get("t_forget_bound") == "exact"]
    fx = [p["n_s_millions"] for p in exact]
    fy = [p["t_forget_k"] for p in exact]
    if len(set(fx)) >= 2:
        fits["forget"] = fit_linear(fx, fy)
    else:
        notes.append(
            f"linear T_forget fit needs >= 2 state sizes with an exact T_forget (a collapse at a shorter "
            f"T_train and none at a longer one), have {len(set(fx))}"
        )
    rx = [p["n_s_millions"] for p in points if p.get("t_recall_k") is not None]
    ry = [p["t_recall_k"] for p in points if p.get("t_recall_k") is not None]
    if len(set(rx)) >= 3:
        fits["recall"] = fit_exponential(rx, ry)
    else:
        notes.append(f"exponential T_recall fit needs >= 3 state sizes with a T_recall, have {len(set(rx))}")
    return {
        "units": {"n_s": "millions of state elements", "t": f"K tokens (1K = {TOKENS_PER_K})"},
        "points": points,
        "fits": fits,
        "paper_fits": {"forget": dict(PAPER_FORGET_FIT), "recall": dict(PAPER_RECALL_FIT)},
        "notes": notes,
    }
