"""Transfer on a real model: what each fine-tuning technique buys, and what it costs the model elsewhere.

    python scripts/transfer_report.py [--max-steps 50] [--eval-size 100] [--output-dir runs/transfer_report]

On SmolLM2-135M-Instruct (the demo's model and cache) and the demo's word-reversal task (the base model scores
0% held-out exact match), runs ftl itself once per variant with the same data, steps and batch:
(a) pre-trained + LoRA, (b) the same architecture from random init (full fine-tuning: its best chance),
(c) full fine-tuning plain, with L2-SP and with layer-wise LR decay, (d) bottleneck adapters, (e) prompt tuning.
Each run measures forgetting itself (`data.reference`: English sentences unrelated to the task, their loss
before training and after); the script then scores held-out exact match by greedy generation. Writes
report.md (the table), accuracy_vs_forgetting.png and results.json into the output folder; CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import generate
from demo_model import report_start
from demo_task import exact_match_rate, make_splits, write_jsonl
from make_minilm_data import make_splits as sentence_splits

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "examples" / "demo.yaml"


@dataclass(frozen=True)
class Variant:
    """One run of the report: a label, what it trains, and the config overrides that make it so."""

    key: str
    label: str
    method: str
    overrides: tuple[str, ...] = ()
    random_init: bool = False
    notes: str = ""


@dataclass
class Outcome:
    variant: Variant
    accuracy: float = float("nan")
    reference_before: float = float("nan")
    reference_after: float = float("nan")
    trainable: int = 0
    train_s: float = 0.0
    last_loss: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rise(self) -> float:
        return self.reference_after - self.reference_before


FULL = ("method.kind=full", "train.lr=5e-5")
PROMPT_INIT = "Reverse the order of the words."
VARIANTS = (
    Variant("a", "(a) pre-trained + LoRA r16", "lora", ("method.kind=lora", "train.lr=1e-3")),
    Variant("b", "(b) random init, full FT", "full", ("method.kind=full", "train.lr=1e-3"), random_init=True),
    Variant("c1", "(c) full FT", "full", FULL),
    Variant("c2", "(c) full FT + L2-SP (weight 1)", "full", (*FULL, "train.l2sp.weight=1.0")),
    Variant("c3", "(c) full FT + layer LR decay 0.85", "full",
            ("method.kind=full", "train.lr=2e-4", "train.layer_lr_decay=0.85")),
    Variant("d", "(d) bottleneck adapters (houlsby, 64)", "adapter", ("method.kind=adapter", "train.lr=1e-3")),
    Variant("e", "(e) prompt tuning (20 tokens)", "prompt_tuning",
            ("method.kind=prompt_tuning", "train.lr=3e-2", f"method.prompt_tuning.init_text={PROMPT_INIT}")),
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=50, help="optimizer steps of every run (8 rows each)")
    p.add_argument("--eval-size", type=int, default=100, help="held-out prompts scored by generation")
    p.add_argument("--output-dir", default="runs/transfer_report")
    p.add_argument("--only", default="", help="comma-separated variant keys (a,b,c1,c2,c3,d,e); default all")
    return p.parse_args(argv)


def write_data(out: Path, eval_size: int) -> dict[str, Path]:
    """The task (the demo's: 480 train rows, held-out eval) and the reference set (English sentences)."""
    train, evals = make_splits(480, eval_size, seed=0)
    sentences, _ = sentence_splits(64, 1, seed=7)
    return {
        "train": write_jsonl(out / "data" / "train.jsonl", train),
        "eval": write_jsonl(out / "data" / "eval.jsonl", evals),
        "reference": write_jsonl(out / "data" / "reference.jsonl", [{"text": r["text"]} for r in sentences]),
    }


def random_init_model(model_dir: Path, dest: Path) -> Path:
    """SmolLM2's architecture and tokenizer with freshly initialised weights (seeded)."""
    if (dest / "model.safetensors").exists():
        return dest
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    return dest


def train(variant: Variant, model_dir: Path, data: dict[str, Path], run: Path, steps: int) -> tuple[float, str]:
    """`python -m launcher train examples/demo.yaml` with the variant's overrides; (seconds, its log)."""
    if run.exists():
        shutil.rmtree(run)
    cmd = [
        sys.executable, "-m", "launcher", "train", str(BASE_CONFIG.relative_to(ROOT)),
        f"model.path={model_dir}", f"data.train={data['train']}", f"data.eval={data['eval']}",
        f"data.reference={data['reference']}", "data.reference_format=text", f"output_dir={run}",
        f"train.max_steps={steps}", "train.eval_batches=2", *variant.overrides,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    print(f"report: {variant.label}: $ python {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (run.parent / f"{variant.key}.log").write_text(res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"report: {variant.label} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return seconds, res.stderr


def trained_model(variant: Variant, model_dir: Path, final: Path) -> Any:
    """The trained model as a user would load it, per method."""
    import torch
    from transformers import AutoModelForCausalLM

    if variant.method == "full":
        return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if variant.method == "adapter":
        from launcher.methods.bottleneck import load_adapter

        return load_adapter(base, final).eval()
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, final)
    return (model.merge_and_unload() if variant.method == "lora" else model).eval()


def accuracy(model: Any, model_dir: Path, rows: list[dict]) -> float:
    """Held-out exact match by greedy generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    preds = generate(model, tok, [r["messages"][:-1] for r in rows])
    return exact_match_rate(preds, [r["messages"][-1]["content"] for r in rows])


def measure(variant: Variant, model_dir: Path, data: dict[str, Path], out: Path, steps: int) -> Outcome:
    """Train one variant, read its forgetting from metrics.jsonl, score it."""
    run = out / "runs" / variant.key
    run.parent.mkdir(parents=True, exist_ok=True)
    model = random_init_model(model_dir, out / "random_init") if variant.random_init else model_dir
    seconds, log = train(variant, model, data, run, steps)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    refs = [r["reference_loss"] for r in rows if "reference_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    trainable = re.search(r"trainable=([\d,]+)", log)
    evals = [json.loads(x) for x in data["eval"].read_text().splitlines()]
    score = accuracy(trained_model(variant, model, run / "final"), model_dir, evals)
    params = int(trainable.group(1).replace(",", "")) if trainable else 0
    return Outcome(variant, score, refs[0], refs[-1], params, seconds, losses[-1])


def base_accuracy(model_dir: Path, data: dict[str, Path]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    evals = [json.loads(x) for x in data["eval"].read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return accuracy(model, model_dir, evals)


def table(outcomes: list[Outcome], base: float, steps: int, eval_size: int, wall: float) -> str:
    lines = [
        f"Task: reverse 4-5 words (the demo's), 480 train rows, {eval_size} held-out prompts (greedy exact",
        f"match); base model: {100 * base:.0f}%. Every run: {steps} steps × 8 rows, fp32 on CPU, the demo's schedule.",
        "Reference: 64 English sentences unrelated to the task; its loss before → after (forgetting = the rise).",
        "",
        "| run | trained params | held-out exact match | reference loss before → after | rise | last train loss "
        "| train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.variant.label} | {o.trainable:,} | {100 * o.accuracy:.0f}% | {o.reference_before:.3f} → "
            f"{o.reference_after:.3f} | {o.rise:+.3f} | {o.last_loss:.3f} | {o.train_s:.0f} |"
        )
    lines += ["", f"Wall time of the whole report: {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(outcomes: list[Outcome], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in outcomes:
        ax.scatter(o.rise, 100 * o.accuracy, s=40)
        ax.annotate(o.variant.label, (o.rise, 100 * o.accuracy), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("reference loss rise (forgetting; lower is better)")
    ax.set_ylabel("held-out exact match, %")
    ax.set_title("SmolLM2-135M-Instruct: transfer vs forgetting")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out, model_dir = report_start(args.output_dir)
    data = write_data(out, args.eval_size)
    chosen = [v for v in VARIANTS if not args.only or v.key in args.only.split(",")]
    base = base_accuracy(model_dir, data)
    outcomes = []
    for variant in chosen:
        outcomes.append(measure(variant, model_dir, data, out, args.max_steps))
        o = outcomes[-1]
        print(f"report: {variant.label}: exact match {100 * o.accuracy:.0f}%, reference rise {o.rise:+.3f}", flush=True)
    text = table(outcomes, base, args.max_steps, args.eval_size, time.perf_counter() - start)
    (out / "report.md").write_text(text)
    plot(outcomes, out / "accuracy_vs_forgetting.png")
    results = [{**o.__dict__, "variant": o.variant.__dict__, "rise": o.rise} for o in outcomes]
    (out / "results.json").write_text(json.dumps({"base_accuracy": base, "runs": results}, indent=2) + "\n")
    print(text + f"\nreport: {out / 'report.md'}, {out / 'accuracy_vs_forgetting.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
