"""Benchmark: ftl against its peer, TRL's SFTTrainer and DPOTrainer, on the same model, data and LoRA, in one run.

    pip install -e '.[bench]'          # TRL 1.16, the peer
    python scripts/bench_vs_peer.py [--model DIR] [--steps 12] [--repeats 3] [--rows 300]

Default model: SmolLM2-135M-Instruct (the demo's, converted once into the ftl cache). Data: variable-length
chat rows (2–40 words per turn). Both sides: LoRA r=16 alpha 32 on all linear layers, fp32, micro batch 8,
max length 256, AdamW lr 1e-3, CPU. TRL runs with its defaults (gradient checkpointing on, padding), also
with tcmalloc preloaded (the allocator ftl picks for itself); ftl with its defaults (padding-free batches,
checkpointing `auto`) and with checkpointing forced on. Each run is its own process; runs are interleaved
(every variant once, then again) so a slow spell of the machine hits every variant alike. The DPO rows train
on preference pairs made from the same chat rows (chosen: the reversed words, rejected: the words shuffled),
as message lists, β 0.1 sigmoid; both sides' reference is the model with its LoRA adapter switched off, and
both count the non-padding tokens of both sequences of a pair (`--only dpo` runs them alone). Reported per
variant: useful (non-padding) tokens/s, the median over steps 2..N of one run, then the median and spread
over repeats; peak RSS of the run's process tree; wall time of the whole process. `--peer` names the rows
the ratios are taken against. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import chat_rows  # noqa: E402

# The TRL side, run as `python -c TRL_RUN MODEL DATA STEPS BATCH PACKING`; prints {"tokens_per_s": [...]} .
TRL_RUN = r"""
import json, sys, time
from datasets import load_dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

model, data, steps, batch, packing = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"

class StepSpeed(TrainerCallback):
    # useful tokens/s per step: TRL logs the cumulative non-padding token count ("num_tokens") every step
    def __init__(self):
        self.t0, self.seen, self.speeds = None, 0, []
    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.dt = time.perf_counter() - self.t0
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "num_tokens" in logs:
            self.speeds.append((logs["num_tokens"] - self.seen) / self.dt)
            self.seen = logs["num_tokens"]

cfg = SFTConfig(
    output_dir=sys.argv[6], max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
    max_length=256, packing=packing, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    bf16=False, fp16=False, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
speed = StepSpeed()
trainer = SFTTrainer(model=model, args=cfg, train_dataset=load_dataset("json", data_files=data, split="train"),
                     peft_config=lora, callbacks=[speed])
trainer.train()
print(json.dumps({"tokens_per_s": speed.speeds}))
"""


# The TRL DPO side, run as `python -c TRL_DPO_RUN MODEL DATA STEPS BATCH 0 OUT`; prints {"tokens_per_s": [...]}.
TRL_DPO_RUN = (
    TRL_RUN.replace("SFTConfig", "DPOConfig")
    .replace("SFTTrainer", "DPOTrainer")
    .replace("packing=packing, ", "beta=0.1, loss_type=['sigmoid'], ")
)


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs (message lists) from the chat rows: chosen the reference answer, rejected shuffled."""
    rng = random.Random(seed)
    rows = []
    for row in chat_rows(n, 2, 40, seed):
        user, answer = row["messages"]
        words = answer["content"].split()
        rejected = words[:]
        while rejected == words and len(set(words)) > 1:
            rng.shuffle(rejected)
        if rejected == words:
            rejected = [*words, words[0]]
        reply = {"role": "assistant", "content": " ".join(rejected)}
        rows.append({"prompt": [user], "chosen": [answer], "rejected": [reply]})
    return rows


def run_measured(args: list[str], out: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a process, sampling the RSS of its whole tree every 50 ms; returns peak RSS (GB) and wall (s)."""
    t0, peak = time.perf_counter(), 0
    with (out.parent / f"{out.name}.log").open("w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{args[:4]} failed:\n{(out.parent / f'{out.name}.log').read_text()[-3000:]}")
    return {"rss_gb": peak / 1e9, "wall_s": time.perf_counter() - t0}


def run_ftl(
    model: Path, data: Path, out: Path, steps: int, batch: int, mode: str, checkpointing: bool
) -> dict[str, float]:
    """mode: padding-free (ftl's default for unpacked rows), padding (padding_free off), packing, or dpo (pairs
    with ftl's defaults)."""
    data_cfg = {
        "train": str(data),
        "format": "chat",
        "max_seq_len": 256,
        "packing": mode == "packing",
        "padding_free": mode == "padding-free",
    }
    if mode == "dpo":
        data_cfg = {"train": str(data), "format": "preference", "max_seq_len": 256}
    cfg = {
        "output_dir": str(out),
        "model": {"path": str(model)},
        "method": {"kind": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
        "data": data_cfg,
        **({"objective": {"kind": "dpo", "beta": 0.1, "loss_type": "sigmoid"}} if mode == "dpo" else {}),
        "train": {
            "max_steps": steps,
            "micro_batch_size": batch,
            "lr": 1e-3,
            "max_grad_norm": 1.0,
            "gradient_checkpointing": checkpointing,
        },
        "checkpoint": {"every_steps": 0},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    got = run_measured([sys.executable, "-m", "launcher", "train", str(path)], out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got["tokens_per_s"] = statistics.median([r["tokens_per_s"] for r in rows if "loss" in r][1:])
    got["checkpointing"] = float("gradient_checkpointing=on" in (out.parent / f"{out.name}.log").read_text())
    return got


def run_trl(
    model: Path, data: Path, out: Path, steps: int, batch: int, mode: str, tcmalloc: bool = False
) -> dict[str, float]:
    """mode: padding or packing (SFTTrainer), or dpo (DPOTrainer)."""
    argv = [str(model), str(data), str(steps), str(batch), "1" if mode == "packing" else "0", str(out)]
    env = None
    if tcmalloc:  # the peer given the same allocator ftl picks for itself (launcher/launch/allocator.py)
        from launcher.launch.allocator import find_tcmalloc

        env = dict(os.environ, LD_PRELOAD=find_tcmalloc() or "")
    got = run_measured([sys.executable, "-c", TRL_DPO_RUN if mode == "dpo" else TRL_RUN, *argv], out, env)
    log = (out.parent / f"{out.name}.log").read_text().splitlines()
    speeds = json.loads(next(x for x in reversed(log) if x.startswith('{"tokens_per_s"')))["tokens_per_s"]
    got["tokens_per_s"] = statistics.median(speeds[1:])
    return got


# (who, batching, gradient checkpointing). TRL checkpoints by default; ftl decides (`auto`: off when the
# estimated peak without it takes at most half the memory) and batches unpacked rows padding-free.
VARIANTS: list[tuple[str, str, bool | str]] = [
    ("TRL", "padding", True),
    ("TRL + tcmalloc", "padding", True),
    ("ftl", "padding-free", "auto"),
    ("ftl", "padding-free", True),
    ("TRL", "packing", True),
    ("TRL + tcmalloc", "packing", True),
    ("ftl", "packing", "auto"),
    ("ftl", "packing", True),
    ("TRL", "dpo", True),
    ("ftl", "dpo", "auto"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated: run the variants whose label contains any")
    ap.add_argument("--peer", default="TRL", help="the rows ratios are taken against: TRL or 'TRL + tcmalloc'")
    args = ap.parse_args()
    wanted = [w for w in args.only.split(",") if w] or [""]
    variants = [v for v in VARIANTS if any(w in label(v) for w in wanted)]
    if args.model is None:
        from demo_model import ensure_model

        args.model = ensure_model()[0]
    results: dict[tuple[str, str, bool], list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="ftl-bench-") as tmp:
        chat, pairs = Path(tmp) / "chat.jsonl", Path(tmp) / "pairs.jsonl"
        chat.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(args.rows, 2, 40)))
        pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(args.rows)))
        for r in range(args.repeats):
            for who, mode, gc in variants:
                out = Path(tmp) / f"{who}-{mode}-{gc}-{r}"
                data = pairs if mode == "dpo" else chat
                if who == "ftl":
                    got = run_ftl(args.model, data, out, args.steps, args.batch, mode, gc)
                else:
                    got = run_trl(args.model, data, out, args.steps, args.batch, mode, "tcmalloc" in who)
                results[(who, mode, gc)].append(got)
                print(f"repeat {r} {who} {mode} checkpointing={gc}: {got}", file=sys.stderr, flush=True)
    print_table(results, args)


def label(variant: tuple[str, str, bool | str], chose: float | None = None) -> str:
    who, mode, gc = variant
    if gc == "auto":
        how = "auto (default)" if chose is None else f"auto → {'on' if chose else 'off'} (default)"
    else:
        how = "on" if gc else "off"
    return f"{who}, {mode}, checkpointing {how}"


def print_table(results: dict[tuple[str, str, bool], list[dict[str, float]]], args: argparse.Namespace) -> None:
    def med(v: tuple[str, str, bool], key: str) -> float:
        return statistics.median(x[key] for x in results[v])

    def spread(v: tuple[str, str, bool], key: str, fmt: str) -> str:
        xs = [x[key] for x in results[v]]
        return f"{min(xs):{fmt}}–{max(xs):{fmt}}"

    print(
        f"\n{args.model.name}, LoRA r=16 all-linear, fp32, CPU, {args.rows} chat rows of 2–40 words, "
        f"micro batch {args.batch}, max length 256, {args.steps} steps, "
        f"{args.repeats} interleaved repeats (median, spread)\n"
    )
    print(f"| run | useful tokens/s | vs {args.peer} | peak RSS GB | vs {args.peer} | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    missing = [{"tokens_per_s": float("nan"), "rss_gb": float("nan")}]  # the peer was not run (--only)
    for v in list(results):
        peer = (args.peer, v[1] if v[1] in ("packing", "dpo") else "padding", True)
        results.setdefault(peer, missing)
        tps, rss = med(v, "tokens_per_s"), med(v, "rss_gb")
        print(
            f"| {label(v, results[v][0].get('checkpointing'))} | {tps:.1f} ({spread(v, 'tokens_per_s', '.1f')}) | "
            f"{tps / med(peer, 'tokens_per_s'):.2f}× | {rss:.2f} ({spread(v, 'rss_gb', '.2f')}) | "
            f"{rss / med(peer, 'rss_gb'):.2f}× | {med(v, 'wall_s'):.0f} |"
        )


if __name__ == "__main__":
    main()
