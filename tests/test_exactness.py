"""Exact means bitwise: nothing outside the training computation moves the global random streams.

A resumed run may land on a new machine (a SLURM requeue onto another node) with an empty cache, and a first
run measures what a later one reads from the cache. Neither may change which dropout masks a step draws.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import base_config, build_model, read_metrics, reverse_rows, write_config, write_jsonl
from resume_utils import final_weights, finish, kill_after, losses, start

STEPS = 8


@functools.cache
def other_host() -> tuple[str, ...]:
    """A command prefix that runs ftl under another host name (a new UTS namespace; needs root), or ()."""
    prefix = ("unshare", "--uts", "sh", "-c", 'hostname ftl-requeued-node && exec "$@"', "sh")
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        ok = False
    return prefix if ok else ()


def fresh_cache(tmp: Path, name: str) -> dict[str, str]:
    """An empty ftl cache of its own: no tokenised data, no measured CPU peak, no FTL_PEAK_TFLOPS."""
    return {"FTL_CACHE_DIR": str(tmp / f"cache-{name}"), "FTL_PEAK_TFLOPS": ""}


def _config(tmp: Path, model: Path, rows: Path, kind: str, name: str = "", **sections: dict) -> Path:
    defaults = {
        "method": {"kind": kind, "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 8},
    }
    merged = {k: {**defaults.get(k, {}), **sections.get(k, {})} for k in {*defaults, *sections}}
    return write_config(tmp / f"{name or kind}.yaml", base_config(tmp, model, rows, **merged))


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with attention dropout, so full fine-tuning draws from the global stream too."""
    return build_model(tmp_path_factory.mktemp("dropout") / "llama", "llama", attention_dropout=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_resume_on_a_new_machine_is_bitwise_exact(
    tmp_path: Path, dropout_model: Path, toy_data: dict, kind: str
) -> None:
    """DDP on 2 ranks with dropout: the straight run, and the run killed after step 5 then resumed (from step 4)
    on 'another machine' (its own empty cache, another host name where the sandbox allows it), each with its
    own empty cache, log the same losses and end with the same weights, bit for bit."""
    cfg = _config(tmp_path, dropout_model, toy_data["completion"], kind)
    ddp = ["distributed.strategy=ddp"]
    code, log = finish(start(cfg, f"output_dir={tmp_path / 'straight'}", *ddp, nproc=2, env=fresh_cache(tmp_path, "a")))
    assert code == 0, log[-3000:]
    run = tmp_path / "killed"
    kill_after(cfg, run, *ddp, step=5, nproc=2, env=fresh_cache(tmp_path, "b"))
    resumed = start(cfg, f"output_dir={run}", *ddp, nproc=2, env=fresh_cache(tmp_path, "c"), prefix=other_host())
    code, log = finish(resumed)
    assert code == 0 and "at step 4" in log, log[-3000:]
    assert all((tmp_path / f"cache-{c}" / "peak_flops.json").is_file() for c in "abc")  # each run measured
    assert losses(run) == losses(tmp_path / "straight")
    assert {"step": 4, "event": "resumed"} in read_metrics(run)  # the restart is in the run's history (loss.png)
    got, want = final_weights(run), final_weights(tmp_path / "straight")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_side_work_leaves_the_random_streams_alone(tmp_path: Path, dropout_model: Path, toy_data: dict) -> None:
    """The same LoRA run with dropout, once with every kind of side work between steps (evaluation and the
    reference loss every step, a checkpoint every step, W&B offline, the CPU peak measured into an empty cache)
    and once with none of it: the losses, the final weights and the random streams saved at the common
    checkpoints are identical."""
    data = tmp_path / "data"
    data.mkdir()
    heldout = write_jsonl(data / "eval.jsonl", reverse_rows(8, seed=7))
    reference = write_jsonl(data / "reference.jsonl", [{"text": r["prompt"]} for r in reverse_rows(8, seed=9)])
    busy = _config(
        tmp_path,
        dropout_model,
        toy_data["completion"],
        "lora",
        "busy",
        data={"eval": str(heldout), "reference": str(reference)},
        checkpoint={"every_steps": 1, "keep_last": 8},
        logging={"every_steps": 1, "sample_ids": True, "wandb": {"enabled": True, "project": "t", "mode": "offline"}},
    )
    busy_env = {**fresh_cache(tmp_path, "busy"), "WANDB_SILENT": "true"}
    quiet = _config(tmp_path, dropout_model, toy_data["completion"], "lora", "quiet")
    runs = {"busy": (busy, busy_env), "quiet": (quiet, {"FTL_PEAK_TFLOPS": "1"})}
    for name, (cfg, env) in runs.items():
        code, log = finish(start(cfg, f"output_dir={tmp_path / name}", env=env))
        assert code == 0, log[-3000:]
    busy_rows = read_metrics(tmp_path / "busy")
    assert any("eval_loss" in r and "reference_loss" in r for r in busy_rows)  # the side work really ran
    assert any("mfu" in r for r in busy_rows) and (tmp_path / "cache-busy" / "peak_flops.json").is_file()
    assert losses(tmp_path / "busy") == losses(tmp_path / "quiet")
    got, want = final_weights(tmp_path / "busy"), final_weights(tmp_path / "quiet")
    assert all(torch.equal(got[k], want[k]) for k in want)
    for step in range(2, STEPS, 2):
        saved = [torch.load(tmp_path / r / "checkpoints" / f"step-{step:08d}" / "rng-rank0.pt") for r in runs]
        assert torch.equal(saved[0]["torch"], saved[1]["torch"]), f"step {step}: the torch stream moved"
        assert saved[0]["python"] == saved[1]["python"], f"step {step}: Python's stream moved"
        assert torch.equal(saved[0]["numpy"][1], saved[1]["numpy"][1]), f"step {step}: NumPy's stream moved"
