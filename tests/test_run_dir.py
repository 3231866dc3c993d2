"""Reading a run directory (launcher/run_dir.py) on hand-built directories: what resume, export, `ftl slurm
status`, `ftl check` and the trainer's "already finished" see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.dist import DistEnv
from launcher.launch.slurm_status import status_lines
from launcher.run_dir import MARKER, TRAIN_STATE_FILE, RunDir, step_dir_name
from launcher.trainer import finished_before


def _checkpoint(root: Path, step: int, complete: bool = True, wandb_id: str | None = "abc123") -> Path:
    """A checkpoint directory as CheckpointManager.save leaves it (weights stand in as bytes)."""
    d = root / step_dir_name(step)
    (d / "model").mkdir(parents=True)
    (d / "model" / "model.safetensors").write_bytes(b"weights")
    (d / TRAIN_STATE_FILE).write_text(json.dumps({"step": step, "wandb_id": wandb_id, "strategy": "single"}))
    if complete:
        (d / MARKER).write_text(f"{step}\n")
    return d


def _metrics(run: Path, *lines: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_an_incomplete_newest_checkpoint_is_never_returned(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    complete = [_checkpoint(root, s) for s in (2, 9, 10)]
    _checkpoint(root, 12, complete=False)  # killed mid-write: no marker
    (root / ".step-00000014.tmp").mkdir()  # killed before the rename
    (root / "step-14").mkdir()  # not a checkpoint name
    run = RunDir(tmp_path)
    assert run.checkpoints() == complete  # oldest first, by step
    assert run.latest_checkpoint() == root / "step-00000010"
    assert RunDir(tmp_path / "elsewhere").latest_checkpoint() is None


def test_checkpoints_live_where_the_saved_config_puts_them(tmp_path: Path) -> None:
    run_path, custom = tmp_path / "run", tmp_path / "scratch" / "ckpts"
    run_path.mkdir()
    (run_path / "config.yaml").write_text(
        yaml.safe_dump({"output_dir": str(run_path), "checkpoint": {"dir": str(custom)}})
    )
    _checkpoint(custom, 4)
    _checkpoint(run_path / "checkpoints", 8)  # not this run's: checkpoint.dir moved them
    saved = RunDir.saved(run_path)
    assert saved.config()["checkpoint"]["dir"] == str(custom)
    assert saved.latest_checkpoint() == custom / "step-00000004"
    assert RunDir.saved(tmp_path / "no-config").checkpoint_root == tmp_path / "no-config" / "checkpoints"
    assert RunDir(tmp_path / "no-config").config() is None


def test_a_torn_last_metrics_line_gives_the_step_before_it(tmp_path: Path) -> None:
    _metrics(
        tmp_path,
        '{"step": 1, "loss": 2.5, "step_time": 0.1}',
        '{"step": 2, "loss": 2.25, "step_time": 0.1}',
        '{"step": 2, "eval_loss": 2.4}',
        '{"step": 2, "event": "resumed"}',
        '{"step": 3, "loss": 2.',  # the run was killed while writing this row
    )
    assert RunDir(tmp_path).last_logged_step() == {"step": 2, "loss": 2.25, "step_time": 0.1}
    assert RunDir(tmp_path / "empty").last_logged_step() is None


def test_the_exit_record_is_read_whole_or_not_at_all(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.exit_record() is None
    record = {"exit_code": 3, "step": 6, "reason": "SIGUSR1", "time": 1.0, "attempt": None}
    (tmp_path / "last_exit.json").write_text(json.dumps(record) + "\n")
    assert run.exit_record() == record
    (tmp_path / "last_exit.json").write_text('{"exit_code": 0, "st')
    assert run.exit_record() is None


def test_the_wandb_id_comes_from_the_latest_complete_checkpoint(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.wandb_id() is None
    (tmp_path / "wandb_id.txt").write_text("fromfile\n")
    assert run.wandb_id() == "fromfile"  # no checkpoint yet: the id the run recorded when it started
    _checkpoint(tmp_path / "checkpoints", 2, wandb_id="older")
    _checkpoint(tmp_path / "checkpoints", 4, wandb_id="saved")
    _checkpoint(tmp_path / "checkpoints", 6, complete=False, wandb_id="torn")
    assert run.wandb_id() == "saved"


def test_slurm_jobs_are_read_in_submission_order(tmp_path: Path) -> None:
    assert RunDir(tmp_path).slurm_jobs() == []
    (tmp_path / "slurm").mkdir()
    rows = [json.dumps({"job_id": j, "submitted": 0.0}) for j in ("41", "57")]
    (tmp_path / "slurm" / "jobs.jsonl").write_text("\n".join(rows) + "\n")
    assert RunDir(tmp_path).slurm_jobs() == ["41", "57"]


def test_slurm_status_shows_the_run_as_its_files_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_path, custom = tmp_path / "run", tmp_path / "ckpts"
    _metrics(run_path, '{"step": 3, "loss": 1.5, "step_time": 0.25}', '{"step": 4, "loss": nu')
    (run_path / "config.yaml").write_text(yaml.safe_dump({"checkpoint": {"dir": str(custom)}}))
    (run_path / "slurm").mkdir()
    (run_path / "slurm" / "jobs.jsonl").write_text('{"job_id": "17"}\n')
    _checkpoint(custom, 2)
    _checkpoint(custom, 4, complete=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, no sacct: the job's state is unknown
    lines = status_lines(run_path)
    assert f"checkpoint: step 2 ({custom / 'step-00000002'})" in lines
    assert "last step:  step 3 loss 1.5000 step time 0.25s" in lines
    assert f"log:        {run_path / 'slurm' / 'slurm-17.out'}" in lines


def test_a_run_is_finished_only_when_its_record_says_so_and_final_exists(tmp_path: Path) -> None:
    record = tmp_path / "last_exit.json"
    (tmp_path / "final").mkdir()
    record.write_text(json.dumps({"exit_code": 0, "step": 12, "reason": None}) + "\n")
    assert finished_before(tmp_path, 12, DistEnv())
    assert record.is_file()  # a finished run keeps its record
    assert not finished_before(tmp_path, 20, DistEnv())  # asked for more steps: it trains on
    assert not record.exists()  # how an earlier run ended is not how this one will
    record.write_text(json.dumps({"exit_code": 3, "step": 12, "reason": "STOP file"}) + "\n")
    assert not finished_before(tmp_path, 12, DistEnv())  # stopped early is not finished
    record.write_text(json.dumps({"exit_code": 0, "step": 12, "reason": None}) + "\n")
    (tmp_path / "final").rmdir()
    assert not finished_before(tmp_path, 12, DistEnv())  # no final model: not finished
