"""Metrics sinks: one JSON line per step (crash-safe) and TensorBoard scalars.

    logger = MetricsLogger(run_dir, tensorboard=True)
    logger.log(step, {"reward/mean": 0.4, ...})
    logger.close()

``metrics.jsonl`` is flushed and fsync'ed after every line, so a crash loses nothing that was
logged. ``truncate_jsonl(path, max_step)`` drops lines written after the checkpoint a run
resumes from, so a resumed run's file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class JsonlSink:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class TensorBoardSink:
    def __init__(self, log_dir: str, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        # purge_step drops events at or after that step (written before a crash, redone on resume)
        self._w = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._w.add_scalar(key, value, step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class MetricsLogger:
    """Fan out one metrics dict to every sink."""

    def __init__(self, run_dir: str, tensorboard: bool = True, jsonl_name: str = "metrics.jsonl",
                 purge_step: Optional[int] = None):
        self.sinks = [JsonlSink(os.path.join(run_dir, jsonl_name))]
        if tensorboard:
            try:
                self.sinks.append(TensorBoardSink(os.path.join(run_dir, "tensorboard"), purge_step))
            except ImportError:  # tensorboard is a dependency, but be lenient
                pass

    def log(self, step: int, metrics: dict) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_jsonl(path: str) -> list:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
    return rows


def truncate_jsonl(path: str, max_step: Optional[int]) -> None:
    """Keep only well-formed rows with step <= max_step (all rows dropped if max_step is None)."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_jsonl(path) if max_step is not None and r.get("step", 0) <= max_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
