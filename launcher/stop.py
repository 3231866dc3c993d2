"""Graceful stop: signals, a STOP file and a wall-clock deadline become one flag all ranks agree on.

A signal handler only sets a flag. At each step boundary the ranks all-reduce MAX of their flags, so when
any rank was asked to stop, every rank saves the same checkpoint and exits with EXIT_STOPPED. The same
all-reduce carries the `every_minutes` checkpoint cadence, which each rank can only judge by its own clock.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: the CLI listens for stop signals before torch loads
    from launcher.dist import DistEnv

ABORT_AFTER_SECONDS = 2.0


_early_reason: list[str] = []  # a stop signal that arrived before training started (while loading)
_early_interrupt: list[float] = []  # when the first Ctrl-C of that time arrived


def _second_press(first: float | None) -> bool:
    """Ctrl-C reaches every rank of `ftl train --nproc` twice (from the terminal and from the parent): only a
    press a moment after the first means "abort now, without a checkpoint"."""
    return first is not None and time.monotonic() - first > ABORT_AFTER_SECONDS


def listen_early(signals: list[str]) -> None:
    """From the moment the config is read: a stop signal during imports, data preparation or model loading
    is remembered (the run stops cleanly, exit 3, before its first step) instead of killing the process."""

    def remember(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and _early_interrupt:
            if _second_press(_early_interrupt[0]):
                raise KeyboardInterrupt
            return
        if signum == signal.SIGINT:
            _early_interrupt.append(time.monotonic())
        _early_reason[:] = [f"signal {signal.Signals(signum).name} (while starting)"]

    for name in signals:
        signal.signal(getattr(signal, name), remember)


DEADLINE = "checkpoint.max_minutes reached"


class StopRequest:
    """Collects stop reasons on this rank; `agreed()` asks every rank at a step boundary."""

    def __init__(self, env: DistEnv, stop_file: Path, signals: list[str], max_minutes: float | None):
        self.env = env
        self.stop_file = stop_file
        self.reason: str | None = _early_reason[0] if _early_reason else None
        self.first_interrupt: float | None = _early_interrupt[0] if _early_interrupt else None
        self.deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
        for name in signals:
            signal.signal(getattr(signal, name), self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.first_interrupt is not None:
            if _second_press(self.first_interrupt):
                raise KeyboardInterrupt
            return
        if signum == signal.SIGINT:
            self.first_interrupt = time.monotonic()
            if self.env.is_main:
                print("\nftl: stopping after this step with a checkpoint (Ctrl-C again to abort without one)")
        self.reason = f"signal {name}"

    def consume_stop_file(self) -> None:
        """Once the stop it asked for is saved, the STOP file has done its job: the next run must not stop."""
        self.stop_file.unlink(missing_ok=True)

    def _local(self) -> bool:
        if self.reason is None and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = DEADLINE
        return self.reason is not None

    def agreed(self, want_save: bool = False) -> tuple[bool, bool]:
        """(stop, save) as every rank sees them: each is true on all ranks when any rank wants it.

        `want_save` carries this rank's time-based checkpoint cadence through the same all-reduce, so a
        clock that crosses `every_minutes` on one rank but not yet on another cannot split the ranks."""
        flags = [self._local(), want_save, self.reason == DEADLINE]
        if not self.env.distributed:
            return flags[0], flags[1]
        import torch
        import torch.distributed as dist

        device = self.env.device if self.env.device.type == "cuda" else "cpu"
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        stop, save, deadline = (bool(v > 0) for v in t.tolist())
        if stop and self.reason is None:  # each rank reads its own clock: the first to pass the deadline says so
            self.reason = DEADLINE if deadline else "another rank asked to stop"
        return stop, save
