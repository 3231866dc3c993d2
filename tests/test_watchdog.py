"""A hung rank is named and ended (issue 20, point 3): one rank of a 2-rank run stopped with SIGSTOP (what a
wedged GPU, NIC or NFS mount looks like from outside) → every process gone within the limit + 60 s, exit 5, the
log naming the stopped rank by rank, host and pid; a rerun resumes exactly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import base_config, write_config
from resume_utils import final_weights, finish, logged_step, losses, max_weight_diff, start, wait_for

from launcher.watchdog import hung_ranks

EXIT_HUNG = 5  # the documented code (docs/resuming.md "Exit codes"), not the package's constant
STEPS = 12
LIMIT_MINUTES = 0.25


def test_the_blamed_rank_is_the_one_not_running_else_the_one_behind() -> None:
    """Heartbeats: a stale one (stopped, dead) is blamed before a late one; with all alive, the ranks behind."""
    now = 1000.0
    beat = lambda rank, step, age: {"rank": rank, "host": "h", "pid": 100 + rank, "step": step, "time": now - age}  # noqa: E731
    beats = {0: beat(0, 7, 1), 1: beat(1, 6, 30), 2: beat(2, 6, 1)}
    assert [r for r, _ in hung_ranks(beats, 3, now, stale=10)] == [1]
    assert [r for r, _ in hung_ranks({**beats, 1: beat(1, 6, 1)}, 3, now, stale=10)] == [1, 2]
    assert [r for r, _ in hung_ranks({0: beat(0, 7, 1), 1: None}, 2, now, stale=10)] == [1]
    assert hung_ranks({0: beat(0, 7, 1), 1: beat(1, 7, 1)}, 2, now, stale=10) == []


def test_a_stopped_rank_is_named_every_process_ends_with_5_and_the_rerun_is_exact(
    tmp_path: Path, models: dict, toy_data: dict
) -> None:
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
        train={"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 2},
        checkpoint={"every_steps": 2, "keep_last": 2},
        distributed={"strategy": "ddp", "hang_timeout_minutes": LIMIT_MINUTES},
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    straight = tmp_path / "straight"
    code, log = finish(start(path, f"output_dir={straight}", nproc=2))
    assert code == 0, log[-3000:]

    run = tmp_path / "hung"
    proc = start(path, f"output_dir={run}", nproc=2)
    wait_for(logged_step(run, 3), proc)  # the checkpoint of step 2 is complete
    stopped = next(p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1")
    stopped.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    code, log = finish(proc, timeout=LIMIT_MINUTES * 60 + 120)
    assert time.monotonic() - t0 < LIMIT_MINUTES * 60 + 60, log[-3000:]
    assert code == EXIT_HUNG, log[-3000:]
    assert f"rank 1 (host {socket.gethostname()}, pid {stopped.pid}) not running" in log, log[-3000:]
    assert "no step completed in" in log and "Thread" in log  # the live rank's stack is in the log
    assert not stopped.is_running() or stopped.status() == psutil.STATUS_ZOMBIE  # nothing left behind
    record = json.loads((run / "last_exit.json").read_text())
    assert record["exit_code"] == EXIT_HUNG and "rank 1" in record["reason"]

    code, log = finish(start(path, f"output_dir={run}", nproc=2))
    assert code == 0 and "resumed from" in log, log[-3000:]
    assert losses(run) == losses(straight)
    assert max_weight_diff(final_weights(run), final_weights(straight)) == 0


WAIT = """
import sys, time
from pathlib import Path
from launcher.watchdog import Watchdog
dog = Watchdog(Path(sys.argv[1]), 0, 1, 0.02, 3)  # a 1.2 s limit
if sys.argv[2] == "over":
    dog.exiting(7)  # trained and recorded; then something keeps the process from leaving
time.sleep(60)
"""


@pytest.mark.parametrize(("state", "code"), [("training", EXIT_HUNG), ("over", 7)])
def test_no_progress_in_training_is_hung_but_after_the_run_leaves_with_its_code(
    tmp_path: Path, state: str, code: int
) -> None:
    """A process stuck in training exits 5 (hung) and records it; one stuck after its run is over (the process
    group's shutdown waiting for a rank) leaves with the run's own code and records nothing new."""
    res = subprocess.run([sys.executable, "-c", WAIT, str(tmp_path), state], capture_output=True, text=True, timeout=60)
    assert res.returncode == code, res.stderr[-2000:]
    assert "no step completed" in res.stderr
    assert (tmp_path / "last_exit.json").exists() == (state == "training")
