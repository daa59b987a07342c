"""Result files written atomically: strict JSON and text.

Evaluations, benchmarks and the study driver write their results with :func:`write_json` (and
:func:`write_text`), so a run killed mid-write leaves the previous file or none, never half of one (the
study driver takes a finished ``summary.md`` as the mark of a finished evaluation). The JSON is strict, so
any parser reads it: numpy values become Python numbers and lists, and NaN / inf become ``null``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

__all__ = ["jsonable", "write_text", "write_json"]


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


def write_text(path: str, text: str) -> str:
    """Writes ``text`` to ``path`` through a temporary file and an atomic rename; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(path: str, obj: Any) -> str:
    """Writes ``jsonable(obj)`` as strict JSON to ``path`` atomically (:func:`write_text`); returns ``path``."""
    return write_text(path, json.dumps(jsonable(obj), indent=1, allow_nan=False))
