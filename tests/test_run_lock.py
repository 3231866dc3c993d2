"""One run per OUTPUT_DIR where flock cannot be trusted (issue 20, point 5): the lock-file fallback with a
heartbeat refuses a second run, names its holder, and is taken over once its holder is gone (dead pid on this
host, or a heartbeat older than the limit from any host). Forced with checkpoint.run_lock: file."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import base_config, ftl, write_config
from resume_utils import finish, start, wait_for

from launcher.errors import ConfigError
from launcher.run_lock import OWNER_FILE, STALE_SECONDS, file_system_type, lock_output_dir, stale_because


def _owner(host: str, pid: int, age: float) -> dict:
    return {"host": host, "pid": pid, "slurm_job": None, "started": "-", "heartbeat": time.time() - age}


def test_a_lock_file_is_stale_only_when_its_holder_is_gone() -> None:
    here, now = socket.gethostname(), time.time()
    dead = 2**22 + 12345  # above pid_max's default: no such process
    assert stale_because(_owner(here, os.getpid(), 0), now) is None
    assert stale_because(_owner(here, dead, 0), now) == f"pid {dead} is gone"
    assert stale_because(_owner("other-node", dead, 10), now) is None  # another host's pid says nothing here
    assert stale_because(_owner("other-node", dead, STALE_SECONDS + 5), now).startswith("heartbeat")
    assert stale_because({}, now) == "unreadable"


@pytest.mark.parametrize(("age", "taken"), [(10, False), (STALE_SECONDS + 30, True)])
def test_another_hosts_lock_file_is_refused_while_fresh_and_taken_over_when_stale(
    tmp_path: Path, age: float, taken: bool
) -> None:
    (tmp_path / OWNER_FILE).write_text(json.dumps(_owner("node-7", 4242, age)))
    if not taken:
        with pytest.raises(ConfigError, match=r'is in use by another ftl run .*"host": "node-7"'):
            lock_output_dir(tmp_path, "file")
        return
    line = lock_output_dir(tmp_path, "file")
    assert line.startswith(f"run lock: lock file {tmp_path / OWNER_FILE}")
    assert json.loads((tmp_path / OWNER_FILE).read_text())["pid"] == os.getpid()


def test_auto_takes_flock_on_a_local_file_system(tmp_path: Path) -> None:
    assert file_system_type(tmp_path) not in ("unknown", "nfs", "nfs4", "lustre")
    assert lock_output_dir(tmp_path, "auto").startswith(f"run lock: flock on {tmp_path / '.lock'}")


def test_the_forced_lock_file_holds_a_run_and_a_killed_runs_file_is_taken_over(
    tmp_path: Path, models: dict, toy_data: dict
) -> None:
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "lora"},
        checkpoint={"every_steps": 2, "run_lock": "file"},
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    run = tmp_path / "run"
    first = start(path, park_at=2)  # holds the directory, parked in its step-2 save
    wait_for((run / "checkpoints" / ".step-00000002.tmp").exists, first)
    second = ftl("train", str(path))
    assert second.returncode == 2 and "is in use by another ftl run" in second.stderr, second.stderr[-2000:]
    assert f'"pid": {first.pid}' in second.stderr and '"heartbeat"' in second.stderr
    os.kill(first.pid, signal.SIGKILL)  # no exit handler runs: the file stays, naming a dead pid
    first.wait()
    assert json.loads((run / OWNER_FILE).read_text())["pid"] == first.pid
    code, log = finish(start(path))
    assert code == 0 and f"run lock: lock file {run / OWNER_FILE}" in log, log[-3000:]
    assert not (run / OWNER_FILE).exists()  # removed at a normal exit
