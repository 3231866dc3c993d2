"""Checkpoint bookkeeping in one process: retention never leaves a 'complete' checkpoint without its weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launcher import checkpoint
from launcher.checkpoint import CheckpointManager, complete_checkpoints
from launcher.config import Config
from launcher.dist import DistEnv


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
