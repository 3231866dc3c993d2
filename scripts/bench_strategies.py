"""Benchmark: tokens/s, peak memory per rank and checkpoint size for each strategy (2 ranks for the
distributed ones), for a given model and sequence length.

    python scripts/bench_strategies.py [--model DIR] [--seq 128] [--steps 6] [--kind full|lora]
        [--strategies single,ddp,fsdp,zero1,zero2,zero3,zero3_offload]

Without --model it builds a random Llama (hidden 512, 4 layers). Real `ftl train` processes; numbers are
read from ftl's own metrics.jsonl and log lines. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

STRATEGIES = {
    "single": ("single", 0, {}),
    "ddp": ("ddp", 2, {}),
    "fsdp": ("fsdp", 2, {}),
    "zero1": ("deepspeed", 2, {"zero_stage": 1}),
    "zero2": ("deepspeed", 2, {"zero_stage": 2}),
    "zero3": ("deepspeed", 2, {"zero_stage": 3}),
    "zero3_offload": ("deepspeed", 2, {"zero_stage": 3, "offload": "all"}),
}
PEAK = re.compile(r"rank (\d+): peak memory (\d+) MiB")
SAVE = re.compile(r"checkpoint step (\d+): \S+ \(([\d.]+) MiB, ([\d.]+)s;")


def run_ftl(cfg: Path, *overrides: str, nproc: int = 0) -> str:
    """Run `ftl train` to completion; return its log (stderr). Exit on failure."""
    args = [sys.executable, "-m", "launcher", "train", str(cfg), *overrides]
    args += ["--nproc", str(nproc)] if nproc else []
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    return res.stderr


def write_cfg(root: Path, model: Path, data: Path, kind: str, strategy: str, dist: dict, **train: int) -> Path:
    cfg = {
        "output_dir": str(root / "run"),
        "model": {"path": str(model)},
        "method": {"kind": kind, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"train": str(data), "format": "text", "max_seq_len": train.pop("seq", 64)},
        "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 1e-3, **train},
        "distributed": {"strategy": strategy, **dist},
        "checkpoint": {"every_steps": 2},
    }
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def text_rows(path: Path, n: int, words: int) -> Path:
    from helpers import WORDS

    rows = [{"text": " ".join(WORDS[(i * 7 + j) % 50] for j in range(words))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench(root: Path, model: Path, data: Path, name: str, kind: str, seq: int, steps: int) -> dict:
    strategy, nproc, dist = STRATEGIES[name]
    cfg = write_cfg(root, model, data, kind, strategy, dist, seq=seq, max_steps=steps)
    log = run_ftl(cfg, nproc=nproc)
    rows = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    tps = statistics.median([r["tokens_per_s"] for r in rows if "loss" in r][1:])
    peaks = sorted((int(r), int(m)) for r, m in PEAK.findall(log))
    size = float(SAVE.search(log).group(2))
    return {"strategy": name, "tokens_per_s": tps, "peaks": [m for _, m in peaks], "ckpt_mib": size}


def main() -> None:
    from bench_train import make_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--kind", default="full", choices=["full", "lora"])
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or make_model(root)
        data = text_rows(root / "data.jsonl", 256, args.seq)
        for name in args.strategies.split(","):
            sub = root / name
            sub.mkdir()
            results.append(bench(sub, model, data, name, args.kind, args.seq, args.steps))
    print(f"\n{args.kind}, seq {args.seq}, micro batch 2 per rank, fp32 on CPU")
    print("| strategy | tokens/s (all ranks) | peak memory per rank (MiB) | checkpoint (MiB) |")
    print("| --- | --- | --- | --- |")
    for r in results:
        peaks = " / ".join(str(p) for p in r["peaks"])
        print(f"| {r['strategy']} | {r['tokens_per_s']:.0f} | {peaks} | {r['ckpt_mib']:.1f} |")


if __name__ == "__main__":
    main()
