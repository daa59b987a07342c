"""Wall-clock timing of jitted JAX calls, shared by the benchmark scripts (imported as ``timing`` from
``benchmarks/``: a script's own directory is first on ``sys.path``)."""

from __future__ import annotations

import time
from typing import Callable, Sequence, Tuple

import jax
import numpy as np


def time_ms(f: Callable, args: Sequence, *, iters: int = 10, repeats: int = 5, warmup: int = 2) -> Tuple[float, float]:
    """Median and minimum milliseconds per call of ``f(*args)`` over ``repeats`` timings of ``iters`` calls each,
    after ``warmup`` calls (compilation); every timing waits for the device to finish."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / iters)
    return float(np.median(per_call)) * 1e3, float(np.min(per_call)) * 1e3
