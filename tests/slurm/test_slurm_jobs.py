"""Real jobs on the local 2-node SLURM cluster: a 2-node run, preemption (signal -> save -> requeue -> resume)
under srun and under torchrun, the requeue limit, and jobs that must NOT be requeued (crash, bad input,
no scontrol inside the job). Tiny LoRA model, 12 steps, gloo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import base_config, ftl, read_metrics, write_config
from resume_utils import final_weights, losses, max_weight_diff
from slurm_utils import (
    job_log,
    preempt_when_parked,
    release_requeued,
    slurm_cluster,  # noqa: F401  (the fixture)
    submit,
    wait_final,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

STEPS = 12
TWO_NODES = ["--nodes", "2", "--ntasks-per-node", "1"]


def _park(*steps: int, seconds: float = 8) -> dict[str, str]:
    """Each of these steps' checkpoint writes pauses, so a signal lands at a known step on any machine."""
    return {"FTL_TEST_SLOW_CHECKPOINT": ",".join(f"{s}:{seconds}" for s in steps)}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory, models: dict, toy_data: dict) -> Path:
    tmp = tmp_path_factory.mktemp("slurm")
    c = base_config(
        tmp,
        models["llama"],
        toy_data["completion"],
        method={"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
        train={"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2},
        checkpoint={"every_steps": 2, "keep_last": 10},
        logging={"every_steps": 1, "wandb": {"enabled": True, "project": "t"}},
    )
    return write_config(tmp / "cfg.yaml", c)


@pytest.fixture(scope="module")
def straight(cfg: Path) -> Path:
    """The uninterrupted 2-node job: `ftl slurm status` while it runs (parked at step 6) and after it ends."""
    run = cfg.parent / "straight"
    job = submit(cfg, run, *TWO_NODES, env=_park(6, seconds=6))
    wait_until((run / "checkpoints" / ".step-00000006.tmp").exists, "step 6", run, job)
    during = ftl("slurm", "status", str(run))
    fields = wait_final(run, job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", job_log(run, job)[-3000:]
    after = ftl("slurm", "status", str(run))
    assert "state:      RUNNING" in during.stdout and "last step:  step 6 " in during.stdout, during.stdout
    assert "checkpoint: step 4 " in during.stdout
    assert "state:      COMPLETED (exit code 0:0" in after.stdout and f"last step:  step {STEPS} " in after.stdout
    return run


def _assert_same_run(run: Path, ref: Path) -> None:
    """Every step logged exactly once with the uninterrupted run's loss; the same final weights; one W&B run."""
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-6)
    assert max_weight_diff(final_weights(run), final_weights(ref)) <= 1e-6
    run_id = (run / "wandb_id.txt").read_text().strip()
    assert all(d.name.endswith(f"-{run_id}") for d in (run / "wandb").glob("offline-run-*"))


def test_two_node_job_matches_two_local_ranks(straight: Path, cfg: Path) -> None:
    rows = [r for r in read_metrics(straight) if "loss" in r]
    assert {r["world_size"] for r in rows} == {2}
    local = cfg.parent / "local"
    res = ftl("train", "--nproc", "2", str(cfg), f"output_dir={local}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert losses(local) == pytest.approx(losses(straight), rel=1e-6)


def test_accelerate_launch_per_node_gives_the_same_run(straight: Path, cfg: Path) -> None:
    run = cfg.parent / "accelerate"
    job = submit(cfg, run, *TWO_NODES, "--launch", "accelerate")
    assert wait_final(run, job)["JobState"] == "COMPLETED", job_log(run, job)
    assert losses(run) == pytest.approx(losses(straight), rel=1e-6)


def test_srun_job_preempted_twice_hits_the_requeue_limit_then_resubmits(straight: Path, cfg: Path) -> None:
    run = cfg.parent / "srun"
    job = submit(cfg, run, *TWO_NODES, "--max-requeues", "1", env=_park(4, 8))
    preempt_when_parked(run, job, 4)  # stops at step 5, requeues (1 of 1)
    release_requeued(run, job, 1, stale_stop_file=True)  # must not stop the next attempt at once
    preempt_when_parked(run, job, 8)  # stops at step 9: the limit is reached
    fields = wait_final(run, job)
    log = job_log(run, job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "3:0" and fields["Restarts"] == "1", log
    assert "restart count 1" in log and "at step 5" in log and "stopped early at step 9" in log
    assert "requeue limit (1) is reached" in log and "removing a STOP file left by an earlier attempt" in log
    resubmit = f"sbatch {run}/slurm/job.sbatch"
    assert resubmit in log  # says how to continue; do exactly that
    second = subprocess.run(resubmit.split(), capture_output=True, text=True, check=True)
    job2 = second.stdout.split()[-1]  # "Submitted batch job N"
    assert wait_final(run, job2)["JobState"] == "COMPLETED", job_log(run, job2)
    assert "at step 9" in job_log(run, job2)
    third = subprocess.run(resubmit.split(), capture_output=True, text=True, check=True)  # once more: finished
    job3 = third.stdout.split()[-1]
    assert wait_final(run, job3)["JobState"] == "COMPLETED", job_log(run, job3)
    assert "already finished" in job_log(run, job3)  # trains nothing (its last_exit.json says so)
    _assert_same_run(run, straight)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 3  # three attempts, one W&B run id
    assert not (run / "STOP").exists()


def test_torchrun_job_preempted_twice_requeues_and_completes(straight: Path, cfg: Path) -> None:
    run = cfg.parent / "torchrun"
    job = submit(cfg, run, *TWO_NODES, "--launch", "torchrun", env=_park(4, 8))
    preempt_when_parked(run, job, 4)
    release_requeued(run, job, 1)
    preempt_when_parked(run, job, 8)
    release_requeued(run, job, 2)
    fields = wait_final(run, job)
    log = job_log(run, job)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "2", log
    assert "restart count 2" in log and "at step 5" in log and "at step 9" in log
    assert "rank 0 recorded exit code 3" in log  # torchrun itself reported the ranks' exit 3 as a failure
    _assert_same_run(run, straight)


def test_crash_fails_the_job_without_requeue(cfg: Path) -> None:
    run = cfg.parent / "crash"
    job = submit(cfg, run, *TWO_NODES, env=_park(2, seconds=60))
    wait_until((run / "checkpoints" / ".step-00000002.tmp").exists, "step 2", run, job)
    pattern = f"^{sys.executable} -m launcher train .*output_dir={run}$"  # the ranks, not srun
    ranks = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    rank0 = [p for p in ranks if b"SLURM_PROCID=0\0" in Path(f"/proc/{p}/environ").read_bytes()]
    assert len(ranks) == 2 and len(rank0) == 1, ranks
    os.kill(int(rank0[0]), signal.SIGKILL)  # as the OOM killer would, in the middle of a checkpoint write
    fields = wait_final(run, job)
    log = job_log(run, job)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0" and fields["ExitCode"] != "0:0", log
    assert "training failed" in log and "not requeued" in log


def test_bad_input_on_the_node_is_not_requeued(cfg: Path, tmp_path: Path) -> None:
    run = tmp_path / "bad"
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n' * 64)
    job = submit(cfg, run, f"data.train={data}", "--nodes", "1", "--sbatch-arg=--hold")
    data.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": \n')  # broken after validation
    subprocess.run(["scontrol", "release", job], check=True)
    fields = wait_final(run, job)
    log = job_log(run, job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0" and fields["Restarts"] == "0", log
    assert "data.jsonl" in log and "line 2" in log and "bad input (exit 2): not requeued" in log


def test_without_scontrol_the_job_says_it_cannot_requeue(cfg: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # the job's PATH: everything of /usr/bin except scontrol (as in some containers)
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "scontrol":
            (bin_dir / tool.name).symlink_to(tool)
    run = tmp_path / "nosc"
    env = {"PATH": f"{bin_dir}:/usr/local/bin", **_park(4)}
    job = submit(cfg, run, "--nodes", "1", env=env)
    preempt_when_parked(run, job, 4)
    fields = wait_final(run, job)
    log = job_log(run, job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "3:0" and fields["Restarts"] == "0", log
    assert "could not requeue itself: scontrol is not available" in log and "stopped early at step 5" in log


def test_a_hung_rank_resubmits_the_job_without_its_node(straight: Path, cfg: Path) -> None:
    """A 1-node job (2 ranks) on the 2-node cluster; rank 1 stopped (SIGSTOP) after step 3: the live rank names
    it and its node and exits 5 (hung); the job resubmits itself with --exclude=that node; the new job runs on
    the other node, resumes and finishes the same run as the uninterrupted one."""
    run = cfg.parent / "hung"
    job = submit(cfg, run, "distributed.hang_timeout_minutes=0.25", "--nodes", "1", "--ntasks-per-node", "2")
    logged = lambda: (run / "metrics.jsonl").exists() and any(r.get("step") == 3 for r in read_metrics(run))  # noqa: E731
    wait_until(logged, "step 3", run, job)
    pattern = f"^{sys.executable} -m launcher train .*output_dir={run}"
    ranks = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    environ = {p: Path(f"/proc/{p}/environ").read_bytes().split(b"\0") for p in ranks}
    rank1 = [p for p, env in environ.items() if b"SLURM_PROCID=1" in env]
    assert len(ranks) == 2 and len(rank1) == 1, ranks
    node = next(v for v in environ[rank1[0]] if v.startswith(b"SLURMD_NODENAME=")).split(b"=")[1].decode()
    os.kill(int(rank1[0]), signal.SIGSTOP)
    fields = wait_final(run, job)
    log = job_log(run, job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "5:0", log
    again = json.loads((run / "slurm" / "jobs.jsonl").read_text().splitlines()[-1])
    assert again["excluded"] == node and again["after"] == job
    assert f"rank 1 (host {node}, pid {rank1[0]}) not running" in log, log[-3000:]
    assert f"resubmitted as job {again['job_id']} excluding node(s) {node}" in log, log[-3000:]
    fields = wait_final(run, again["job_id"])
    log = job_log(run, again["job_id"])
    assert fields["JobState"] == "COMPLETED" and fields["NodeList"] not in (node, "(null)"), log[-3000:]
    assert re.search(r"resumed from \S+ at step \d+ \(saved by 2 rank", log), log[-3000:]
    _assert_same_run(run, straight)
