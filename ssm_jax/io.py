"""Result files: strict JSON written atomically.

Evaluations, benchmarks and the study driver write their results with :func:`write_json`, so a run killed
mid-write leaves the previous file or none (never half of one), and the file is strict JSON that any parser
reads: numpy values become Python numbers and lists, and NaN / inf become ``null``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

__all__ = ["jsonable", "write_json"]


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays turned into Python values and non-finite floats into None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path: str, obj: Any) -> str:
    """Writes ``jsonable(obj)`` to ``path`` through a temporary file and an atomic rename; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(jsonable(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return path
