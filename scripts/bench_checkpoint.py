"""Benchmark: checkpoint save time, load time and size per strategy and method; resume cost at step 10 vs
step 10,000 (equal when resuming jumps to the data position instead of replaying the dataloader).

    python scripts/bench_checkpoint.py [--model DIR] [--strategies single,ddp,fsdp,zero2,zero3]

Without --model it builds a random Llama (hidden 256, 4 layers). Runs real `ftl train` processes (2 ranks
for the distributed strategies) and reads ftl's own log lines. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from bench_strategies import STRATEGIES, run_ftl, text_rows, write_cfg  # scripts/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]

SAVE = re.compile(r"checkpoint step (\d+): \S+ \(([\d.]+) MiB, ([\d.]+)s\)")
LOAD = re.compile(r"resumed from \S+ at step (\d+) .*loaded in ([\d.]+)s")


def ftl(cfg: Path, *overrides: str, nproc: int = 0) -> tuple[str, float]:
    t0 = time.perf_counter()
    log = run_ftl(cfg, *overrides, nproc=nproc)
    return log, time.perf_counter() - t0


def bench_one(root: Path, model: Path, data: Path, kind: str, name: str) -> dict:
    strategy, nproc, dist = STRATEGIES[name]
    cfg = write_cfg(root, model, data, kind, strategy, dist)
    log, _ = ftl(cfg, nproc=nproc)
    _, size, save_s = SAVE.search(log).groups()
    shutil.rmtree(root / "run" / "final")
    log, _ = ftl(cfg, "train.max_steps=4", nproc=nproc)
    load_s = LOAD.search(log).group(2)
    return {"strategy": name, "method": kind, "size_mib": float(size), "save_s": float(save_s), "load_s": float(load_s)}


def resume_cost(root: Path, model: Path, data: Path, at: int) -> float:
    """Wall time of a resumed run that trains one step, from a checkpoint claiming step `at`."""
    run = root / f"resume{at}"
    cfg = write_cfg(root, model, data, "lora", "single", {})
    ftl(cfg, f"output_dir={run}")  # writes checkpoints/step-00000002
    src = run / "checkpoints" / "step-00000002"
    dst = run / "checkpoints" / f"step-{at:08d}"
    shutil.copytree(src, dst)
    state = json.loads((dst / "trainer_state.json").read_text())
    state["step"] = at
    (dst / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(run / "final")
    _, seconds = ftl(cfg, f"output_dir={run}", f"train.max_steps={at + 1}")
    return seconds


def main() -> None:
    from bench_train import make_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--strategies", default="single,ddp,fsdp,zero2,zero3")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or make_model(root)
        data = text_rows(root / "data.jsonl", 64, 40)
        for name in args.strategies.split(","):
            for kind in ("full", "lora"):
                sub = root / f"{name}-{kind}"
                sub.mkdir()
                rows.append(bench_one(sub, model, data, kind, name))
        r10, r10k = resume_cost(root, model, data, 10), resume_cost(root, model, data, 10_000)
    print("\n| strategy | method | checkpoint size (MiB) | save (s) | load (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['strategy']} | {r['method']} | {r['size_mib']:.1f} | {r['save_s']:.2f} | {r['load_s']:.2f} |")
    print(f"\nresume + 1 step, whole process: at step 10: {r10:.1f}s; at step 10,000: {r10k:.1f}s")


if __name__ == "__main__":
    main()
