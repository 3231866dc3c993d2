"""`ftl slurm status OUTPUT_DIR`: the run's SLURM job as slurmctld sees it, and the run as its files show it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from launcher.errors import ConfigError
from launcher.run_dir import SLURM_DIR, RunDir, checkpoint_step


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...); {} when slurmctld has forgotten
    the job or scontrol is missing."""
    if shutil.which("scontrol") is None:
        return {}
    try:
        res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {}
    if res.returncode != 0:
        return {}
    fields = {}
    for token in res.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _sacct_state(job_id: str) -> str | None:
    """Final state from accounting, for a job slurmctld no longer holds (when accounting is configured)."""
    if shutil.which("sacct") is None:
        return None
    try:
        res = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return None
    line = res.stdout.strip().splitlines()[:1]
    return line[0].replace("|", " exit code ") if res.returncode == 0 and line else None


def _latest_checkpoint(run: RunDir) -> str:
    latest = run.latest_checkpoint()
    return f"step {checkpoint_step(latest)} ({latest})" if latest else "none yet"


def status_lines(path: Path) -> list[str]:
    """What `ftl slurm status` prints."""
    run = RunDir.saved(path)
    jobs = run.slurm_jobs()
    if not jobs:
        raise ConfigError(
            [f"{path}: no SLURM job recorded (OUTPUT_DIR/slurm/jobs.jsonl); submit with `ftl slurm submit`"]
        )
    job = jobs[-1]
    fields = job_fields(job)
    if fields:
        get = fields.get
        state = f"{get('JobState', '?')} (exit code {get('ExitCode', '?')}, reason {get('Reason', '?')})"
        restarts = fields.get("Restarts", "0")
    else:
        state = _sacct_state(job) or "unknown: slurmctld no longer holds this job (and no accounting to ask)"
        restarts = "unknown"
    row = run.last_logged_step()
    last = (
        f"step {row['step']} loss {_number(row['loss']):.4f} step time {_number(row.get('step_time')):.2f}s"
        if row
        else "no step logged yet"
    )
    return [
        f"job:        {job}" + (f" ({len(jobs)} submitted for this run)" if len(jobs) > 1 else ""),
        f"state:      {state}",
        f"restarts:   {restarts}",
        f"checkpoint: {_latest_checkpoint(run)}",
        f"last step:  {last}",
        f"log:        {path / SLURM_DIR / f'slurm-{job}.out'}",
    ]


def _number(value: float | None) -> float:
    """A logged number; a skipped step's loss is logged as null."""
    return float("nan") if value is None else value


def print_status(run_dir: str) -> int:
    """`ftl slurm status OUTPUT_DIR`."""
    print("\n".join(status_lines(Path(run_dir))))
    return 0
