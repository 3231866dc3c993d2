"""`ftl train --nproc N`: start N local ranks of `ftl train` and wait for them."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from launcher.errors import EXIT_HUNG
from launcher.world import free_port

PR_SET_PDEATHSIG = 1  # linux/prctl.h
FAILED_RANK_GRACE = 30.0  # seconds the other ranks get to end on their own after one rank failed


def forward_signals(procs: list[subprocess.Popen], names: list[str]) -> None:
    """A stop signal sent to `ftl train --nproc` (by SLURM, or a user) reaches every rank."""

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for name in names:
        signal.signal(getattr(signal, name), forward)


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills this rank when its `ftl --nproc` parent dies (even by
    SIGKILL), so a killed launcher never leaves ranks training on as orphans."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every rank; the exit codes of those that ended on their own. Once one has failed, the others
    get FAILED_RANK_GRACE seconds to end on their own (a rank blocked in a collective with a dead peer may
    never, a stopped one cannot), then are killed: their -9 is the launcher's doing, not their verdict."""
    deadline, killed = None, set()
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed and deadline is None:
            hung = any(p.returncode == EXIT_HUNG for p in procs)  # the others are stopped or about to exit too
            deadline = time.monotonic() + (0 if hung else FAILED_RANK_GRACE)
        if deadline is not None and time.monotonic() > deadline:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    killed.add(i)
        time.sleep(0.1)
    own = [p.returncode for i, p in enumerate(procs) if i not in killed]
    return own or [p.returncode for p in procs]


def spawn_local_ranks(nproc: int, train_args: list[str], stop_signals: list[str]) -> int:
    """Start nproc local ranks of `ftl train`; the exit code is the worst of theirs."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        cmd = [sys.executable, "-m", "launcher", "train", *train_args]
        on_linux = sys.platform.startswith("linux")
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if on_linux else None))
    forward_signals(procs, stop_signals)
    codes = _wait_all(procs)
    return max(codes, key=lambda c: (c != 0, abs(c)))
