"""`ftl` subcommands: parse, call, and map errors to exit codes. Heavy imports happen inside commands.

Exit codes: 0 success; 1 the run failed; 2 bad input (config, data, paths), reported before heavy work;
3 stopped early on request (signal, STOP file, max_minutes) with a checkpoint saved: rerun to resume.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

from launcher.config import Config, ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftl", description="Fine-tune LLMs: full, LoRA, QLoRA; DDP/FSDP/DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config (joins torchrun/accelerate/srun ranks)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted.key=value, applied after the file")
    t.add_argument("--nproc", type=int, default=0, help="spawn N local ranks (CPU: gloo, GPU: nccl)")
    v = sub.add_parser("validate", help="print the resolved config, or every problem (exit 2)")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    e = sub.add_parser("export", help="write a run's final model as a Hugging Face directory")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--merge", action="store_true", help="fold LoRA/QLoRA adapters into the base weights")
    e.add_argument("--checkpoint", help="export checkpoints/step-N (any strategy, consolidated offline)")
    return p


def _problems(err: ConfigError) -> int:
    print("ftl: invalid input:", file=sys.stderr)
    for line in err.problems:
        print(f"  - {line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def resolved_config(args: argparse.Namespace) -> Config:
    """File + overrides + what the process launcher asked for; every problem at once (exit 2)."""
    from launcher.launch_env import apply_launcher_env

    cfg, notes = apply_launcher_env(load_config(args.config, args.overrides))
    if notes and int(os.environ.get("RANK", "0")) == 0:
        from launcher.metrics import log

        for note in notes:
            log(f"from the launcher: {note}")
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = resolved_config(args)
    from launcher.prepare import check_inputs

    check_inputs(cfg)
    print(cfg.to_yaml(), end="")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolved_config(args)
    from launcher.prepare import check_inputs

    check_inputs(cfg, args.nproc if args.nproc > 1 else None)  # before torch is even imported
    if args.nproc > 1:
        return spawn_local_ranks(args.nproc, [args.config, *args.overrides], cfg.checkpoint.stop_signals)
    from launcher.trainer import run_training

    return run_training(cfg)


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.export import export_run

    export_run(args.run_dir, args.out, merge=args.merge, checkpoint=args.checkpoint)
    return EXIT_OK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forward_signals(procs: list[subprocess.Popen], names: list[str]) -> None:
    """A stop signal sent to `ftl train --nproc` (by SLURM, or a user) reaches every rank."""

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for name in names:
        signal.signal(getattr(signal, name), forward)


def spawn_local_ranks(nproc: int, train_args: list[str], stop_signals: list[str]) -> int:
    """Start nproc local ranks of `ftl train`; the exit code is the worst of theirs."""
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(subprocess.Popen([sys.executable, "-m", "launcher", "train", *train_args], env=env))
    forward_signals(procs, stop_signals)
    codes = [p.wait() for p in procs]
    return max(codes, key=lambda c: (c != 0, abs(c)))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"train": cmd_train, "validate": cmd_validate, "export": cmd_export}[args.command]
    try:
        return handler(args)
    except ConfigError as err:
        return _problems(err)
    except KeyboardInterrupt:
        return 130
