"""Checkpoints are verified before they are trusted (issue 20, point 1): a checkpoint whose bytes changed after
its save is set aside, never loaded, and the run resumes from the one before it, ending exactly where an
uninterrupted run ends; `ftl check RUN_DIR` verifies a run's checkpoints without training."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import base_config, ftl, write_config
from resume_utils import final_weights, finish, flip_bytes, kill_after, losses, max_weight_diff, start

STEPS = 8


def _config(tmp_path: Path, models: dict, toy_data: dict) -> Path:
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        train={"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 2},
        checkpoint={"every_steps": 2, "keep_last": 3},
    )
    return write_config(tmp_path / "cfg.yaml", cfg)


def test_a_corrupt_checkpoint_is_set_aside_and_the_run_still_ends_exactly(
    tmp_path: Path, models: dict, toy_data: dict
) -> None:
    """Killed after step 5 (checkpoints 2 and 4), 8 bytes of step 4's weights flipped: the rerun names the file,
    moves step 4 aside, resumes at step 2 and ends with the straight run's weights, bit for bit."""
    cfg = _config(tmp_path, models, toy_data)
    straight = tmp_path / "straight"
    code, log = finish(start(cfg, f"output_dir={straight}"))
    assert code == 0, log[-3000:]
    run = tmp_path / "killed"
    kill_after(cfg, run, step=5)
    ckpts = run / "checkpoints"
    assert ftl("check", str(run)).returncode == 0  # both complete checkpoints verify
    victim = flip_bytes(ckpts / "step-00000004")
    check = ftl("check", str(run))
    assert check.returncode == 2 and "step-00000004" in check.stderr, check.stdout + check.stderr
    assert f"{victim.relative_to(ckpts / 'step-00000004')}: checksum differs" in check.stdout
    code, log = finish(start(cfg, f"output_dir={run}"))
    assert code == 0, log[-3000:]
    assert "step-00000004 is corrupt" in log and "at step 2" in log, log[-3000:]
    assert (ckpts / "corrupt-step-00000004").is_dir()  # kept for inspection, not deleted
    assert losses(run) == losses(straight)
    assert max_weight_diff(final_weights(run), final_weights(straight)) == 0


def test_no_verified_checkpoint_left_or_a_corrupt_resume_path_exits_2(
    tmp_path: Path, models: dict, toy_data: dict
) -> None:
    """Every checkpoint corrupt: exit 2 naming them, nothing trained from scratch behind the user's back; an
    explicit checkpoint.resume that is corrupt: exit 2, nothing moved. A manifest part missing counts as corrupt;
    a checkpoint from before manifests (none at all) loads unverified, saying so."""
    cfg = _config(tmp_path, models, toy_data)
    run = tmp_path / "run"
    kill_after(cfg, run, step=3)  # checkpoint 2 only
    step2 = run / "checkpoints" / "step-00000002"
    flip_bytes(step2)
    res = ftl("train", str(cfg), f"output_dir={run}", f"checkpoint.resume={step2}")
    assert res.returncode == 2 and f"checkpoint.resume: {step2} is corrupt" in res.stderr, res.stderr[-2000:]
    assert step2.is_dir()
    res = ftl("train", str(cfg), f"output_dir={run}")
    assert res.returncode == 2 and "no verified checkpoint left" in res.stderr, res.stderr[-2000:]
    assert "corrupt-step-00000002" in res.stderr and not step2.exists()

    other = tmp_path / "old"
    kill_after(cfg, other, step=3)
    manifest = next((other / "checkpoints" / "step-00000002").glob("MANIFEST-rank*.json"))
    saved = json.loads(manifest.read_text())
    assert saved["files"]  # it covers the weights, optimizer, RNG and trainer state
    manifest.unlink()  # as written by ftl before checkpoints were verified
    check = ftl("check", str(other))
    assert check.returncode == 0 and "not verifiable (no manifest)" in check.stdout, check.stdout + check.stderr
    code, log = finish(start(cfg, f"output_dir={other}"))
    assert code == 0 and "loaded unverified" in log and "at step 2" in log, log[-3000:]


def test_a_resume_whose_data_changed_exits_2_unless_allowed(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """The checkpoint records each split's fingerprint; one row edited between the kill and the rerun: exit 2
    naming data.train's file and both fingerprints; with checkpoint.allow_data_change it resumes, saying so."""
    data = tmp_path / "data.jsonl"
    data.write_text(toy_data["completion"].read_text())
    cfg = base_config(
        tmp_path,
        models["llama"],
        data,
        train={"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 2},
        checkpoint={"every_steps": 2},
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    run = tmp_path / "run"
    kill_after(path, run, step=3)
    saved = json.loads((run / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    before = saved["data_fingerprints"]["data.train"]
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0].replace("w", "w1", 1), *lines[1:]]) + "\n")
    res = ftl("train", str(path))
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"data.train ({data}): the data differ from the checkpoint's (fingerprint {before} -> " in res.stderr
    code, log = finish(start(path, "checkpoint.allow_data_change=true"))
    assert code == 0 and "data changed since the checkpoint (checkpoint.allow_data_change)" in log, log[-3000:]
    assert "at step 2" in log
