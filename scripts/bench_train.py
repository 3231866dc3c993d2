"""Benchmark: ftl's training throughput against a bare PyTorch loop, and packing against padding.

    python scripts/bench_train.py [--model DIR] [--steps 20] [--batch 8] [--repeats 3]

Without --model it builds a small random Llama (hidden 512, 4 layers) and a word-level tokenizer, so it runs
anywhere in about ten minutes on 2 CPU cores. Prints a table; numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_model(root: Path, hidden: int = 512) -> Path:
    """A random 4-layer Llama of the given width with a word-level tokenizer."""
    from helpers import build_model

    shape = {"hidden_size": hidden, "intermediate_size": hidden * 8 // 3, "num_hidden_layers": 4}
    return build_model(root / "model", "llama", num_key_value_heads=4, initializer_range=0.02, **shape)


def chat_rows(n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """Variable-length chat rows (lo..hi words per turn)."""
    from helpers import WORDS

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(lo, hi))]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def run_ftl(model: Path, data: Path, out: Path, steps: int, batch: int, packing: bool) -> float:
    """Median useful tokens/s of ftl over steps 2..N (LoRA, fp32)."""
    cfg = {
        "output_dir": str(out),
        "model": {"path": str(model)},
        "method": {"kind": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"train": str(data), "format": "chat", "max_seq_len": 256, "packing": packing},
        "train": {"max_steps": steps, "micro_batch_size": batch, "lr": 1e-3},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run(
        [sys.executable, "-m", "launcher", "train", str(path)],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["tokens_per_s"] for r in rows if "loss" in r][1:])


def run_bare_process(model_dir: Path, data: Path, steps: int, batch: int) -> float:
    """run_bare in a fresh process, as ftl runs in one: both start from the same state of the machine."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from bench_train import run_bare; "
        "rows = [json.loads(x) for x in Path(sys.argv[3]).read_text().splitlines()]; "
        "print(run_bare(Path(sys.argv[2]), rows, int(sys.argv[4]), int(sys.argv[5])))"
    )
    argv = [str(ROOT / "scripts"), str(model_dir), str(data), str(steps), str(batch)]
    res = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True)
    return float(res.stdout.strip().splitlines()[-1])


def run_bare(model_dir: Path, rows: list[dict], steps: int, batch: int) -> float:
    """The same LoRA step written by hand: tokenise, pad, forward, loss, backward, AdamW, zero_grad."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    speeds = []
    for step in range(steps):
        t0 = time.perf_counter()
        enc = tok(texts[step * batch : (step + 1) * batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        speeds.append(int(enc["attention_mask"].sum()) / (time.perf_counter() - t0))
    return statistics.median(speeds[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the random model (without --model)")
    ap.add_argument("--repeats", type=int, default=3, help="each measurement runs this often; the median counts")
    ap.add_argument(
        "--pack-batch", type=int, default=2, help="packed rows per micro-batch for the equal-memory packing row"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or make_model(root, args.hidden)
        same = chat_rows(args.batch * args.steps, 20, 20)  # equal lengths: no padding either way
        (root / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
        varied = chat_rows(args.batch * args.steps * 4, 2, 40)
        (root / "varied.jsonl").write_text("".join(json.dumps(r) + "\n" for r in varied))
        variants = [
            ("ftl", "same", False, args.batch),
            ("pad", "varied", False, args.batch),
            ("pack", "varied", True, args.batch),
            ("pack_mem", "varied", True, args.pack_batch),
        ]
        runs: dict[str, list[float]] = {"bare": [], **{v[0]: [] for v in variants}}
        for r in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant alike
            runs["bare"].append(run_bare_process(model, root / "same.jsonl", args.steps, args.batch))
            for name, data, packing, batch in variants:
                out = root / f"{name}{r}"
                runs[name].append(run_ftl(model, root / f"{data}.jsonl", out, args.steps, batch, packing))
    print_table(runs, args)


def print_table(runs: dict[str, list[float]], args: argparse.Namespace) -> None:
    """Median over repeats (the spread shows how noisy the machine was)."""
    med = {k: statistics.median(v) for k, v in runs.items()}
    spread = {k: f"{min(v):.0f}–{max(v):.0f}" for k, v in runs.items()}
    head = (
        f"LoRA r=16, fp32, hidden {args.hidden}, micro batch {args.batch}, {args.steps} steps, {args.repeats} repeats"
    )
    print(f"\n| run ({head}) | useful tokens/s (median) | spread | ratio |")
    print("| --- | --- | --- | --- |")
    rows = [
        ("bare PyTorch loop", "bare", "1.00"),
        ("ftl train", "ftl", f"{med['ftl'] / med['bare']:.2f} × bare"),
        ("ftl, variable-length chat, padding", "pad", "1.00"),
        ("ftl, variable-length chat, packing (same micro batch)", "pack", f"{med['pack'] / med['pad']:.2f} × padding"),
        (
            f"ftl, variable-length chat, packing ({args.pack_batch} rows × 256 per micro-batch ≈ padding's memory)",
            "pack_mem",
            f"{med['pack_mem'] / med['pad']:.2f} × padding",
        ),
    ]
    for label, key, ratio in rows:
        print(f"| {label} | {med[key]:.0f} | {spread[key]} | {ratio} |")


if __name__ == "__main__":
    main()
