"""`ftl train --nproc N`: start N local ranks of `ftl train` and wait for them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forward_signals(procs: list[subprocess.Popen], names: list[str]) -> None:
    """A stop signal sent to `ftl train --nproc` (by SLURM, or a user) reaches every rank."""

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for name in names:
        signal.signal(getattr(signal, name), forward)


def spawn_local_ranks(nproc: int, train_args: list[str], stop_signals: list[str]) -> int:
    """Start nproc local ranks of `ftl train`; the exit code is the worst of theirs."""
    port = str(_free_port())
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
        procs.append(subprocess.Popen([sys.executable, "-m", "launcher", "train", *train_args], env=env))
    forward_signals(procs, stop_signals)
    codes = [p.wait() for p in procs]
    return max(codes, key=lambda c: (c != 0, abs(c)))
