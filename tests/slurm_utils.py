"""A real local SLURM cluster for tests (scripts/slurm/up.sh: slurmctld + two slurmd, n1 and n2), and helpers
that submit, signal, requeue and wait for real jobs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ROOT, ftl

from launcher.launch.slurm_status import job_fields

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
REQUIRE_ENV = "FTL_TEST_REQUIRE_SLURM"  # set by .ci/run: there a missing cluster fails the suite


def _nodes_idle() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    return out.returncode == 0 and {"n1", "n2"} <= set(states)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Use the running 2-node cluster, or start one (root only); skip with the reason where it cannot be had."""
    if _nodes_idle():
        return
    reason = None
    if os.geteuid() != 0:
        reason = "starting a local SLURM cluster needs root (scripts/slurm/up.sh)"
    else:
        subprocess.run(["bash", str(ROOT / "scripts/slurm/down.sh")], capture_output=True, timeout=120)
        res = subprocess.run(["bash", str(ROOT / "scripts/slurm/up.sh")], capture_output=True, text=True, timeout=600)
        if res.returncode != 0 or not _nodes_idle():
            reason = f"could not start a local SLURM cluster: {res.stderr[-1500:]}"
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def submit(cfg: Path, run: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """`ftl slurm submit CFG output_dir=RUN ARGS... --time 30:00` (overrides first in ARGS); returns the job id."""
    res = ftl("slurm", "submit", str(cfg), f"output_dir={run}", *args, "--time", "30:00", env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads((run / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]


def job_log(run: Path, job_id: str) -> str:
    path = run / "slurm" / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else ""


def wait_until(cond: Callable[[], bool], what: str, run: Path, job_id: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}; job {job_fields(job_id)}\n{job_log(run, job_id)[-4000:]}"
            )
        time.sleep(0.2)


def ended(job_id: str) -> bool:
    return job_fields(job_id).get("JobState") in FINAL_STATES


def wait_final(run: Path, job_id: str, timeout: float = 300) -> dict[str, str]:
    """The job's scontrol fields once it has ended (finished jobs stay known to slurmctld for 300 s)."""
    fields: dict[str, str] = {}

    def ended() -> bool:
        fields.update(job_fields(job_id))
        return fields.get("JobState") in FINAL_STATES

    wait_until(ended, "the job to end", run, job_id, timeout)
    return fields


def preempt_when_parked(run: Path, job_id: str, step: int) -> None:
    """Once the run is parked inside step `step`'s checkpoint write, send USR1 to the batch shell (as SLURM does
    `--signal=B:USR1@GRACE` before a time limit): the run finishes that checkpoint, stops at the next step."""
    parked = run / "checkpoints" / f".step-{step:08d}.tmp"
    wait_until(lambda: parked.exists() or ended(job_id), f"step {step}'s checkpoint write", run, job_id)
    assert parked.exists(), f"the job ended before step {step}: {job_log(run, job_id)[-4000:]}"
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)


def release_requeued(run: Path, job_id: str, restarts: int, stale_stop_file: bool = False) -> None:
    """Wait until the job has requeued itself for the `restarts`-th time, then skip SLURM's requeue delay.
    `stale_stop_file`: leave a STOP file behind (as a trap firing after the ranks had exited would)."""

    fields: dict[str, str] = {}

    def pending_or_ended() -> bool:
        fields.update(job_fields(job_id))
        requeued = fields.get("Restarts") == str(restarts) and fields.get("JobState") == "PENDING"
        return requeued or fields.get("JobState") in FINAL_STATES

    wait_until(pending_or_ended, f"requeue number {restarts}", run, job_id)
    assert fields.get("JobState") == "PENDING", f"the job was not requeued: {job_log(run, job_id)[-4000:]}"
    # slurmd refuses a credential issued in the same second the old one was revoked ("Job credential revoked")
    time.sleep(2)
    if stale_stop_file:
        (run / "STOP").write_text("")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
