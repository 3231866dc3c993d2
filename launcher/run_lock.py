"""One run per OUTPUT_DIR at a time: rank 0 holds an exclusive lock on OUTPUT_DIR while it trains.

Two kinds of lock, chosen by checkpoint.run_lock:
- flock on OUTPUT_DIR/.lock: the kernel releases it when the holder dies in any way (even SIGKILL), so a lock
  left by a dead run is stale by construction and simply taken over.
- a lock file, OUTPUT_DIR/.lock.owner, created exclusively (O_EXCL, atomic on local file systems and NFSv3+)
  and naming its holder with a heartbeat the holder refreshes every HEARTBEAT_SECONDS. It is for file systems
  where flock is unsupported or only node-local (some NFS and Lustre mounts: two nodes would both get "their"
  flock). It is stale when its holder's pid is gone (same host) or its heartbeat is older than STALE_SECONDS
  (any host), and then taken over.
`auto` uses the lock file on network file systems (and where flock fails), flock elsewhere. Either way the file
names the holder (host, pid, SLURM job, start time), so a refused second run can say who holds the directory.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import IO

from launcher.errors import ConfigError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0  # four missed heartbeats: the holder is gone (or its node is)
NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "fuse.glusterfs", "ceph")
_held: list[IO[str]] = []  # open lock files of this process: closing one would release its lock


def _holder() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def lock_output_dir(out: Path, kind: str = "auto") -> str:
    """Take OUTPUT_DIR's lock for the life of this process, or raise ConfigError naming its holder. Returns a
    line saying which lock is in use."""
    fs = file_system_type(out)
    if kind == "file" or (kind == "auto" and fs in NETWORK_FILE_SYSTEMS):
        _take_owner_file(out)
        return f"run lock: lock file {out / OWNER_FILE} with a heartbeat (file system {fs}; checkpoint.run_lock={kind})"
    try:
        _take_flock(out)
    except OSError as err:
        if kind == "flock" or err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        _take_owner_file(out)
        return f"run lock: lock file {out / OWNER_FILE} with a heartbeat (flock is unsupported here: {err.strerror})"
    return f"run lock: flock on {out / LOCK_FILE} (file system {fs})"


def _refused(out: Path, holder: str) -> ConfigError:
    return ConfigError(
        [
            f"output_dir: {out} is in use by another ftl run ({holder}); two runs in one directory would "
            "overwrite each other's checkpoints. Wait for it, stop it, or use another output_dir."
        ]
    )


def _take_flock(out: Path) -> None:
    f = (out / LOCK_FILE).open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise _refused(out, holder) from None
    except OSError:
        f.close()
        raise
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_holder()) + "\n")
    f.flush()
    _held.append(f)


def _take_owner_file(out: Path) -> None:
    """Create OUTPUT_DIR/.lock.owner exclusively (taking over a stale one), keep its heartbeat, remove it at exit."""
    path = out / OWNER_FILE
    me = {**_holder(), "heartbeat": time.time()}
    for _ in range(2):  # a stale file is removed once, then the create is retried
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            current = _read(path)
            why = stale_because(current, time.time())
            if why is None:
                raise _refused(out, json.dumps(current)) from None
            path.unlink(missing_ok=True)  # the holder is gone: take over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        _keep_heartbeat(path, me)
        return
    raise _refused(out, json.dumps(_read(path)))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stale_because(holder: dict, now: float) -> str | None:
    """Why the lock file of `holder` no longer holds the directory (None: it does)."""
    if not holder:
        return "unreadable"
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return f"pid {holder.get('pid')} is gone"
    age = now - float(holder.get("heartbeat", 0))
    return f"heartbeat {age:.0f}s old" if age > STALE_SECONDS else None


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, 0) would ask about whole process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _keep_heartbeat(path: Path, me: dict) -> None:
    """Refresh the heartbeat from a daemon thread; remove the file at a normal exit (a killed run leaves it to go
    stale)."""

    def beat() -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            if _read(path).get("pid") != me["pid"]:
                return  # taken over (this run was presumed dead): never write over the new holder
            tmp = path.with_name(f"{OWNER_FILE}.{me['pid']}.tmp")
            tmp.write_text(json.dumps({**me, "heartbeat": time.time()}) + "\n")
            os.replace(tmp, path)

    threading.Thread(target=beat, name="ftl-run-lock", daemon=True).start()
    atexit.register(lambda: path.unlink(missing_ok=True) if _read(path).get("pid") == me["pid"] else None)


def file_system_type(path: Path) -> str:
    """The type of the file system `path` is on (from /proc/mounts; 'unknown' where that is not readable)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    target = str(path.resolve())
    best = max(
        (m for m in mounts if len(m) > 2 and (target == m[1] or target.startswith(m[1].rstrip("/") + "/"))),
        key=lambda m: len(m[1]),
        default=None,
    )
    return best[2] if best else "unknown"
