"""Training metrics to ``<workdir>/metrics.jsonl`` and TensorBoard event files (tensorboardX).

Each JSONL line is one record: ``{"step": int, "split": "train" | "validation", "time": unix seconds,
...scalars}``. Train records hold ``loss`` (nats per target token), ``bits_per_token``, ``lr``,
``grad_norm``, ``tokens_per_s``, ``skipped`` (1 if this step's update was not applied), ``num_skipped``,
``tokens_seen``; validation records ``loss``, ``bits_per_token``, ``accuracy``, ``tokens``. After a
restart the records of the steps replayed after the restored checkpoint appear again (later lines win).
Only the primary process writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["MetricsWriter", "read_metrics"]


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (flushed per line) and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # pragma: no cover - optional dependency
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record: Dict[str, Any] = {"step": int(step), "split": split, "time": time.time()}
        for k, v in scalars.items():
            v = float(v) if not isinstance(v, (int, bool)) else int(v)
            record[k] = v if (not isinstance(v, float) or math.isfinite(v)) else str(v)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                try:
                    self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
                except (TypeError, ValueError):
                    pass

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str, split: Optional[str] = None) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl (optionally one split), one per step: the last line of a step wins."""
    by_key: Dict[Any, Dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if split is not None and rec.get("split") != split:
                continue
            by_key[(rec.get("split"), rec["step"])] = rec
    return sorted(by_key.values(), key=lambda r: (r["step"], r.get("split", "")))
