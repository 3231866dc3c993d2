"""Checkpoint bookkeeping in one process: retention never leaves a 'complete' checkpoint without its weights."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import base_config, ftl, write_config

from launcher import checkpoint
from launcher.checkpoint import CheckpointManager
from launcher.config import Config
from launcher.dist import DistEnv
from launcher.errors import ConfigError
from launcher.run_dir import complete_checkpoints


def test_a_kill_while_pruning_leaves_no_complete_checkpoint_without_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = Config.model_validate({"output_dir": str(tmp_path), "checkpoint": {"keep_last": 1}})
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        d = root / f"step-{step:08d}"
        (d / "model").mkdir(parents=True)
        (d / "model" / "model.safetensors").write_bytes(b"weights")
        (d / "COMPLETE").write_text(f"{step}\n")

    def killed_mid_delete(path: Path, *args: object, **kwargs: object) -> None:
        (Path(path) / "model" / "model.safetensors").unlink()  # the weights go first...
        raise KeyboardInterrupt  # ...then the process dies

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        CheckpointManager(cfg, DistEnv(), "single")._prune()
    monkeypatch.setattr(checkpoint.shutil, "rmtree", shutil.rmtree)
    done = complete_checkpoints(root)
    assert [p.name for p in done] == ["step-00000004"]
    assert all((p / "model" / "model.safetensors").exists() for p in done)


SHARDED = {
    "single": ([], []),
    "fsdp": (["distributed.strategy=fsdp"], ["--nproc", "2"]),
    "zero3": (["distributed.strategy=deepspeed", "distributed.zero_stage=3"], ["--nproc", "2"]),
}


@pytest.mark.parametrize("strategy", list(SHARDED))
def test_disk_full_says_so_and_leaves_no_partial_checkpoint(
    tmp_path: Path, small_disk: Path, models: dict, toy_data: dict, strategy: str
) -> None:
    """Every rank's writer hits the full disk (DCP, DeepSpeed, safetensors): one clear error, nothing partial."""
    overrides, nproc = SHARDED[strategy]
    cfg = base_config(
        tmp_path, models["llama"], toy_data["completion"], checkpoint={"every_steps": 2, "dir": str(small_disk)}
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    res = ftl("train", str(path), *overrides, *nproc, timeout=300)
    assert res.returncode == 1 and "no space left on device" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert list(small_disk.iterdir()) == []  # the partial write is gone: the disk is free again
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    res = ftl("train", str(path), *overrides, *nproc, timeout=300)  # after freeing space, the same command runs
    assert res.returncode == 0, res.stderr[-3000:]


def test_only_complete_checkpoints_are_found_or_loaded(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, False)):  # step 4: all files written, the marker not yet
        d = root / f"step-{step:08d}"
        (d / "model").mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        if complete:
            (d / "COMPLETE").write_text(f"{step}\n")
    auto = Config.model_validate({"output_dir": str(tmp_path)})
    assert CheckpointManager(auto, DistEnv(), "single").resume_path() == root / "step-00000002"
    explicit = Config.model_validate(
        {"output_dir": str(tmp_path), "checkpoint": {"resume": str(root / "step-00000004")}}
    )
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        CheckpointManager(explicit, DistEnv(), "single").resume_path()
