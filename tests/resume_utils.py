"""Drive real `ftl train` processes: run straight, kill -9 at a chosen moment, resume, compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from helpers import ROOT, read_metrics
from safetensors.torch import load_file


def start(
    cfg_path: Path,
    *overrides: str,
    nproc: int = 0,
    env: dict[str, str] | None = None,
    park_at: int = 0,
    prefix: tuple[str, ...] = (),
) -> subprocess.Popen:
    """Start `ftl train`; with `park_at` the run stalls inside that step's checkpoint write (so a kill after
    step `park_at - 1` is logged always finds the same latest complete checkpoint, however fast the machine).
    `prefix` runs it under another command (e.g. `unshare` for another host name)."""
    full_env = dict(os.environ, **(env or {}))
    if park_at:
        full_env["FTL_TEST_SLOW_CHECKPOINT"] = f"{park_at}:900"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full_env.pop(key, None)
    args = [*prefix, sys.executable, "-m", "launcher", "train", str(cfg_path), *overrides]
    args += ["--nproc", str(nproc)] if nproc else []
    # A file, not a pipe: nobody reads a pipe while a test waits for a step, and once 64 KiB of rank output
    # (library warnings) fill it, the writing rank blocks and every other rank hangs in its next collective.
    log_file = tempfile.TemporaryFile(mode="w+", prefix="ftl-test-")  # noqa: SIM115 (lives as long as proc)
    proc = subprocess.Popen(
        args, cwd=ROOT, env=full_env, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT, text=True
    )
    proc.log_file = log_file
    return proc


def output(proc: subprocess.Popen) -> str:
    """Everything the process group printed so far."""
    proc.log_file.seek(0)
    return proc.log_file.read()


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)  # a run that ignored its stop signal must not train on behind the suite
        raise
    return proc.returncode, output(proc)


def kill_after(cfg_path: Path, out: Path, *overrides: str, step: int, nproc: int = 0, **kw) -> None:
    """Start a run into `out`, SIGKILL its process group once step `step` is logged. The run is parked in step
    `step + 1`'s checkpoint write, so whatever was complete at `step` is still the latest complete checkpoint."""
    proc = start(cfg_path, f"output_dir={out}", *overrides, nproc=nproc, park_at=step + 1, **kw)
    wait_for(logged_step(out, step), proc)
    kill_group(proc)


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the condition: {output(proc)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def logged_step(run: Path, step: int) -> Callable[[], bool]:
    def cond() -> bool:
        path = run / "metrics.jsonl"
        if not path.exists():
            return False
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        return any(r.get("step", 0) >= step and "loss" in r for r in rows)

    return cond


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def losses(run: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(run) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def loss_scales(run: Path) -> list[float]:
    """The fp16 loss scale after each logged training step."""
    return [r["loss_scale"] for r in read_metrics(run) if "loss" in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    files = list(final.glob("*.safetensors"))
    assert files, f"no safetensors in {final}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def straight_and_resumed(cfg_path: Path, tmp: Path, kill_step: int = 3, resumed_at: int = 2) -> tuple[Path, Path]:
    """The run straight through, and the same run SIGKILLed after `kill_step` and resumed from its checkpoint at
    `resumed_at`: both finish, and their final weights agree within 1e-6. Returns (straight, resumed) dirs."""
    straight, run = tmp / "straight", tmp / "killed"
    code, log = finish(start(cfg_path, f"output_dir={straight}"))
    assert code == 0, log[-3000:]
    kill_after(cfg_path, run, step=kill_step)
    code, log = finish(start(cfg_path, f"output_dir={run}"))
    assert code == 0 and f"at step {resumed_at}" in log, log[-3000:]
    assert max_weight_diff(final_weights(run), final_weights(straight)) <= 1e-6
    return straight, run


def flip_bytes(checkpoint: Path) -> Path:
    """Flip 8 bytes inside the largest weights file of `checkpoint` (what a bad disk or a partial copy does to the
    data region: the file keeps its size and its header); returns the file."""
    victim = max((p for p in (checkpoint / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    at = int(len(data) * 0.6)
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    victim.write_bytes(bytes(data))
    return victim
