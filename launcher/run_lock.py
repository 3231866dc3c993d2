"""One run per OUTPUT_DIR at a time: rank 0 holds an exclusive lock on OUTPUT_DIR/.lock while it trains.

The lock is an flock on an open file, so the kernel releases it when the holder dies in any way (even
SIGKILL): a lock left by a dead run is stale by construction and simply taken over. The file also names
the holder (host, pid, SLURM job, start time) so a refused second run can say who holds the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from launcher.errors import ConfigError

LOCK_FILE = ".lock"
_held: list[IO[str]] = []  # open lock files of this process: closing one would release its lock


def _holder() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def lock_output_dir(out: Path) -> None:
    """Take OUTPUT_DIR's lock for the life of this process, or raise ConfigError naming its holder."""
    f = (out / LOCK_FILE).open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(
            [
                f"output_dir: {out} is in use by another ftl run ({holder}); two runs in one directory would "
                "overwrite each other's checkpoints. Wait for it, stop it, or use another output_dir."
            ]
        ) from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_holder()) + "\n")
    f.flush()
    _held.append(f)
