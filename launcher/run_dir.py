"""Reading a run directory without torch: the one place that knows its layout and reads it.

OUTPUT_DIR holds config.yaml (the run's resolved config), metrics.jsonl (one row per logged step or eval),
last_exit.json (how rank 0 saw the run end), wandb_id.txt, final/ and slurm/jobs.jsonl (`ftl slurm submit`).
Checkpoints live under CHECKPOINT_ROOT (checkpoint.dir, else OUTPUT_DIR/checkpoints) as step-00000040/, and
count only once their COMPLETE marker is written (last, after fsync). The writers (launcher/prepare.py,
metrics.py, checkpoint.py, trainer.py, launch/slurm_job.py) take the names from here; resume, export,
`ftl slurm status`, `ftl check` and the trainer's "already finished" read through `RunDir`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EXIT_RECORD = "last_exit.json"  # rank 0's record of how the run ended
WANDB_ID_FILE = "wandb_id.txt"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"  # the checkpoint root when checkpoint.dir is not set
SLURM_DIR = "slurm"
SLURM_JOBS_FILE = "jobs.jsonl"  # in SLURM_DIR: one row per submitted job

MARKER = "COMPLETE"
TRAIN_STATE_FILE = "trainer_state.json"  # in each checkpoint: counters, W&B id, strategy, config
CHECKPOINT_MODEL_DIR = "model"  # in each checkpoint: the strategy's own format of the weights and optimizer
STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST_PREFIX = "MANIFEST-rank"  # in each checkpoint: MANIFEST-rank{r}.json, checksums of rank r's share of files
HEARTBEAT_DIR = ".heartbeats"  # in OUTPUT_DIR: rank{r}.json, each rank's liveness (launcher/watchdog.py)
CORRUPT_PREFIX = "corrupt-"  # a checkpoint that failed verification is renamed corrupt-step-N: kept, never loaded


def step_dir_name(step: int) -> str:
    """The name of the checkpoint directory of `step`."""
    return f"step-{step:08d}"


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint directory (step-00000040) was saved at."""
    return int(STEP_DIR.match(checkpoint.name).group(1))


def is_complete(checkpoint: Path) -> bool:
    """Whether `checkpoint` has its COMPLETE marker (everything in it was written and fsynced)."""
    return (checkpoint / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_train_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: step, samples, tokens, W&B id, world size, strategy, config."""
    return json.loads((checkpoint / TRAIN_STATE_FILE).read_text())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a line cut short by a crash or a full disk is skipped, the rest count."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


@dataclass(frozen=True)
class RunDir:
    """One run's directory, read-only: `path` is OUTPUT_DIR; `checkpoint_dir` is checkpoint.dir when the run
    set one (None: OUTPUT_DIR/checkpoints)."""

    path: Path
    checkpoint_dir: Path | None = None

    @classmethod
    def of(cls, output_dir: str | Path, checkpoint_dir: str | Path | None) -> RunDir:
        """The run a config describes: its output_dir and checkpoint.dir (None or empty: not set)."""
        return cls(Path(output_dir), Path(checkpoint_dir) if checkpoint_dir else None)

    @classmethod
    def saved(cls, path: Path) -> RunDir:
        """The run in `path` as its own config.yaml describes it (readers that have only the directory)."""
        return cls.of(path, ((cls(path).config() or {}).get("checkpoint") or {}).get("dir"))

    @property
    def checkpoint_root(self) -> Path:
        """Where the run's checkpoints live."""
        return self.checkpoint_dir if self.checkpoint_dir is not None else self.path / CHECKPOINTS_DIR

    @property
    def config_file(self) -> Path:
        """The config the run saved (config.yaml)."""
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        """One JSON row per logged step or event (metrics.jsonl)."""
        return self.path / METRICS_FILE

    @property
    def exit_record_file(self) -> Path:
        """How the last run in this directory ended (last_exit.json)."""
        return self.path / EXIT_RECORD

    @property
    def final_dir(self) -> Path:
        """The final model, written once all steps are trained."""
        return self.path / FINAL_DIR

    def config(self) -> dict[str, Any] | None:
        """The config the run saved (plain YAML values, not checked), or None when it saved none."""
        if not self.config_file.is_file():
            return None
        return yaml.safe_load(self.config_file.read_text()) or {}

    def checkpoints(self) -> list[Path]:
        """The run's complete checkpoints, oldest first."""
        return complete_checkpoints(self.checkpoint_root)

    def latest_checkpoint(self) -> Path | None:
        """The run's newest complete checkpoint, or None."""
        return latest_checkpoint(self.checkpoint_root)

    def last_logged_step(self) -> dict[str, Any] | None:
        """The last training-step row of metrics.jsonl (a row with a loss; eval rows and events are not
        steps), or None when none is logged; a torn last line leaves the row before it."""
        steps = [row for row in read_rows(self.metrics_file) if "loss" in row]
        return steps[-1] if steps else None

    def exit_record(self) -> dict[str, Any] | None:
        """How rank 0 recorded the run's end (exit_code, step, reason, time, attempt), or None when there is
        no readable record (it is written whole, by rename, so a torn one means none)."""
        try:
            record = json.loads(self.exit_record_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def wandb_id(self) -> str | None:
        """The run's W&B id: the one its latest complete checkpoint saved, else the one wandb_id.txt records
        (a run that never checkpointed), else None."""
        latest = self.latest_checkpoint()
        saved = read_train_state(latest).get("wandb_id") if latest is not None else None
        if saved:
            return saved
        id_file = self.path / WANDB_ID_FILE
        return (id_file.read_text().strip() or None) if id_file.is_file() else None

    def slurm_jobs(self) -> list[str]:
        """The SLURM job ids submitted for this run (`ftl slurm submit`), oldest first."""
        return [row["job_id"] for row in read_rows(self.path / SLURM_DIR / SLURM_JOBS_FILE) if "job_id" in row]
