"""`ftl estimate` against measured peaks: run each configuration for a few steps, compare.

    python scripts/estimate_check.py [--model DIR] [--steps 2] [--only dpo,qlora,...]

Default model: SmolLM2-135M-Instruct (the demo's). Rows are long enough to fill max_seq_len (256), so the
estimate's worst case is the case measured. The measured peak is the largest rank's max RSS, which ftl logs
at the end of a run ("rank N: peak memory"); on CPU the estimate counts host memory. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

FULL = {"method": {"kind": "full"}, "train": {"micro_batch_size": 2}}
LORA = {"method": {"kind": "lora"}, "train": {"micro_batch_size": 4}}
GC = "train.gradient_checkpointing=true"
# DPO reads pairs (write_pairs): micro_batch_size counts pairs, each two sequences of max_seq_len
DPO = {**LORA, "objective": {"kind": "dpo"}, "data": {"format": "preference"}}
CONFIGS = {  # name: (config changes, extra overrides, ranks)
    "full": (FULL, ["train.gradient_checkpointing=false"], 1),
    "full, checkpointing": (FULL, ["train.gradient_checkpointing=true"], 1),
    "lora": (LORA, ["train.gradient_checkpointing=false"], 1),
    "lora, checkpointing": (LORA, ["train.gradient_checkpointing=true"], 1),
    "lora, packing": (LORA, ["data.packing=true", "train.gradient_checkpointing=false"], 1),
    "qlora, checkpointing": (
        {**LORA, "method": {"kind": "qlora"}},
        ["method.qlora.compute_dtype=float32", "train.gradient_checkpointing=true"],
        1,
    ),
    "fsdp 2 ranks, full": (FULL, ["distributed.strategy=fsdp", "train.gradient_checkpointing=true"], 2),
    "zero2 2 ranks, full": (FULL, ["distributed.strategy=deepspeed", "distributed.zero_stage=2", GC], 2),
    "zero3 2 ranks, full": (FULL, ["distributed.strategy=deepspeed", "distributed.zero_stage=3", GC], 2),
    "dpo lora": (DPO, ["train.gradient_checkpointing=false"], 1),
    "dpo lora, checkpointing": (DPO, [GC], 1),
}


def write_rows(path: Path, n: int = 64) -> None:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=400))}) + "\n" for _ in range(n)))


def write_pairs(path: Path, n: int = 64) -> None:
    """Preference rows whose prompt and completions together overflow max_seq_len: each side is cut to it."""
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]
    rows = [
        {"prompt": " ".join(rng.choices(words, k=20)), "chosen": " ".join(rng.choices(words, k=400)),
         "rejected": " ".join(rng.choices(words, k=400))}
        for _ in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def measure(cfg: Path, overrides: list[str], nproc: int) -> float:
    """The largest rank's peak RSS in GiB, from the run's own log."""
    args = [sys.executable, "-m", "launcher", "train", str(cfg), *overrides]
    res = subprocess.run([*args, "--nproc", str(nproc)], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{overrides} failed:\n{res.stderr[-3000:]}")
    peaks = [float(m) for m in re.findall(r"peak memory (\d+) MiB", res.stderr)]
    return max(peaks) / 1024


def estimated(cfg: Path, overrides: list[str], nproc: int) -> float:
    res = subprocess.run(
        [sys.executable, "-m", "launcher", "estimate", str(cfg), *overrides, "--nproc", str(nproc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return float(re.search(r"\*\*peak\*\* \| \*\*([\d.]+)\*\*", res.stdout).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", help="comma-separated: the configurations whose name contains any")
    args = ap.parse_args()
    if args.model is None:
        from demo_model import ensure_model

        args.model = ensure_model()[0]
    wanted = [w.strip() for w in (args.only or "").split(",") if w.strip()]
    names = [name for name in CONFIGS if not wanted or any(w in name for w in wanted)]
    print("| configuration | estimated GiB | measured GiB | error |\n| --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory(prefix="ftl-estimate-") as tmp:
        data, pairs = Path(tmp) / "long.jsonl", Path(tmp) / "pairs.jsonl"
        write_rows(data)
        write_pairs(pairs)
        for i, name in enumerate(names):
            change, overrides, nproc = CONFIGS[name]
            rows = pairs if change.get("data", {}).get("format") == "preference" else data
            cfg = {
                "output_dir": f"{tmp}/run{i}",
                "model": {"path": str(args.model)},
                **change,
                "data": {"train": str(rows), "format": "text", "max_seq_len": 256, **change.get("data", {})},
                "checkpoint": {"every_steps": 0},
                "train": {**change["train"], "max_steps": args.steps},
            }
            path = Path(tmp) / f"cfg{i}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            est, got = estimated(path, overrides, nproc), measure(path, overrides, nproc)
            print(f"| {name} | {est:.2f} | {got:.2f} | {(est - got) / got:+.0%} |", flush=True)


if __name__ == "__main__":
    main()
