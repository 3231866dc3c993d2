"""Graceful stop: signals, a STOP file and a wall-clock deadline become one flag all ranks agree on.

A signal handler only sets a flag. At each step boundary the ranks all-reduce MAX of their flags, so when
any rank was asked to stop, every rank saves the same checkpoint and exits with EXIT_STOPPED.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.dist import DistEnv

EXIT_STOPPED = 3  # "stopped early, checkpoint saved": distinct from success (0), failure (1), bad input (2)


class StopRequest:
    """Collects stop reasons on this rank; `agreed()` asks every rank at a step boundary."""

    def __init__(self, env: DistEnv, stop_file: Path, signals: list[str], max_minutes: float | None):
        self.env = env
        self.stop_file = stop_file
        self.reason: str | None = None
        self.deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
        for name in signals:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.reason = f"signal {signal.Signals(signum).name}"

    def _local(self) -> bool:
        if self.reason is None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "checkpoint.max_minutes reached"
        return self.reason is not None

    def agreed(self) -> bool:
        """True on every rank when any rank wants to stop."""
        flag = self._local()
        if not self.env.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.env.device if self.env.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.item() > 0 and self.reason is None:
            self.reason = "another rank asked to stop"
        return t.item() > 0
