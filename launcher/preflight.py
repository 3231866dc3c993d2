"""`ftl check CONFIG [--nproc N]`: everything that can fail a run, checked before it starts, without training.
`ftl check RUN_DIR`: every checkpoint of a run verified against its checksums (launcher/manifest.py).

Config and data (as `ftl validate`), the model's config and size (built on the meta device: no weights
read), free disk for the checkpoints `keep_last` keeps plus the final model, the world size against the
visible GPUs, the rendezvous and one all-reduce across N real ranks (with a timeout), and W&B settings. The
disk and W&B checks also run at the start of `ftl train`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from launcher.config import Config
from launcher.config_checks import run_dir_of
from launcher.dist import DistEnv
from launcher.errors import ConfigError
from launcher.estimate import checkpoint_bytes, final_model_bytes
from launcher.input_checks import check_inputs
from launcher.manifest import verify_run
from launcher.metrics import log
from launcher.model import build_meta_model, param_counts
from launcher.prepare import check_output_dir
from launcher.run_dir import RunDir
from launcher.strategies.base import Strategy
from launcher.world import free_port

GiB = 2**30


def _free(path: Path) -> tuple[int, int]:
    """(free bytes, device id) of the file system that `path` is (or will be) on."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free, p.stat().st_dev


def disk_problems(cfg: Config, trainable: int, total: int) -> list[str]:
    """Free space for keep_last + 1 checkpoints (the newest is written before the oldest goes) + final/."""
    ckpt, final = checkpoint_bytes(cfg, trainable), final_model_bytes(cfg, trainable, total)
    need_ckpt = (
        ckpt * (cfg.checkpoint.keep_last + 1) if (cfg.checkpoint.every_steps or cfg.checkpoint.every_minutes) else 0
    )
    run = run_dir_of(cfg)
    (free_c, dev_c), (free_o, dev_o) = _free(run.checkpoint_root), _free(run.path)
    if dev_c == dev_o and need_ckpt + final > free_c:
        return [
            f"checkpoint.dir / output_dir: about {(need_ckpt + final) / GiB:.2f} GiB needed ({cfg.checkpoint.keep_last}"
            f"+1 checkpoints of ~{ckpt / GiB:.2f} GiB + final model ~{final / GiB:.2f} GiB), {free_c / GiB:.2f} GiB "
            "free; free space, lower checkpoint.keep_last, or set checkpoint.dir elsewhere"
        ]
    problems = []
    if dev_c != dev_o and need_ckpt > free_c:
        problems.append(f"checkpoint.dir: about {need_ckpt / GiB:.2f} GiB needed, {free_c / GiB:.2f} GiB free")
    if dev_c != dev_o and final > free_o:
        problems.append(f"output_dir: the final model needs about {final / GiB:.2f} GiB, {free_o / GiB:.2f} GiB free")
    return problems


def wandb_problems(cfg: Config) -> list[str]:
    """Online W&B needs a key (from the environment or `wandb login`); the key itself is never printed."""
    w = cfg.logging.wandb
    if not w.enabled or w.mode != "online":
        return []
    netrc = Path.home() / ".netrc"
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if os.environ.get("WANDB_API_KEY") or logged_in:
        return []
    return ["logging.wandb.mode: 'online' but no WANDB_API_KEY and no `wandb login`; set one, or use mode: offline"]


def gpu_problems(cfg: Config, nproc: int) -> list[str]:
    """More local ranks than visible GPUs would put two ranks on one GPU (or fail in NCCL)."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus and nproc > gpus:
        return [f"--nproc: {nproc} ranks but {gpus} visible GPU(s) (CUDA_VISIBLE_DEVICES)"]
    return []


def model_size(cfg: Config) -> tuple[int, int]:
    """(trainable, total) parameters of the model as configured (method attached), built on the meta device."""
    try:
        return param_counts(build_meta_model(cfg))
    except (OSError, ValueError) as err:
        raise ConfigError([f"model.path: cannot build the model from {cfg.model.path}: {err}"]) from None


def rendezvous_problems(nproc: int, timeout_s: float = 120) -> tuple[list[str], str]:
    """Start `nproc` real ranks that join a process group and all-reduce once; (problems, what happened)."""
    port = os.environ.get("MASTER_PORT") or str(free_port())
    env = {**os.environ, "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": port}
    procs = []
    for rank in range(nproc):
        rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank)}
        cmd = [sys.executable, "-m", "launcher.launch.probe", str(timeout_s)]
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout_s + 30)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    if all(p.returncode == 0 for p in procs):
        return [], outs[0].strip().splitlines()[-1]
    worst = next(o for p, o in zip(procs, outs, strict=True) if p.returncode != 0)
    where = f"{env['MASTER_ADDR']}:{port}"
    return [f"rendezvous: {nproc} ranks could not meet at {where} and all-reduce: {worst.strip()[-600:]}"], ""


def run_check(cfg: Config, nproc: int) -> int:
    """`ftl check`: print each check, raise ConfigError with every problem (exit 2)."""
    problems: list[str] = []
    for step in (lambda: check_inputs(cfg, nproc if nproc > 1 else None), lambda: check_output_dir(cfg)):
        try:
            step()
        except ConfigError as err:
            problems += err.problems
    print("config and data: " + ("problems below" if problems else "ok"))
    trainable, total = model_size(cfg)
    ckpt, final = checkpoint_bytes(cfg, trainable), final_model_bytes(cfg, trainable, total)
    sizes = f"checkpoint ~{ckpt / 2**20:.1f} MiB, final ~{final / 2**20:.1f} MiB"
    print(f"model: {total:,} parameters, {trainable:,} trained; {sizes}")
    for name, found in (
        ("disk", disk_problems(cfg, trainable, total)),
        ("gpus", gpu_problems(cfg, nproc)),
        ("wandb", wandb_problems(cfg)),
    ):
        print(f"{name}: {'problem' if found else 'ok'}")
        problems += found
    if nproc > 1:
        found, said = rendezvous_problems(nproc, timeout_s=cfg.distributed.timeout_minutes * 60)
        print(f"rendezvous: {said or 'problem'}")
        problems += found
    if problems:
        raise ConfigError(problems)
    print("ready to train")
    return 0


def check_room(cfg: Config, strategy: Strategy, env: DistEnv) -> None:
    """`ftl check`'s cheap parts before the first step: W&B can log (else exit 2); the disk has room for the
    checkpoints and final model (an estimate: a warning)."""
    problems = wandb_problems(cfg)
    if problems:
        raise ConfigError(problems)
    if env.is_main:
        for problem in disk_problems(cfg, *param_counts(strategy.unwrapped)):
            log(f"warning: {problem}")


def check_checkpoints(run_dir: Path) -> int:
    """Verify every complete checkpoint of the run in `run_dir` and print one line each: 0 when none is corrupt,
    2 when one is (it is named; nothing is moved: a training run sets corrupt ones aside itself)."""
    run = RunDir.saved(run_dir)
    rows = verify_run(run.checkpoint_root)
    if not rows:
        print(f"{run_dir}: no complete checkpoint under {run.checkpoint_root}")
        return 0
    for step, path, verdict in rows:
        print(f"step {step:>8}  {path}  {verdict}")
    bad = [path.name for _, path, verdict in rows if verdict != "verified" and not verdict.startswith("not verif")]
    if bad:
        sys.stderr.write(f"ftl: corrupt checkpoint(s): {', '.join(bad)}\n")
        return 2
    return 0
