"""Resume is boring: kill -9 anywhere, restart the same command, get the same run (single and DDP)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
from helpers import base_config, ftl, read_metrics, write_config
from resume_utils import (
    final_weights,
    finish,
    kill_after,
    kill_group,
    logged_step,
    loss_scales,
    losses,
    max_weight_diff,
    output,
    start,
    wait_for,
)
from safetensors.torch import load_file

STEPS = 8
EXIT_STOPPED = 3  # the documented code (docs/resuming.md "Exit codes"), not the package's constant


def _config(tmp_path: Path, models: dict, toy_data: dict, kind: str, **extra: dict) -> Path:
    sections = {
        "method": {"kind": kind, "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"sample_ids": True},
    }
    for name, values in extra.items():
        sections[name] = {**sections.get(name, {}), **values}
    cfg = base_config(tmp_path, models["llama"], toy_data["completion"], **sections)
    return write_config(tmp_path / f"{kind}.yaml", cfg)


def _straight(cfg: Path, out: Path, *overrides: str, nproc: int = 0) -> Path:
    code, log = finish(start(cfg, f"output_dir={out}", *overrides, nproc=nproc))
    assert code == 0, log[-3000:]
    return out


# fp16 starts at a loss scale that overflows and grows it every step, so the scale moves across the resume
# point: a resumed run that did not restore the grad scaler would skip different steps.
FP16 = ["train.precision=fp16", f"train.fp16_initial_scale={2**20}", "train.fp16_growth_interval=1"]


@pytest.mark.parametrize(
    ("kind", "strategy", "nproc", "precision"),
    [
        ("full", "single", 0, []),
        ("lora", "single", 0, []),
        ("lora", "ddp", 2, []),
        ("full", "ddp", 2, []),
        ("full", "single", 0, FP16),
    ],
    ids=["full-single", "lora-single", "lora-ddp", "full-ddp", "full-single-fp16"],
)
def test_kill_and_resume_is_exact(
    tmp_path: Path, models: dict, toy_data: dict, kind: str, strategy: str, nproc: int, precision: list[str]
) -> None:
    cfg = _config(tmp_path, models, toy_data, kind)
    extra = [f"distributed.strategy={strategy}", *precision]
    ref = _straight(cfg, tmp_path / "straight", *extra, nproc=nproc)
    run = tmp_path / "killed"
    kill_after(cfg, run, *extra, step=5, nproc=nproc)  # step 4's checkpoint is complete; step 5 is not saved
    code, log = finish(start(cfg, f"output_dir={run}", *extra, nproc=nproc))
    assert code == 0, log[-3000:]
    assert "resumed from" in log and "at step 4" in log
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))  # each step exactly once (rows after step 4 dropped)
    assert got == want  # bit for bit: resume restores every random stream the steps draw from
    assert max_weight_diff(final_weights(run), final_weights(ref)) == 0
    ids = lambda r: [x["sample_ids"] for x in read_metrics(r) if "sample_ids" in x]  # noqa: E731
    assert ids(run) == ids(ref)  # the data order continued exactly; nothing replayed or skipped
    counters = lambda r: [(x["tokens"], x["samples"], x["epoch"]) for x in read_metrics(r) if "loss" in x]  # noqa: E731
    assert counters(run) == counters(ref)  # tokens, samples and epoch continue; none resets at the resume
    if precision:
        assert loss_scales(run) == loss_scales(ref) and len(set(loss_scales(ref))) > 2  # resumed mid-flight


def test_kill_during_checkpoint_write_uses_previous(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora")
    ref = _straight(cfg, tmp_path / "straight")
    run = tmp_path / "killed"
    proc = start(cfg, f"output_dir={run}", park_at=4)
    partial = run / "checkpoints" / ".step-00000004.tmp"
    wait_for(lambda: (partial / "trainer_state.json").exists(), proc, timeout=180)
    time.sleep(0.5)
    kill_group(proc)
    assert not (run / "checkpoints" / "step-00000004").exists()
    code, log = finish(start(cfg, f"output_dir={run}"))
    assert code == 0, log[-3000:]
    assert "at step 2" in log  # the half-written step 4 was ignored
    assert max_weight_diff(final_weights(run), final_weights(ref)) <= 1e-6
    assert not partial.exists()  # cleaned up by the next save


def test_sigusr1_to_one_rank_stops_all_with_a_checkpoint(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora", checkpoint={"every_steps": 0})
    run = tmp_path / "run"
    proc = start(cfg, f"output_dir={run}", "train.max_steps=400", "distributed.strategy=ddp", nproc=2)
    wait_for(logged_step(run, 2), proc)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)
    code, log = finish(proc, timeout=120)  # a broken handler would train all 400 steps: fail long before
    assert code == EXIT_STOPPED, log[-3000:]
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists()
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert step < 400 and max(losses(run)) <= step + 1
    assert "stopped early" in log
    share = os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"cpu_threads={share}" in log  # each rank: its share of the cores (unless OMP_NUM_THREADS says)


def test_one_run_per_output_dir_and_no_orphans(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora")
    run = tmp_path / "run"
    first = start(cfg, f"output_dir={run}", nproc=2, park_at=2)  # holds the directory, parked in a save
    wait_for((run / "checkpoints" / ".step-00000002.tmp").exists, first)
    second = ftl("train", str(cfg), f"output_dir={run}")
    assert second.returncode == 2 and "is in use by another ftl run" in second.stderr, second.stderr[-2000:]
    assert f'"host": "{socket.gethostname()}"' in second.stderr and "Traceback" not in second.stderr
    ranks = psutil.Process(first.pid).children()
    assert len(ranks) == 2
    os.kill(first.pid, signal.SIGKILL)  # only the `--nproc` launcher: its ranks must not train on as orphans
    first.wait()
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive
    code, log = finish(start(cfg, f"output_dir={run}"))  # the dead run's lock is stale: taken over
    assert code == 0, log[-3000:]
    assert sorted(losses(run)) == list(range(1, STEPS + 1))


def test_ctrl_c_saves_and_stops(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora", checkpoint={"every_steps": 0})
    run = tmp_path / "run"
    proc = start(cfg, f"output_dir={run}", "train.max_steps=400")
    wait_for(logged_step(run, 2), proc)
    proc.send_signal(signal.SIGINT)
    code, log = finish(proc, timeout=120)
    assert code == EXIT_STOPPED and "signal SIGINT" in log, log[-3000:]
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists() and saved[0].name == f"step-{max(losses(run)):08d}"


def test_sigterm_while_loading_exits_3_cleanly(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora")
    run = tmp_path / "run"
    proc = start(cfg, f"output_dir={run}")
    wait_for(lambda: "Loading weights" in output(proc), proc)  # the model is loading
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc, timeout=120)
    assert code == EXIT_STOPPED and "SIGTERM (while starting)" in log, log[-3000:]
    assert "Traceback" not in log and json.loads((run / "last_exit.json").read_text())["exit_code"] == 3


def test_time_cadence_and_deadline_are_agreed_by_all_ranks(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """every_minutes saves and max_minutes stops a 2-rank run; each rank reads its own clock, so the ranks must
    agree at the step boundary or one would enter a checkpoint's barrier while the other trains on."""
    timing = {"every_steps": 0, "every_minutes": 0.02, "max_minutes": 0.25, "keep_last": 1000}
    cfg = _config(tmp_path, models, toy_data, "lora", checkpoint=timing)
    run = tmp_path / "run"
    proc = start(cfg, f"output_dir={run}", "train.max_steps=100000", "distributed.strategy=ddp", nproc=2)
    code, log = finish(proc, timeout=300)
    assert code == EXIT_STOPPED and "max_minutes reached" in log, log[-3000:]
    saved = sorted((run / "checkpoints").glob("step-*"))
    steps = [int(p.name.removeprefix("step-")) for p in saved]
    assert steps[-1] == max(losses(run))  # the deadline saved the last step it trained
    assert 3 <= len(saved) < steps[-1]  # saved by the clock along the way, not after every step
    assert all((p / "COMPLETE").exists() and (p / "rng-rank1.pt").exists() for p in saved)


def test_stop_file_and_retention(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora", checkpoint={"every_steps": 1, "keep_last": 2, "keep_every": 3})
    run = _straight(cfg, tmp_path / "run")
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-00000003", "step-00000006", "step-00000007"]
    (run / "STOP").write_text("")
    code, log = finish(start(cfg, f"output_dir={run}", "train.max_steps=12"))
    assert code == EXIT_STOPPED and "stop file" in log  # a harmless change (max_steps) resumed, then stopped
    assert json.loads((run / "last_exit.json").read_text())["exit_code"] == 3
    assert not (run / "STOP").exists()  # consumed once its stop is saved: the same command now continues
    code, log = finish(start(cfg, f"output_dir={run}", "train.max_steps=12"))
    assert code == 0 and max(losses(run)) == 12, log[-3000:]
    assert json.loads((run / "last_exit.json").read_text())["exit_code"] == 0
    rows = (run / "metrics.jsonl").read_text()
    code, log = finish(start(cfg, f"output_dir={run}", "train.max_steps=12"))  # the same command once more
    assert code == 0 and "already finished" in log and (run / "metrics.jsonl").read_text() == rows


def test_a_metrics_row_cut_short_does_not_block_resume(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """Rows cut short are dropped on resume wherever they lie: after the resumed step, and at it (a step at or
    before the checkpoint is not re-run, so its cut row must go rather than stay unreadable in the file)."""
    cfg = _config(tmp_path, models, toy_data, "lora", checkpoint={"every_steps": 2})
    run = _straight(cfg, tmp_path / "run", "train.max_steps=3")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    lines[1] = lines[1][: len(lines[1]) // 2]  # step 2's row, the step resumed from, cut short
    path.write_text("\n".join(lines) + '\n{"step": 4, "loss":')  # and what a full disk leaves behind
    code, log = finish(start(cfg, f"output_dir={run}", "train.max_steps=5"))
    assert code == 0 and "dropped 2 unreadable row" in log and "at step 2" in log, log[-3000:]
    assert sorted(losses(run)) == [1, 3, 4, 5]  # every row readable; step 2's loss is lost, not re-run


def test_config_change_on_resume(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora")
    run = tmp_path / "run"
    proc = start(cfg, f"output_dir={run}")
    wait_for(logged_step(run, 3), proc)
    kill_group(proc)
    res = ftl("train", str(cfg), f"output_dir={run}", "method.lora.r=4")
    assert res.returncode == 2 and "method.lora.r" in res.stderr
    res = ftl("train", str(cfg), f"output_dir={run}", "train.micro_batch_size=4")
    assert res.returncode == 2 and "global batch" in res.stderr
    res = ftl("train", str(cfg), f"output_dir={run}", "logging.every_steps=2", "train.grad_accum=1")
    assert res.returncode == 0 and "resumed from" in res.stderr
    assert "config changed since the checkpoint (allowed): logging.every_steps (1 -> 2)" in res.stderr


def test_resume_from_a_path(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """checkpoint.resume: PATH continues another run's safetensors checkpoint exactly; a pickled format (FSDP's
    DCP metadata) is loaded only from the run's own checkpoints, so a foreign PATH exits 2 at validation."""
    cfg = _config(tmp_path, models, toy_data, "lora", checkpoint={"every_steps": 2, "keep_last": 5})
    src = _straight(cfg, tmp_path / "src", "train.max_steps=4")
    path = f"checkpoint.resume={src}/checkpoints/step-00000002"
    res = ftl("train", str(cfg), f"output_dir={tmp_path / 'b'}", "train.max_steps=4", path)
    assert res.returncode == 0 and "at step 2" in res.stderr, res.stderr[-3000:]
    got, want = losses(tmp_path / "b"), losses(src)
    assert sorted(got) == [3, 4] and [got[3], got[4]] == pytest.approx([want[3], want[4]], rel=1e-6)
    res = ftl("train", str(cfg), f"output_dir={tmp_path / 'c'}", "distributed.strategy=fsdp", path)
    assert res.returncode == 2 and "checkpoint.resume" in res.stderr and "pickles" in res.stderr
    assert "params:" not in res.stderr and not (tmp_path / "c").exists()  # refused before any model loaded


def test_lora_checkpoint_holds_only_the_adapter(tmp_path: Path, toy_data: dict) -> None:
    from helpers import build_model

    big = build_model(tmp_path / "big", hidden_size=256, intermediate_size=512, num_key_value_heads=4)
    cfg = base_config(
        tmp_path,
        big,
        toy_data["completion"],
        method={"kind": "lora", "lora": {"r": 4}},
        train={"max_steps": 2},
        checkpoint={"every_steps": 1},
    )
    res = ftl("train", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    base = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    assert size < 0.15 * base, (size, base)  # adapter + its optimizer state, never the frozen base
    assert "checkpoint step 1:" in res.stderr and "MiB" in res.stderr  # the size is reported


def test_wandb_offline_continues_the_same_run(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora", logging={"wandb": {"enabled": True, "project": "t"}})
    run = tmp_path / "run"
    kill_after(cfg, run, step=5, env={"WANDB_SILENT": "true"})
    first_id = (run / "wandb_id.txt").read_text().strip()
    (run / "wandb_id.txt").unlink()  # the id must come back from the checkpoint itself
    code, log = finish(start(cfg, f"output_dir={run}"))
    assert code == 0, log[-3000:]
    run_id = (run / "wandb_id.txt").read_text().strip()
    saved_id = json.loads((run / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())["wandb_id"]
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert saved_id == run_id == first_id and len(dirs) == 2
    assert all(d.name.endswith(f"-{run_id}") for d in dirs)  # two processes, one W&B run id


def test_export_from_a_checkpoint_equals_the_final_model(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models, toy_data, "lora", checkpoint={"every_steps": 2})
    const = ["train.schedule=constant", "train.warmup_steps=0"]
    long = _straight(cfg, tmp_path / "long", *const, "train.max_steps=4")
    short = _straight(cfg, tmp_path / "short", *const, "train.max_steps=2")
    res = ftl("export", str(long), "--checkpoint", "step-00000002", "--out", str(tmp_path / "exp"))
    assert res.returncode == 0, res.stderr[-3000:]
    adapter = lambda d: load_file(d / "adapter_model.safetensors")  # noqa: E731
    exported, final = adapter(tmp_path / "exp"), adapter(short / "final")
    assert exported.keys() == final.keys()
    assert max(float((exported[k] - final[k]).abs().max()) for k in final) <= 1e-6
    res = ftl("export", str(long), "--checkpoint", "step-00000002", "--merge", "--out", str(tmp_path / "merged"))
    assert res.returncode == 0 and (tmp_path / "merged" / "model.safetensors").is_file()
