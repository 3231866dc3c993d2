"""The documentation stays true: the generated reference is current, and every command it shows is exercised."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, ftl

from launcher.cli import _parser

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
HERE = "run by this file"

# Every command shown in a shell block of README.md or docs/*.md matches one of these (the first that matches
# counts). HERE: test_cheap_commands_run runs it against a tiny model with the README's my.yaml. Otherwise the
# test function, script or Makefile target named runs a command of that shape; a new command shape in the
# docs needs its own line here. Placeholders: my.yaml (the README's config), runs/my-run (its output_dir).
EXERCISED_BY: dict[str, str] = {
    r"ftl validate my\.yaml": HERE,
    r"ftl estimate my\.yaml": HERE,
    r"ftl slurm submit my\.yaml": HERE,  # with --dry-run; real submissions: tests/slurm/test_slurm_jobs.py
    r"ftl check my\.yaml --nproc \d+$": "tests/test_check.py::test_a_good_run_is_ready_and_two_ranks_meet",
    r"ftl check my\.yaml$": "tests/test_check.py::test_too_little_disk_for_the_checkpoints",
    r"ftl check runs/my-run$": (
        "tests/test_integrity.py::test_a_corrupt_checkpoint_is_set_aside_and_the_run_still_ends_exactly"
    ),
    r"ftl train my\.yaml$": "tests/test_train.py::test_loss_falls_and_run_dir_is_complete",
    r"ftl train --nproc \d+ my\.yaml": "tests/distributed/test_launchers.py::test_every_launcher_gives_the_same_losses",
    r"torchrun --nproc_per_node \d+ -m launcher train my\.yaml": (
        "tests/distributed/test_launchers.py::test_every_launcher_gives_the_same_losses"
    ),
    r"accelerate launch .*-m launcher train my\.yaml": (
        "tests/distributed/test_launchers.py::test_every_launcher_gives_the_same_losses"
    ),
    r"torchrun --nnodes \d+ --node_rank \d+ .*-m launcher train my\.yaml": (
        "tests/slurm/test_slurm_jobs.py::test_torchrun_job_preempted_twice_requeues_and_completes"
    ),
    r"srun --ntasks \d+ ftl train my\.yaml$": (
        "tests/slurm/test_slurm_jobs.py::test_two_node_job_matches_two_local_ranks"  # srun is the job's default
    ),
    r"ftl slurm status runs/my-run$": "tests/slurm/test_slurm_jobs.py::test_two_node_job_matches_two_local_ranks",
    r"sbatch runs/my-run/slurm/job\.sbatch$": (
        "tests/slurm/test_slurm_jobs.py::test_srun_job_preempted_twice_hits_the_requeue_limit_then_resubmits"
    ),
    r"touch runs/my-run/STOP$": "tests/test_resume.py::test_stop_file_and_retention",
    r"ftl export runs/my-run --checkpoint step-\d+ --out my-model$": (
        "tests/test_resume.py::test_export_from_a_checkpoint_equals_the_final_model"
    ),
    r"ftl export runs/my-run --out my-model --merge$": (
        "tests/test_train.py::test_lora_adapter_reloads_and_reproduces_the_trained_model"
    ),
    r"python scripts/config_reference\.py$": (
        "tests/test_docs.py::test_the_configuration_reference_matches_the_config_model"
    ),
    r"python scripts/chaos\.py( --\S+ \S+)*$": "tests/test_chaos.py::test_random_kills_lose_nothing",
    r"python scripts/estimate_check\.py( --\S+ \S+)*$": "scripts/estimate_check.py",
    r"python scripts/bench_vs_peer\.py( --\S+ \S+)*$": "scripts/bench_vs_peer.py",
    r"python scripts/bench_train\.py( --\S+ \S+)*$": "scripts/bench_train.py",
    r"python scripts/bench_strategies\.py( --\S+ \S+)*$": "scripts/bench_strategies.py",
    r"python scripts/bench_checkpoint\.py( --\S+ \S+)*$": "scripts/bench_checkpoint.py",
    r"python scripts/transfer_report\.py( --\S+ \S+)*$": "scripts/transfer_report.py",
    r"python scripts/preference_report\.py( --\S+ \S+)*$": "scripts/preference_report.py",
    r"bash scripts/gpu_check\.sh$": "scripts/gpu_check.sh",
    r"make demo$": "Makefile::demo",
    r"make test$": "Makefile::test",  # and .ci/run runs it
}


def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for every command in a bash/sh/shell/console block: comments dropped, `\\` continuation
    lines joined, whitespace collapsed; in console blocks only the `$ ` lines (the rest is output)."""
    found = []
    for page in PAGES:
        lang, pending = None, ""
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                lang = line[3:].strip() if lang is None else None
                continue
            if lang not in SHELL_BLOCKS:
                continue
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            line = pending + re.sub(r"(^|\s)#.*$", "", line)
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            if line.strip():
                found.append((page.relative_to(ROOT).as_posix(), " ".join(line.split())))
    return found


def exercised_by(command: str) -> str | None:
    """The EXERCISED_BY entry of a shown command, or None when no pattern matches it."""
    return next((where for pattern, where in EXERCISED_BY.items() if re.match(pattern, command)), None)


def ftl_arguments(command: str) -> list[str] | None:
    """The arguments `ftl` gets from a shown command (after `ftl`, or `-m launcher` under a launcher)."""
    words = shlex.split(command)
    if "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["launcher"]:
        return words[words.index("-m") + 2 :]
    return words[words.index("ftl") + 1 :] if "ftl" in words else None


def test_commands_exist() -> None:
    """The extraction finds the commands (an empty list would make the tests below vacuous); the README's set-up
    is the two commands a newcomer pastes, and CI runs the README's test command."""
    commands = [c for _, c in shown_commands()]
    assert len(commands) > 20, commands
    assert [c for page, c in shown_commands() if page == "README.md"][:2] == ["make demo", "make test"]
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


def test_every_shown_command_is_exercised() -> None:
    """Each command is covered by an entry, and the entry's test function, script or Makefile target exists."""
    uncovered = [f"{page}: {cmd}" for page, cmd in shown_commands() if exercised_by(cmd) is None]
    assert not uncovered, "shown commands that no test or script runs (add them to EXERCISED_BY):\n" + "\n".join(
        uncovered
    )
    for page, cmd in shown_commands():
        where = exercised_by(cmd)
        if where == HERE:
            continue
        path, _, name = where.partition("::")
        source = (ROOT / path).read_text()
        if path == "Makefile":
            assert re.search(rf"^{name}:", source, re.M), f"{page}: {cmd}: no target {name!r} in the Makefile"
        elif name:
            functions = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
            assert name in functions, f"{page}: {cmd}: {path} has no function {name}"
        for flag in re.findall(r"(?<!\S)--[\w-]+", cmd):  # a script's shown options are ones it declares
            if cmd.startswith(("python scripts/", "bash scripts/")):
                assert f'"{flag}"' in (ROOT / cmd.split()[1]).read_text(), f"{page}: {cmd}: {flag} unknown"


def test_every_shown_ftl_command_parses() -> None:
    """Every `ftl ...` / `-m launcher ...` the docs show has options and subcommands the CLI accepts."""
    for page, cmd in shown_commands():
        args = ftl_arguments(cmd)
        if args is None:
            continue
        try:
            _parser().parse_args(args)
        except SystemExit as stop:
            pytest.fail(f"{page}: {cmd}: ftl rejects its arguments (exit {stop.code})")


def the_readme_config(tmp_path: Path, models: dict, toy_data: dict) -> Path:
    """The README's my.yaml, with the tiny test model and data in place of its paths."""
    block = re.search(r"```yaml\n# my\.yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md shows no `# my.yaml` config block"
    cfg = yaml.safe_load(block.group(1))
    cfg["model"]["path"], cfg["data"]["train"] = str(models["llama"]), str(toy_data["chat"])
    cfg["output_dir"] = str(tmp_path / "runs" / "my-run")
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cheap_commands_run(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """validate / estimate / slurm submit --dry-run as shown, on the README's config: none is bad input."""
    config = the_readme_config(tmp_path, models, toy_data)
    commands = sorted({cmd for _, cmd in shown_commands() if exercised_by(cmd) == HERE})
    assert commands
    for cmd in commands:
        args = [str(config) if a == "my.yaml" else a for a in ftl_arguments(cmd)]
        if args[:2] == ["slurm", "submit"] and "--dry-run" not in args:
            args.append("--dry-run")  # never submit from a test
        res = ftl(*args, timeout=120)
        allowed = (0, 1) if args[0] == "estimate" else (0,)  # estimate: 1 means "does not fit"
        assert res.returncode in allowed and "Traceback" not in res.stderr, f"{cmd}\n{res.stdout}{res.stderr}"


def test_links_between_pages_resolve() -> None:
    """Every relative link in README.md and docs/*.md names a file that exists, and an #anchor a heading of it."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                if anchor not in slugs:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_configuration_reference_matches_the_config_model() -> None:
    """docs/configuration.md is what scripts/config_reference.py writes from launcher/config.py's fields: a field
    added, renamed or re-documented without regenerating it fails here."""
    res = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
