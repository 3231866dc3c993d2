"""A diverging run (lr 1e30) never ends as "done" with NaN weights: abort names the step and its samples and
saves nothing non-finite; skip drops the update of a non-finite step and gives up after N in a row."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from helpers import base_config, read_metrics, write_config
from resume_utils import finish, start
from safetensors.torch import load_file

EXIT_NONFINITE = 4  # documented in the README


def _diverging(tmp_path: Path, models: dict, toy_data: dict, **train: object) -> tuple[Path, Path]:
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        train={"max_steps": 8, "micro_batch_size": 2, "lr": 1e30, "warmup_steps": 0, "schedule": "constant", **train},
        checkpoint={"every_steps": 1, "keep_last": 10},
    )
    return write_config(tmp_path / "cfg.yaml", cfg), tmp_path / "run"


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model" / "trainable.safetensors")


def _batch_ids(step: int, num_samples: int, batch: int, seed: int) -> list[int]:
    """Sample ids of 1-based step `step`, from the documented order: one seeded permutation per epoch, cut
    into global batches."""
    epoch, k = divmod(step - 1, num_samples // batch)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)[k * batch : (k + 1) * batch].tolist()


def test_abort_names_the_step_and_saves_nothing_nonfinite(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """Abort exits 4 naming the non-finite step and exactly that step's samples; nothing non-finite is saved."""
    cfg, run = _diverging(tmp_path, models, toy_data)
    code, log = finish(start(cfg, f"output_dir={run}", "logging.sample_ids=true", "train.seed=5"))
    assert code == EXIT_NONFINITE, log[-3000:]
    assert "has a non-finite loss or gradient" in log and "samples of step" in log
    named = re.search(r"step (\d+) has a non-finite .*samples of step \1: \[([\d, ]+)\]", log)
    assert named, log[-3000:]
    logged = {r["step"]: r["sample_ids"] for r in read_metrics(run) if "sample_ids" in r}
    assert logged and all(ids == _batch_ids(s, 64, 2, seed=5) for s, ids in logged.items())  # the order holds
    step = int(named[1])
    assert [int(i) for i in named[2].split(",")] == _batch_ids(step, 64, 2, seed=5)
    assert not (run / "final").exists()
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert all(torch.isfinite(t).all() for c in saved for t in _weights(c).values())
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert all(r["loss"] is not None for r in rows) and len(rows) == len(saved)


def test_skip_drops_the_update_then_gives_up(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg, run = _diverging(tmp_path, models, toy_data, nonfinite="skip", max_skipped_steps=3)
    code, log = finish(start(cfg, f"output_dir={run}"))
    assert code == EXIT_NONFINITE and "3 in a row" in log, log[-3000:]
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    skipped = [s for s, r in rows.items() if r["loss"] is None]
    assert skipped and rows[max(rows)]["skipped_steps"] == len(skipped)
    first = skipped[0]
    before = _weights(run / "checkpoints" / f"step-{first - 1:08d}")
    after = _weights(run / "checkpoints" / f"step-{first:08d}")
    assert all(torch.equal(before[k], after[k]) for k in before)  # a skipped step updates nothing
