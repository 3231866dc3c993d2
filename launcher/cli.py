"""`ftl` subcommands: parse, call, and map errors to exit codes.

Each command imports what it runs inside its own function: that keeps the light commands (`validate`,
`estimate`, `slurm status`) free of torch and `--help` instant. These are the only function-local imports of
ftl modules besides the strategies' (launcher/strategies/__init__.py) and the bottleneck adapters'
(launcher/methods/adapter.py).

Exit codes: 0 success; 1 the run failed; 2 bad input (config, data, paths), reported before heavy work;
3 stopped early on request (signal, STOP file, max_minutes) with a checkpoint saved: rerun to resume;
4 a NaN/inf loss or gradient (train.nonfinite), nothing non-finite saved; 5 hung (a rank stopped: named in the
log). `ftl estimate`: 0 fits, 1 does not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.config import Config
from launcher.config_loading import load_config
from launcher.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, ConfigError


def _count(text: str) -> int:
    """A whole number of at least 0 (argparse turns the ValueError into exit 2 naming the option)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftl", description="Fine-tune LLMs: full, LoRA, QLoRA; DDP/FSDP/DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config (joins torchrun/accelerate/srun ranks)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted.key=value, applied after the file")
    t.add_argument("--nproc", type=_count, default=0, help="spawn N local ranks (CPU: gloo, GPU: nccl)")
    v = sub.add_parser("validate", help="print the resolved config, or every problem (exit 2)")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    e = sub.add_parser("export", help="write a run's final model as a Hugging Face directory")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--merge", action="store_true", help="fold LoRA/QLoRA adapters into the base weights")
    e.add_argument("--checkpoint", help="export checkpoints/step-N (any strategy, consolidated offline)")
    c = sub.add_parser(
        "check",
        help="preflight: config, data, model size, disk, GPUs, rendezvous, W&B (exit 2); given a run directory: "
        "verify its checkpoints' checksums",
    )
    c.add_argument("config", help="a config file, or a run directory (output_dir) whose checkpoints to verify")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--nproc", type=_count, default=0, help="also start N ranks that meet and all-reduce once")
    m = sub.add_parser("estimate", help="per-rank peak memory before launch; whether it fits (exit 0) or not (1)")
    m.add_argument("config")
    m.add_argument("overrides", nargs="*")
    m.add_argument("--nproc", type=_count, default=1, help="ranks the run will have (default 1)")
    gpu = m.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", help="a GPU by name (H100, A100-40GB, L4, ...): its memory, CUDA overheads")
    gpu.add_argument("--gpu-mem", type=float, help="GiB per GPU (any GPU); without --gpu*: this machine's CPU")
    _slurm_parser(sub.add_parser("slurm", help="submit a run to SLURM, or show its job"))
    return p


def _slurm_parser(s: argparse.ArgumentParser) -> None:
    sub = s.add_subparsers(dest="slurm_command", required=True)
    st = sub.add_parser("status", help="job state, restarts, latest checkpoint, last logged step")
    st.add_argument("output_dir")
    p = sub.add_parser("submit", help="validate here, render OUTPUT_DIR/slurm/job.sbatch, sbatch it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, applied after the file")
    p.add_argument("--nodes", type=int, required=True)
    per_node = p.add_mutually_exclusive_group()
    per_node.add_argument("--gpus-per-node", type=int, default=0, help="GPU job: one rank per GPU")
    per_node.add_argument("--ntasks-per-node", type=int, help="CPU job: ranks per node (default 1)")
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS or D-HH:MM:SS")
    for name in ("partition", "account", "qos", "constraint", "mem", "job-name"):
        p.add_argument(f"--{name}")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--signal-grace", type=int, default=300, help="seconds before the limit to save (default 300)")
    p.add_argument("--max-requeues", type=int, default=3, help="times the job requeues itself (default 3)")
    p.add_argument("--launch", default="srun", help="srun (a task per rank, default) | torchrun | accelerate")
    p.add_argument(
        "--sbatch-arg", action="append", default=[], help="extra #SBATCH option, repeatable: --sbatch-arg=--exclusive"
    )
    p.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing")


def _problems(err: ConfigError) -> int:
    print("ftl: invalid input:", file=sys.stderr)
    for line in err.problems:
        print(f"  - {line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def resolved_config(args: argparse.Namespace) -> Config:
    """File + overrides + what the process launcher asked for; every problem at once (exit 2)."""
    from launcher.launch.accelerate_env import apply_launcher_env

    cfg, notes = apply_launcher_env(load_config(args.config, args.overrides))
    if notes and int(os.environ.get("RANK", "0")) == 0:
        from launcher.metrics import log

        for note in notes:
            log(f"from the launcher: {note}")
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = resolved_config(args)
    from launcher.input_checks import check_inputs

    check_inputs(cfg)
    print(cfg.to_yaml(), end="")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolved_config(args)
    from launcher.input_checks import check_inputs

    check_inputs(cfg, args.nproc if args.nproc > 1 else None)  # before torch is even imported
    if args.nproc > 1:
        from launcher.launch.local import spawn_local_ranks

        return spawn_local_ranks(args.nproc, [args.config, *args.overrides], cfg.checkpoint.stop_signals)
    from launcher.stop import listen_early

    listen_early(cfg.checkpoint.stop_signals)  # before the heavy imports below
    from launcher.trainer import run_training

    return run_training(cfg)


def _leave_rank(code: int) -> None:
    """End a rank process of a multi-rank run without interpreter finalisation. The run is over, saved, and
    its process group destroyed, but now and then a gloo worker thread still met teardown and aborted the
    rank ("terminate called without an active exception", exit 250) after a complete run (seen in CI)."""
    from launcher.world import env_world

    if env_world()[1] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def cmd_check(args: argparse.Namespace) -> int:
    from launcher.preflight import check_checkpoints, run_check

    if Path(args.config).is_dir():
        return check_checkpoints(Path(args.config))
    return run_check(resolved_config(args), args.nproc)


def cmd_estimate(args: argparse.Namespace) -> int:
    from launcher.estimate import report

    cuda = args.gpu is not None or args.gpu_mem is not None
    cfg = load_config(args.config, args.overrides, cuda=cuda)
    try:
        fits, text = report(cfg, max(args.nproc, 1), cuda, args.gpu, args.gpu_mem)
    except (OSError, KeyError, ValueError) as err:  # no/odd config.json, an unknown GPU name
        raise ConfigError([f"ftl estimate: {err}"]) from None
    print(text)
    return EXIT_OK if fits else EXIT_FAILED


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.export import export_run

    export_run(args.run_dir, args.out, merge=args.merge, checkpoint=args.checkpoint)
    return EXIT_OK


def cmd_slurm(args: argparse.Namespace) -> int:
    if args.slurm_command == "status":
        from launcher.launch.slurm_status import print_status

        return print_status(args.output_dir)
    from launcher.launch.slurm_job import SlurmOptions, submit

    names = ("nodes", "time", "gpus_per_node", "ntasks_per_node", "partition", "account", "qos", "constraint")
    names += ("mem", "cpus_per_task", "signal_grace", "max_requeues", "launch", "job_name", "sbatch_args")
    opts = SlurmOptions(**{n: getattr(args, "sbatch_arg" if n == "sbatch_args" else n) for n in names})
    return submit(args.config, args.overrides, opts, dry_run=args.dry_run)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if argv is None and args.command == "train":
        from launcher.launch.allocator import use_tcmalloc

        use_tcmalloc(sys.argv[1:])  # returns only when tcmalloc is loaded already, absent, or opted out
    commands = {"train": cmd_train, "validate": cmd_validate, "check": cmd_check, "export": cmd_export}
    handler = {**commands, "estimate": cmd_estimate, "slurm": cmd_slurm}[args.command]
    try:
        code = handler(args)
    except ConfigError as err:
        return _problems(err)
    except KeyboardInterrupt:
        return 130
    if argv is None and args.command == "train":  # the process's own entry, not a caller in the same process
        _leave_rank(code)
    return code
