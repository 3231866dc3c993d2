"""`ftl slurm submit`: validate on the login node, render OUTPUT_DIR/slurm/job.sbatch, submit it, record the id.

The job script is `slurm/ftl.sbatch` with its #SBATCH block and settings block replaced; its body (launch,
signal trap, requeue) is the same text a user may copy and submit by hand. Every #SBATCH value is written
literally: sbatch expands no variables there.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config import Config
from launcher.config_loading import load_config
from launcher.errors import ConfigError
from launcher.input_checks import check_inputs
from launcher.launch.slurm_status import job_fields
from launcher.prepare import check_output_dir
from launcher.run_dir import SLURM_DIR, SLURM_JOBS_FILE, RunDir

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "ftl.sbatch"
LAUNCHES = ("srun", "torchrun", "accelerate")
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING"}
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class SlurmOptions:
    """What the job asks of SLURM (the `ftl slurm submit` options)."""

    nodes: int
    time: str
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    signal_grace: int = 300
    max_requeues: int = 3
    launch: str = "srun"
    job_name: str | None = None
    sbatch_args: list[str] = field(default_factory=list)

    @property
    def procs_per_node(self) -> int:
        """Ranks per node: one per GPU, else --ntasks-per-node, else 1."""
        return self.gpus_per_node or self.ntasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def time_limit_seconds(text: str) -> int | None:
    """SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; None when malformed."""
    m = _TIME.match(text.strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if b is None:
        return a * 60  # MM
    if c is None:
        return a * 60 + b  # MM:SS
    return a * 3600 + b * 60 + c  # HH:MM:SS


def options_problems(opts: SlurmOptions) -> list[str]:
    """Every problem with the submit options, each naming its option."""
    p: list[str] = []
    if opts.nodes < 1:
        p.append(f"--nodes: must be at least 1 (got {opts.nodes})")
    if opts.gpus_per_node < 0 or (opts.ntasks_per_node is not None and opts.ntasks_per_node < 1):
        p.append("--gpus-per-node / --ntasks-per-node: must be positive")
    if opts.gpus_per_node and opts.ntasks_per_node:
        p.append("--gpus-per-node / --ntasks-per-node: give one (a GPU job runs one rank per GPU)")
    limit = time_limit_seconds(opts.time)
    if limit is None:
        p.append(f"--time: {opts.time!r} is not a SLURM time limit (HH:MM:SS, D-HH:MM:SS or minutes)")
    elif opts.signal_grace >= limit:
        p.append(f"--signal-grace: {opts.signal_grace} s is not shorter than --time ({limit} s)")
    if opts.signal_grace < 1:
        p.append("--signal-grace: must be at least 1 second (time to finish a step and save a checkpoint)")
    if opts.max_requeues < 0:
        p.append("--max-requeues: must be 0 or more")
    if opts.launch not in LAUNCHES:
        p.append(f"--launch: must be one of {', '.join(LAUNCHES)}")
    for name, value in _literal_values(opts):
        if re.search(r"[$`\n\r]", value):
            p.append(f"{name}: {value!r} — #SBATCH values are literal; sbatch expands no variables or commands")
    for arg in opts.sbatch_args:
        if not arg.startswith("--"):
            p.append(f"--sbatch-arg: {arg!r} must be a long option such as --exclusive or --mail-type=END")
    return p


def _literal_values(opts: SlurmOptions) -> list[tuple[str, str]]:
    named = ("partition", "account", "qos", "constraint", "mem", "job_name", "time")
    out = [(f"--{n.replace('_', '-')}", getattr(opts, n)) for n in named if getattr(opts, n) is not None]
    return out + [("--sbatch-arg", a) for a in opts.sbatch_args]


def sbatch_lines(opts: SlurmOptions, out_dir: Path, workdir: Path) -> list[str]:
    """The #SBATCH header, every value literal."""
    tasks = opts.procs_per_node if opts.launch == "srun" else 1
    lines = [
        f"--job-name={opts.job_name or out_dir.name}",
        f"--chdir={workdir}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={tasks}",
    ]
    if opts.gpus_per_node:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    for name in ("cpus_per_task", "mem", "partition", "account", "qos", "constraint"):
        value = getattr(opts, name)
        if value is not None:
            lines.append(f"--{name.replace('_', '-')}={value}")
    lines += [
        f"--time={opts.time}",
        f"--signal=B:USR1@{opts.signal_grace}",
        "--requeue",
        "--open-mode=append",
        f"--output={out_dir / 'slurm' / 'slurm-%j.out'}",
        *opts.sbatch_args,
    ]
    return [f"#SBATCH {line}" for line in lines]


def settings_lines(opts: SlurmOptions, config: Path, overrides: list[str], out_dir: Path) -> list[str]:
    """The job script's settings block (shell assignments, quoted)."""
    q = shlex.quote
    return [
        f"FTL_PYTHON={q(sys.executable)}",
        f"FTL_CONFIG={q(str(config))}",
        f"FTL_OVERRIDES=({' '.join(q(o) for o in overrides)})",
        f"FTL_OUTPUT_DIR={q(str(out_dir))}",
        f"FTL_LAUNCH={opts.launch}",
        f"FTL_PROCS_PER_NODE={opts.procs_per_node}",
        f"FTL_MAX_REQUEUES={opts.max_requeues}",
    ]


def render(template: str, header: list[str], settings: list[str]) -> str:
    """The template with its #SBATCH block and its settings block replaced."""
    lines = template.splitlines()
    sb = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    start = lines.index("# ---- ftl settings ----")
    end = lines.index("# ---- end of ftl settings ----")
    lines[start + 1 : end] = settings
    lines[sb[0] : sb[-1] + 1] = header
    return "\n".join(lines) + "\n"


def job_script(config: str, overrides: list[str], opts: SlurmOptions) -> tuple[Config, str]:
    """Validate everything a login node can (config for the job's device, data, options), then render."""

    problems = options_problems(opts)
    try:
        cfg = load_config(config, overrides, cuda=opts.gpus_per_node > 0)
        check_inputs(cfg, opts.world_size)
        check_output_dir(cfg)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from None
    if problems:
        raise ConfigError(problems)
    out_dir, workdir = Path(cfg.output_dir).resolve(), Path.cwd()
    header = sbatch_lines(opts, out_dir, workdir)
    settings = settings_lines(opts, Path(config).resolve(), overrides, out_dir)
    return cfg, render(TEMPLATE.read_text(), header, settings)


def submit(config: str, overrides: list[str], opts: SlurmOptions, dry_run: bool = False) -> int:
    """`ftl slurm submit`: print the script (dry run), or write, submit and record it. Returns the exit code."""
    cfg, script = job_script(config, overrides, opts)
    if dry_run:
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError(
            [
                "sbatch: not found on PATH; run `ftl slurm submit` on a SLURM login node (--dry-run "
                "prints the job script without submitting)"
            ]
        )
    out_dir = Path(cfg.output_dir).resolve()
    refuse_if_active(RunDir(out_dir))
    slurm_dir = out_dir / SLURM_DIR
    slurm_dir.mkdir(parents=True, exist_ok=True)
    path = slurm_dir / "job.sbatch"
    tmp = slurm_dir / ".job.sbatch.tmp"
    tmp.write_text(script)
    tmp.replace(path)
    res = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError([f"sbatch refused the job: {res.stderr.strip() or res.stdout.strip()}"])
    job_id = res.stdout.strip().split(";")[0]
    with (slurm_dir / SLURM_JOBS_FILE).open("a") as f:
        f.write(json.dumps({"job_id": job_id, "submitted": time.time(), "script": str(path)}) + "\n")
    print(f"submitted job {job_id}")
    print(f"  script: {path}")
    print(f"  log:    {slurm_dir / f'slurm-{job_id}.out'}")
    print(f"  status: ftl slurm status {cfg.output_dir}")
    return 0


def refuse_if_active(run: RunDir) -> None:
    """Two jobs training into one OUTPUT_DIR would overwrite each other's checkpoints."""
    jobs = run.slurm_jobs()
    if not jobs:
        return
    state = job_fields(jobs[-1]).get("JobState")
    if state in ACTIVE_STATES:
        raise ConfigError(
            [f"output_dir: job {jobs[-1]} is still {state} for {run.path}; wait for it or `scancel {jobs[-1]}`"]
        )
