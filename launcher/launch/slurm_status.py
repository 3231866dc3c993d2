"""`ftl slurm status OUTPUT_DIR`: the run's SLURM job as slurmctld sees it, and the run as its files show it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from launcher.errors import ConfigError
from launcher.run_dir import latest_checkpoint


def recorded_jobs(slurm_dir: Path) -> list[str]:
    """Job ids submitted for this run, oldest first."""
    path = slurm_dir / "jobs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["job_id"] for line in path.read_text().splitlines() if line.strip()]


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


def _last_step(run: Path) -> dict | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: the rows before it still count
        if "loss" in row:
            last = row
    return last


def _latest_checkpoint(run: Path) -> str:
    import yaml

    saved = run / "config.yaml"
    custom = (yaml.safe_load(saved.read_text()) or {}).get("checkpoint", {}).get("dir") if saved.is_file() else None
    root = Path(custom) if custom else run / "checkpoints"
    latest = latest_checkpoint(root)
    return f"step {int(latest.name.split('-')[1])} ({latest})" if latest else "none yet"


def status_lines(run: Path) -> list[str]:
    """What `ftl slurm status` prints."""
    jobs = recorded_jobs(run / "slurm")
    if not jobs:
        raise ConfigError(
            [f"{run}: no SLURM job recorded (OUTPUT_DIR/slurm/jobs.jsonl); submit with `ftl slurm submit`"]
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
    row = _last_step(run)
    last = (
        f"step {row['step']} loss {row['loss']:.4f} step time {row.get('step_time', float('nan')):.2f}s"
        if row
        else "no step logged yet"
    )
    return [
        f"job:        {job}" + (f" ({len(jobs)} submitted for this run)" if len(jobs) > 1 else ""),
        f"state:      {state}",
        f"restarts:   {restarts}",
        f"checkpoint: {_latest_checkpoint(run)}",
        f"last step:  {last}",
        f"log:        {run / 'slurm' / f'slurm-{job}.out'}",
    ]


def print_status(run_dir: str) -> int:
    """`ftl slurm status OUTPUT_DIR`."""
    print("\n".join(status_lines(Path(run_dir))))
    return 0
