"""The same tiny run started by torchrun, accelerate launch (ddp / deepspeed / fsdp) and `ftl --nproc`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, base_config, ftl, read_metrics, write_config

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, models: dict, toy_data: dict) -> Path:
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "lora"},
        train={"max_steps": 3, "micro_batch_size": 2, "lr": 1e-2},
    )
    return write_config(tmp_path / "cfg.yaml", cfg)


def _launch(prefix: list[str], cfg: Path, out: Path, *overrides: str) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [*prefix, "-m", "launcher", "train", str(cfg), f"output_dir={out}", *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def _accelerate_exe() -> str:
    """The accelerate CLI of this interpreter's environment (a venv's bin/ may not be on PATH)."""
    beside = Path(sys.executable).parent / "accelerate"
    return str(beside) if beside.exists() else (shutil.which("accelerate") or "accelerate")


def _accelerate(*flags: str, processes: int = 2) -> list[str]:
    """`accelerate launch` with every prompt-worthy default given, so it never asks or warns."""
    return [
        _accelerate_exe(),
        "launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(processes),
        *flags,
    ]


def test_every_launcher_gives_the_same_losses(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _cfg(tmp_path, models, toy_data)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29612"]
    ref = _launch(torchrun, cfg, tmp_path / "torchrun")
    res = ftl("train", "--nproc", "2", str(cfg), f"output_dir={tmp_path / 'nproc'}")
    assert res.returncode == 0, res.stderr[-3000:]
    nproc = [r["loss"] for r in read_metrics(tmp_path / "nproc") if "loss" in r]
    multi = _launch(_accelerate("--multi_gpu", "--main_process_port", "29611"), cfg, tmp_path / "acc_ddp")
    assert nproc == pytest.approx(ref, rel=1e-6) and multi == pytest.approx(ref, rel=1e-6)
    zero3 = _launch(
        _accelerate("--use_deepspeed", "--zero_stage", "3", "--main_process_port", "29611"), cfg, tmp_path / "acc_ds"
    )
    fsdp = _launch(
        _accelerate("--use_fsdp", "--fsdp_version", "2", "--main_process_port", "29611"), cfg, tmp_path / "acc_fsdp"
    )
    assert zero3 == pytest.approx(ref, rel=1e-4) and fsdp == pytest.approx(ref, rel=1e-4)
    saved = (tmp_path / "acc_ds" / "config.yaml").read_text()
    assert "strategy: deepspeed" in saved and "zero_stage: 3" in saved  # the launcher's choice was honoured
    assert "strategy: fsdp" in (tmp_path / "acc_fsdp" / "config.yaml").read_text()


def test_accelerate_without_multi_gpu_is_caught(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _cfg(tmp_path, models, toy_data)
    cmd = [*_accelerate(), "-m", "launcher", "train", str(cfg)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "asked for 2 processes but started only 1" in res.stderr + res.stdout
    assert not (tmp_path / "run").exists()


def test_config_contradicting_the_launcher_exits_2(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _cfg(tmp_path, models, toy_data)
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    res = ftl("train", str(cfg), "distributed.strategy=fsdp", env=env)
    assert res.returncode == 2
    assert "distributed.strategy" in res.stderr and "ACCELERATE_USE_DEEPSPEED=true" in res.stderr
    res = ftl("train", str(cfg), "distributed.zero_stage=2", env=env)
    assert res.returncode == 2 and "ACCELERATE_DEEPSPEED_ZERO_STAGE=3" in res.stderr
