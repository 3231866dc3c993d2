"""Benchmark: checkpoint save time, load time and size per strategy and method; resume cost at step 10 vs
step 10,000 (equal when resuming jumps to the data position instead of replaying the dataloader).

    python scripts/bench_checkpoint.py [--model DIR] [--strategies single,ddp,fsdp,zero2,zero3]

Without --model it builds a random Llama (hidden 512, 4 layers). Runs real `ftl train` processes (2 ranks
for the distributed strategies) and reads ftl's own log lines. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_strategies import STRATEGIES, run_ftl, text_rows, write_cfg  # scripts/ is on sys.path

from launcher.manifest import write_share

ROOT = Path(__file__).resolve().parents[1]

SAVE = re.compile(r"checkpoint step (\d+): \S+ \(([\d.]+) MiB, ([\d.]+)s; checksums ([\d.]+)s\)")
VERIFY = re.compile(r"step-\d+: checksums verified in ([\d.]+)s")
LOAD = re.compile(r"resumed from \S+ at step (\d+) .*loaded in ([\d.]+)s")


def ftl(cfg: Path, *overrides: str, nproc: int = 0) -> tuple[str, float]:
    t0 = time.perf_counter()
    log = run_ftl(cfg, *overrides, nproc=nproc)
    return log, time.perf_counter() - t0


def bench_one(root: Path, model: Path, data: Path, kind: str, name: str) -> dict:
    strategy, nproc, dist = STRATEGIES[name]
    cfg = write_cfg(root, model, data, kind, strategy, dist)
    extra = ["method.qlora.compute_dtype=float32"] if kind == "qlora" else []  # bf16 is emulated on this CPU
    log, _ = ftl(cfg, *extra, nproc=nproc)
    _, size, save_s, hash_s = SAVE.search(log).groups()
    shutil.rmtree(root / "run" / "final")
    log, _ = ftl(cfg, "train.max_steps=4", *extra, nproc=nproc)
    load_s, verify_s = LOAD.search(log).group(2), VERIFY.search(log).group(1)
    return {
        "strategy": name,
        "method": kind,
        "size_mib": float(size),
        "save_s": float(save_s),
        "hash_s": float(hash_s),
        "load_s": float(load_s),
        "verify_s": float(verify_s),
    }


def checkpoint_at(root: Path, model: Path, data: Path, at: int) -> tuple[Path, Path]:
    """A LoRA run whose latest complete checkpoint claims step `at` (a copy of its real step-2 checkpoint)."""
    run = root / f"resume{at}"
    cfg = write_cfg(root, model, data, "lora", "single", {})
    ftl(cfg, f"output_dir={run}")  # writes checkpoints/step-00000002
    dst = run / "checkpoints" / f"step-{at:08d}"
    shutil.copytree(run / "checkpoints" / "step-00000002", dst)
    state = json.loads((dst / "trainer_state.json").read_text())
    state["step"] = at
    (dst / "trainer_state.json").write_text(json.dumps(state))
    write_share(dst, 0, 1)  # the edited trainer_state.json would otherwise (rightly) fail verification
    return cfg, run


def resume_once(cfg: Path, run: Path, at: int) -> dict[str, float]:
    """Resume at `at` and train one step: whole-process wall time, checkpoint load time, first step time."""
    shutil.rmtree(run / "final", ignore_errors=True)
    for later in (run / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > at:
            shutil.rmtree(later)
    log, seconds = ftl(cfg, f"output_dir={run}", f"train.max_steps={at + 1}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r.get("step") == at + 1 and "loss" in r)
    return {"wall_s": seconds, "load_s": float(LOAD.search(log).group(2)), "step_s": step["step_time"]}


def resume_costs(root: Path, model: Path, data: Path, repeats: int = 3) -> dict[int, dict[str, float]]:
    """Median over interleaved repeats of `resume_once` at step 10 and at step 10,000."""
    runs = {at: checkpoint_at(root, model, data, at) for at in (10, 10_000)}
    samples: dict[int, list[dict[str, float]]] = {at: [] for at in runs}
    for _ in range(repeats):
        for at, (cfg, run) in runs.items():
            samples[at].append(resume_once(cfg, run, at))
    return {at: {k: statistics.median(s[k] for s in got) for k in got[0]} for at, got in samples.items()}


def main() -> None:
    from bench_train import make_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--strategies", default="single,ddp,fsdp,zero2,zero3")
    ap.add_argument("--qlora", default="single,fsdp,zero3", help="strategies that also get a QLoRA row")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or make_model(root)
        data = text_rows(root / "data.jsonl", 64, 40)
        for name in args.strategies.split(","):
            kinds = ("full", "lora", "qlora") if name in args.qlora.split(",") else ("full", "lora")
            for kind in kinds:
                sub = root / f"{name}-{kind}"
                sub.mkdir()
                rows.append(bench_one(sub, model, data, kind, name))
        resume = resume_costs(root, model, data)
    print("\n| strategy | method | size (MiB) | save (s) | of it checksums (s, %) | load (s) | verify (s, % of load) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        hashing = f"{r['hash_s']:.2f} ({100 * r['hash_s'] / max(r['save_s'], 1e-9):.1f}%)"
        verify = f"{r['verify_s']:.2f} ({100 * r['verify_s'] / max(r['load_s'], 1e-9):.1f}%)"
        cells = [r["strategy"], r["method"], f"{r['size_mib']:.1f}", f"{r['save_s']:.2f}", hashing]
        print("| " + " | ".join([*cells, f"{r['load_s']:.2f}", verify]) + " |")
    print("\n| resume at step | whole process + 1 step (s) | checkpoint load (s) | first step (s) |")
    print("| --- | --- | --- | --- |")
    for at, r in resume.items():
        print(f"| {at:,} | {r['wall_s']:.1f} | {r['load_s']:.2f} | {r['step_s']:.3f} |")
    print("(medians of 3 interleaved repeats; no replay means the two rows differ only by noise)")


if __name__ == "__main__":
    main()
