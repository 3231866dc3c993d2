"""Chaos: kill real `ftl train` runs at random moments, rerun the same command until it finishes, and count
what was lost. Every cell but "W&B ids" must be 0 (W&B ids: 1 per trial).

    python scripts/chaos.py [--trials 20] [--strategies single,fsdp,zero3] [--seed 0] [--kills 2]
                            [--faults kill,corrupt,stop]

Each trial (seeded: `--seed S` replays a failure) kills a run up to --kills times, each time at a moment drawn
uniformly over that attempt's own expected duration (start-up, then the steps it still has to do, from the
uninterrupted run's timings; so also inside checkpoint writes, pruning and the final save), by SIGKILL to the
whole process group or, for 2-rank runs, to the `--nproc` launcher only. A first attempt that finishes before
its kill is started afresh with a new draw, so every trial is hit at least once. After each
kill: processes of the run still alive 10 s later are orphans; every checkpoint marked COMPLETE must hold
its weights and trainer state. The last attempt runs to the end; its steps and final weights are compared
with an uninterrupted run of the same config.

Two faults that are not crashes join the kills (--faults): `corrupt` flips 8 bytes in the largest file of the
latest complete checkpoint before the last attempt (detected: the log sets it aside as corrupt); `stop`, in 2-rank
runs, ends one attempt by SIGSTOP to one rank once the attempt has logged a step (detected: every process ends
with exit 5, hung, and the log names the stopped rank). Either way the run must still end equal to the
uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import base_config, build_model, reverse_rows, write_config, write_jsonl  # noqa: E402
from resume_utils import final_weights, flip_bytes, max_weight_diff  # noqa: E402

STRATEGIES = {
    "single": (["distributed.strategy=single"], 0),
    "fsdp": (["distributed.strategy=fsdp"], 2),
    "zero3": (["distributed.strategy=deepspeed", "distributed.zero_stage=3"], 2),
}
STEPS = 12
HANG_MINUTES = 0.25  # distributed.hang_timeout_minutes of the chaos runs: a stopped rank is named within seconds
EXIT_HUNG = 5


def start(cfg: Path, run: Path, overrides: list[str], nproc: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "launcher", "train", str(cfg), f"output_dir={run}", *overrides]
    args += ["--nproc", str(nproc)] if nproc else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    log = (run.parent / f"{run.name}.log").open("a")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_processes(run: Path) -> list[psutil.Process]:
    """Live processes whose command line names this run's output_dir."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"output_dir={run}" in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def corrupt_checkpoints(run: Path) -> int:
    """COMPLETE checkpoints that lack their trainer state or model files."""
    bad = 0
    for ckpt in (run / "checkpoints").glob("step-*"):
        if not (ckpt / "COMPLETE").is_file():
            continue
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            ok = any(p.is_file() and p.stat().st_size for p in (ckpt / "model").rglob("*"))
        except (OSError, ValueError):
            ok = False
        bad += not ok
    return bad


def kill(proc: subprocess.Popen, launcher_only: bool) -> None:
    if proc.poll() is not None:
        return
    if launcher_only:
        os.kill(proc.pid, signal.SIGKILL)  # the ranks must die with it (PDEATHSIG)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def done_steps(run: Path) -> int:
    """The step of the latest COMPLETE checkpoint (where the next attempt resumes), 0 when none."""
    steps = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()]
    return max(steps, default=0)


def kill_moment(rng: random.Random, timing: tuple[float, float], run: Path) -> float:
    """Uniform over this attempt's expected duration: start-up plus the steps left to do."""
    startup, training = timing
    return rng.uniform(0.0, startup + training * (STEPS - done_steps(run)) / STEPS)


def last_step(run: Path) -> int:
    """The last step the run's metrics.jsonl logged (0 when none)."""
    rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return max((json.loads(r).get("step", 0) for r in rows if r.strip()), default=0)


def stop_one_rank(cfg: Path, run: Path, overrides: list[str], nproc: int) -> tuple[int, int, int]:
    """An attempt ended by SIGSTOP to rank 1 once it logged a step with steps still to train: (1 if stopped,
    1 if it then ended hung (exit 5) naming that rank, orphans). The launcher kills the stopped rank itself. An
    attempt already at its last steps is left to finish (a rank stopped after the training is a late exit,
    not a hang)."""
    before = last_step(run) if (run / "metrics.jsonl").is_file() else 0
    proc = start(cfg, run, overrides, nproc)
    while proc.poll() is None and last_step(run) <= before:
        time.sleep(0.1)
    ranks = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    if proc.poll() is not None or not ranks or last_step(run) > STEPS - 3:
        proc.wait(timeout=1800)
        return 0, 0, 0
    ranks[0].send_signal(signal.SIGSTOP)
    try:
        code = proc.wait(timeout=HANG_MINUTES * 60 * 3 + 120)
    except subprocess.TimeoutExpired:  # not detected: end it so the trial goes on, and count it as missed
        kill(proc, launcher_only=False)
        code = None
    log = (run.parent / f"{run.name}.log").read_text()
    named = f"pid {ranks[0].pid}) not running" in log
    time.sleep(3)
    orphans = run_processes(run)
    for p in orphans:
        p.kill()
    return 1, int(code == EXIT_HUNG and named), len(orphans)


def trial(
    cfg: Path, run: Path, name: str, rng: random.Random, timing: tuple[float, float], kills: int, faults: set[str]
) -> dict:
    overrides, nproc = STRATEGIES[name]
    out = {"kills": 0, "corrupt": 0, "failed_resumes": 0, "orphans": 0}
    out |= {"corruptions": 0, "corruptions_detected": 0, "stops": 0, "stops_detected": 0}
    wanted, fresh_starts = rng.randint(1, kills), 0
    while out["kills"] < wanted:
        proc = start(cfg, run, overrides, nproc)
        time.sleep(kill_moment(rng, timing, run))
        if proc.poll() is not None:  # finished before the kill
            if out["kills"] or fresh_starts == 3:
                break
            shutil.rmtree(run)  # not hit yet: start the trial afresh with a new draw
            fresh_starts += 1
            continue
        out["kills"] += 1
        kill(proc, launcher_only=bool(nproc) and rng.random() < 0.5)
        time.sleep(3)  # PDEATHSIG acts at once; a group kill leaves nothing
        orphans = run_processes(run)
        out["orphans"] += len(orphans)
        for p in orphans:
            p.kill()
        out["corrupt"] += corrupt_checkpoints(run)
    if "stop" in faults and nproc:
        stopped, detected, orphans = stop_one_rank(cfg, run, overrides, nproc)
        out["stops"] += stopped
        out["stops_detected"] += detected
        out["orphans"] += orphans
    complete = [p for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()]
    if "corrupt" in faults and len(complete) >= 2 and not (run / "final").is_dir():  # one left to resume from
        flip_bytes(max(complete))
        out["corruptions"] += 1
    mark = (run.parent / f"{run.name}.log").stat().st_size if (run.parent / f"{run.name}.log").exists() else 0
    proc = start(cfg, run, overrides, nproc)
    code = proc.wait(timeout=1800)
    out["failed_resumes"] += code != 0
    with (run.parent / f"{run.name}.log").open() as f:
        f.seek(mark)
        out["corruptions_detected"] += int(out["corruptions"] > 0 and " is corrupt (" in f.read())
    return out


def reference_timing(path: Path, root: Path, name: str) -> tuple[float, float]:
    """(start-up, training) seconds of an uninterrupted run; the first run warms caches and is not timed."""
    for ref in ("warmup", "ref"):
        t0, first_row = time.monotonic(), None
        proc = start(path, root / ref, *STRATEGIES[name])
        while proc.poll() is None:
            if first_row is None and (root / ref / "metrics.jsonl").is_file():
                first_row = time.monotonic() - t0
            time.sleep(0.05)
        if proc.returncode != 0:
            raise SystemExit(f"the uninterrupted {name} run failed: {(root / f'{ref}.log').read_text()[-3000:]}")
    wall = time.monotonic() - t0
    startup = first_row if first_row is not None else 0.0
    return startup, wall - startup


def compare(run: Path, ref: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    ids = {d.name.rsplit("-", 1)[-1] for d in (run / "wandb").glob("offline-run-*")}
    diff = max_weight_diff(final_weights(run), final_weights(ref)) if (run / "final").is_dir() else float("inf")
    return {
        "weight_diff": diff,
        "missing_steps": len(set(range(1, STEPS + 1)) - set(steps)),
        "duplicated_steps": len(steps) - len(set(steps)),
        "wandb_ids": len(ids),
    }


def chaos(root: Path, name: str, trials: int, seed: int, kills: int, faults: set[str]) -> dict[str, float]:
    model = build_model(root / "model")
    data = write_jsonl(root / "data.jsonl", reverse_rows(96, seed=1))
    cfg = base_config(
        root,
        model,
        data,
        method={"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
        train={"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2},
        checkpoint={"every_steps": 2, "keep_last": 2},
        logging={"every_steps": 1, "wandb": {"enabled": True, "project": "chaos"}},
        distributed={"hang_timeout_minutes": HANG_MINUTES},
    )
    path = write_config(root / "cfg.yaml", cfg)
    timing = reference_timing(path, root, name)
    print(f"{name}: start-up {timing[0]:.1f} s, training {timing[1]:.1f} s", file=sys.stderr, flush=True)
    total = {"trials": trials, "kills": 0, "corrupt": 0, "failed_resumes": 0, "orphans": 0, "weight_diff": 0.0}
    total |= {"missing_steps": 0, "duplicated_steps": 0, "wandb_ids_max": 0}
    total |= {"corruptions": 0, "corruptions_detected": 0, "stops": 0, "stops_detected": 0}
    for i in range(trials):
        run = root / f"trial{i}"
        got = trial(path, run, name, random.Random(f"{seed}-{name}-{i}"), timing, kills, faults)
        got |= compare(run, root / "ref") if got["failed_resumes"] == 0 else {}
        counted = ("kills", "corrupt", "failed_resumes", "orphans", "missing_steps", "duplicated_steps")
        for key in (*counted, "corruptions", "corruptions_detected", "stops", "stops_detected"):
            total[key] += got.get(key, 0)
        total["weight_diff"] = max(total["weight_diff"], got.get("weight_diff", float("inf")))
        total["wandb_ids_max"] = max(total["wandb_ids_max"], got.get("wandb_ids", 0))
        print(f"{name} trial {i}: {got}", file=sys.stderr, flush=True)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--strategies", default="single,fsdp,zero3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=2, help="at most this many kills per trial")
    ap.add_argument("--faults", default="kill,corrupt,stop", help="kill, and per trial: corrupt, stop (2 ranks)")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftl-chaos-") as tmp:
        os.environ.setdefault("FTL_CACHE_DIR", str(Path(tmp) / "cache"))
        for name in args.strategies.split(","):
            (Path(tmp) / name).mkdir()
            faults = set(args.faults.split(","))
            rows.append((name, chaos(Path(tmp) / name, name, args.trials, args.seed, args.kills, faults)))
    cols = ["trials", "kills", "corrupt", "failed_resumes", "weight_diff", "missing_steps", "duplicated_steps"]
    cols += ["wandb_ids_max", "orphans", "corruptions", "corruptions_detected", "stops", "stops_detected"]
    print("| strategy | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, t in rows:
        cells = [f"{t[c]:.1e}" if c == "weight_diff" else str(t[c]) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
