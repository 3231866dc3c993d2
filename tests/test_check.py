"""`ftl check`: a preflight that names each problem it finds (exit 2) and trains nothing."""

from __future__ import annotations

import socket
from pathlib import Path

from helpers import base_config, ftl, write_config


def _cfg(tmp_path: Path, models: dict, toy_data: dict, **sections: dict) -> Path:
    return write_config(
        tmp_path / "cfg.yaml", base_config(tmp_path, models["llama"], toy_data["completion"], **sections)
    )


def test_a_good_run_is_ready_and_two_ranks_meet(tmp_path: Path, models: dict, toy_data: dict) -> None:
    res = ftl("check", str(_cfg(tmp_path, models, toy_data)), "--nproc", "2", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert "2 ranks met and all-reduced (gloo)" in res.stdout and "ready to train" in res.stdout
    assert "model: " in res.stdout and not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_too_little_disk_for_the_checkpoints(tmp_path: Path, small_disk: Path, models: dict, toy_data: dict) -> None:
    cfg = _cfg(tmp_path, models, toy_data, checkpoint={"every_steps": 2, "keep_last": 3, "dir": str(small_disk)})
    res = ftl("check", str(cfg), timeout=300)
    assert res.returncode == 2 and "GiB needed" in res.stderr and "checkpoint.dir" in res.stderr, res.stderr[-2000:]


def test_ranks_that_cannot_meet(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _cfg(tmp_path, models, toy_data, distributed={"timeout_minutes": 0.2})
    with socket.socket() as taken:  # something else listens on the rendezvous port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        res = ftl("check", str(cfg), "--nproc", "2", env={"MASTER_PORT": port}, timeout=300)
    assert res.returncode == 2 and f"could not meet at 127.0.0.1:{port}" in res.stderr, res.stderr[-2000:]


def test_online_wandb_needs_a_key_and_never_prints_it(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _cfg(tmp_path, models, toy_data, logging={"wandb": {"enabled": True, "mode": "online"}})
    res = ftl("check", str(cfg), env={"HOME": str(tmp_path), "WANDB_API_KEY": ""}, timeout=300)
    assert res.returncode == 2 and "logging.wandb.mode" in res.stderr and "WANDB_API_KEY" in res.stderr
    res = ftl("check", str(cfg), env={"HOME": str(tmp_path), "WANDB_API_KEY": "sekrit-0123"}, timeout=300)
    assert res.returncode == 0 and "sekrit-0123" not in res.stdout + res.stderr
