"""A hung rank named and ended: a watchdog thread beside the training loop on every rank.

A rank that stops (a wedged GPU, NIC or NFS mount; SIGSTOP from outside) leaves every other rank waiting in its
next collective, silently, until the collective timeout (distributed.timeout_minutes, 30 by default) ends the
job. Here each rank's watchdog thread writes a heartbeat file (rank, host, pid, last step, the time it was alive)
every few seconds into OUTPUT_DIR/.heartbeats/ — a side channel that needs no collective. When no step has
completed within the limit, every live rank writes its Python stack to its log, names the ranks whose heartbeat
went stale (stopped or dead) or that are behind, and exits with EXIT_HUNG; the lowest live rank records the exit
in last_exit.json, so a SLURM job can tell "hung" from a crash and requeue without that node.

The limit is distributed.hang_timeout_minutes, never less than HANG_STEP_MULTIPLE times the median step time,
and multiplied by PHASE_MULTIPLE while a checkpoint is written or an evaluation runs.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from launcher.errors import EXIT_HUNG
from launcher.metrics import log, record_exit
from launcher.run_dir import HEARTBEAT_DIR

HANG_STEP_MULTIPLE = 20  # a step 20× slower than the median is a hang, whatever the configured minutes say
PHASE_MULTIPLE = 3  # checkpoint writes and evaluations may take this many limits
BEAT_SECONDS = 2.0  # how often a live rank's heartbeat is refreshed
STALE_SECONDS = 15.0  # a heartbeat older than this (or half the limit) belongs to a rank that is not running


class Watchdog:
    """Started by the loop on every rank; `beat(step)` after each step, `phase(name)` around slow work."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, timeout_minutes: float, step: int):
        self.out_dir, self.rank, self.world_size = out_dir, rank, world_size
        self.dir = out_dir / HEARTBEAT_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout_minutes * 60
        self.step, self.last = step, time.monotonic()
        self.durations: deque[float] = deque(maxlen=100)
        self.current_phase: str | None = None
        self.exit_code: int | None = None  # set once the run is over: a hang then only delays the exit
        self._write_heartbeat()  # at once: a rank stopped before its first beat is still named by pid
        self.thread = threading.Thread(target=self._watch, name="ftl-watchdog", daemon=True)
        self.thread.start()

    def beat(self, step: int) -> None:
        """A step completed: reset the clock and learn how long steps take."""
        now = time.monotonic()
        self.durations.append(now - self.last)
        self.step, self.last = step, now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Slow work that is not a step (a checkpoint write, an evaluation): a longer limit, named if it hangs."""
        self.current_phase = name
        try:
            yield
        finally:
            self.current_phase, self.last = None, time.monotonic()

    def limit(self) -> float:
        """Seconds without a completed step that mean a hang."""
        steps = HANG_STEP_MULTIPLE * statistics.median(self.durations) if self.durations else 0.0
        base = max(self.timeout, steps)
        return base * PHASE_MULTIPLE if self.current_phase else base

    def exiting(self, code: int) -> None:
        """The run is over with `code` (its exit recorded): keep watching the way out (the process group's
        shutdown waits for every rank), and should a rank not get there, leave with `code`, not as hung."""
        self.current_phase, self.exit_code, self.last = "the exit", code, time.monotonic()

    def _watch(self) -> None:
        while True:  # a daemon thread: it watches until the process exits (see `exiting`)
            time.sleep(BEAT_SECONDS)
            self._write_heartbeat()
            waited = time.monotonic() - self.last
            if waited > self.limit():
                self._end(waited)

    def _write_heartbeat(self) -> None:
        beat = {"rank": self.rank, "host": host_name(), "pid": os.getpid(), "step": self.step}
        beat["time"] = time.time()
        path = self.dir / f"rank{self.rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(beat))
        os.replace(tmp, path)

    def _end(self, waited: float) -> None:
        """Stack to the log, the culprits named, the exit recorded by the lowest live rank, and out."""
        where = f" during {self.current_phase}" if self.current_phase else ""
        log(f"rank {self.rank}: no step completed in {waited:.0f}s{where} (limit {self.limit():.0f}s); stack:")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        beats = read_heartbeats(self.dir, self.world_size)
        stale = max(3 * BEAT_SECONDS, min(STALE_SECONDS, self.limit() / 2))
        culprits = hung_ranks(beats, self.world_size, time.time(), stale)
        live = [r for r, b in beats.items() if r not in {c[0] for c in culprits} and b is not None]
        reason = f"hung at step {self.step + 1}{where}: " + ("; ".join(c[1] for c in culprits) or "no rank named")
        log(reason)
        if self.exit_code is not None:  # trained and recorded: the run is not hung, a rank's exit is
            log(f"the run is over (exit code {self.exit_code}); leaving without the rank(s) named above")
            sys.stderr.flush()
            os._exit(self.exit_code)
        if live and self.rank == min(live):
            hosts = sorted({beats[r]["host"] for r, _ in culprits if beats.get(r)})
            record_exit(self.out_dir, EXIT_HUNG, self.step, reason, hung_hosts=hosts)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)  # the main thread is stuck in a collective: no clean way out of it


def host_name() -> str:
    """The node as the scheduler knows it (SLURM's node name: what --exclude takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def read_heartbeats(directory: Path, world_size: int) -> dict[int, dict | None]:
    """The last heartbeat of each rank (None where there is none or it cannot be read)."""
    beats: dict[int, dict | None] = {}
    for rank in range(world_size):
        try:
            beats[rank] = json.loads((directory / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            beats[rank] = None
    return beats


def hung_ranks(beats: dict[int, dict | None], world_size: int, now: float, stale: float) -> list[tuple[int, str]]:
    """(rank, description) of the ranks to blame: those not running (no heartbeat, or one older than `stale`
    seconds) — else those behind the others' step."""
    gone = []
    for rank in range(world_size):
        b = beats.get(rank)
        if b is None:
            gone.append((rank, f"rank {rank}: no heartbeat"))
        elif now - b["time"] > stale:
            gone.append(
                (
                    rank,
                    f"rank {rank} (host {b['host']}, pid {b['pid']}) not running for "
                    f"{now - b['time']:.0f}s, last at step {b['step']}",
                )
            )
    if gone:
        return gone
    steps = {r: b["step"] for r, b in beats.items() if b is not None}
    front = max(steps.values(), default=0)
    return [
        (r, f"rank {r} (host {beats[r]['host']}, pid {beats[r]['pid']}) behind at step {s} of {front}")
        for r, s in steps.items()
        if s < front
    ]
