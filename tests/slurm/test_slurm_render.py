"""`ftl slurm submit --dry-run`: the rendered job script, and what is refused on the login node (no cluster)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, base_config, ftl, write_config


@pytest.fixture
def cfg(tmp_path: Path, models: dict, toy_data: dict) -> Path:
    return write_config(tmp_path / "cfg.yaml", base_config(tmp_path, models["llama"], toy_data["completion"]))


def dry_run(cfg: Path, *args: str) -> str:
    res = ftl("slurm", "submit", str(cfg), *args, "--dry-run")
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def sbatch_options(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_gpu_multi_node_script(cfg: Path, tmp_path: Path) -> None:
    script = dry_run(
        cfg, "train.lr=3e-4", "--nodes", "4", "--gpus-per-node", "8", "--time", "1-12:00:00", "--partition", "gpu",
        "--account", "proj", "--qos", "high", "--constraint", "h100", "--mem", "0", "--cpus-per-task", "12",
        "--signal-grace", "600", "--sbatch-arg=--exclusive",
    )  # fmt: skip
    opts = sbatch_options(script)
    run = tmp_path / "run"
    assert opts == [
        "--job-name=run", f"--chdir={ROOT}", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
        "--cpus-per-task=12", "--mem=0", "--partition=gpu", "--account=proj", "--qos=high", "--constraint=h100",
        "--time=1-12:00:00", "--signal=B:USR1@600", "--requeue", "--open-mode=append",
        f"--output={run}/slurm/slurm-%j.out", "--exclusive",
    ]  # fmt: skip
    assert not any("$" in o for o in opts)  # sbatch expands nothing in #SBATCH lines
    assert f"FTL_CONFIG={cfg}" in script and "FTL_OVERRIDES=(train.lr=3e-4)" in script
    assert "FTL_LAUNCH=srun" in script and "FTL_PROCS_PER_NODE=8" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not run.exists()  # a dry run writes nothing


def test_torchrun_cpu_script_evaluates_node_values_on_each_node(cfg: Path) -> None:
    script = dry_run(cfg, "--nodes", "2", "--ntasks-per-node", "4", "--time", "90", "--launch", "torchrun")
    assert "--ntasks-per-node=1" in sbatch_options(script) and "FTL_PROCS_PER_NODE=4" in script
    assert not any("gpus" in o for o in sbatch_options(script))
    # $SLURM_NODEID inside single quotes: the task on each node expands it, never the batch shell (which
    # would make every node rank 0)
    body = script[script.index("  torchrun)") : script.index("  accelerate)")]
    quoted = re.search(r"bash -c '([^']*)'", body, re.S)
    assert quoted and '--node_rank="$SLURM_NODEID"' in quoted.group(1) and "$SLURM_NNODES" in quoted.group(1)
    assert "$SLURM_NODEID" not in body.replace(quoted.group(0), "")


def test_validation_uses_the_jobs_device_not_the_login_nodes(cfg: Path) -> None:
    fp16_zero = ["train.precision=fp16", "distributed.strategy=deepspeed", "--nodes", "1", "--time", "10:00"]
    res = ftl("slurm", "submit", str(cfg), *fp16_zero, "--dry-run")
    assert res.returncode == 2 and "train.precision" in res.stderr  # a CPU job cannot run DeepSpeed fp16
    assert "--ntasks-per-node=8" in dry_run(cfg, *fp16_zero, "--gpus-per-node", "8")  # a GPU job can


def test_bad_options_are_all_reported_with_exit_2(cfg: Path, tmp_path: Path) -> None:
    res = ftl(
        "slurm", "submit", str(cfg), "model.path=", "--nodes", "0", "--time", "1:2:3:4", "--launch", "mpirun",
        "--sbatch-arg=--comment=$HOME", "--sbatch-arg", "exclusive", "--max-requeues", "-1", "--dry-run",
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    for name in ("--nodes", "--time", "--launch", "--sbatch-arg: '--comment=$HOME'", "'exclusive'", "--max-requeues"):
        assert name in res.stderr, name
    assert "model.path" in res.stderr and "Traceback" not in res.stderr
    grace = ftl("slurm", "submit", str(cfg), "--nodes", "1", "--time", "10:00", "--signal-grace", "600")
    assert grace.returncode == 2 and "--signal-grace" in grace.stderr
    assert not (tmp_path / "run").exists()


def test_missing_sbatch_is_a_clear_error(cfg: Path, tmp_path: Path) -> None:
    res = ftl("slurm", "submit", str(cfg), "--nodes", "1", "--time", "10:00", env={"PATH": str(tmp_path)})
    assert res.returncode == 2 and "sbatch: not found on PATH" in res.stderr
    assert not (tmp_path / "run").exists()
