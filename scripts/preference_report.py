"""Preference tuning on a real model: does it learn a preference the base model does not follow, and at what cost?

    python scripts/preference_report.py [--max-steps 24] [--train-prompts 96] [--output-dir runs/preference_report]

On SmolLM2-135M-Instruct (the demo's model and cache), the preference is a rule a program judges: answer in
lowercase only. The base model answers short questions about everyday things; its own answers make the pairs
(chosen: the answer lowercased, rejected: the answer as given), so the pairs differ in the preference alone.
The runs, each ftl itself with examples/smollm2_dpo.yaml and the same pairs, steps and batch: SFT (LoRA) on the
chosen answers, then DPO (LoRA), and any other preference objective listed in VARIANTS (SimPO, ORPO: a kind the
config refuses is skipped with its message). Reported per run, on held-out prompts about unseen subjects:
- implicit-reward accuracy: the run's last eval row's `eval_rewards/accuracies` (held-out pairs);
- judged: the share of greedy answers that follow the rule, and the win rate against the base model's
  answer to the same prompt (follows vs does not; ties count half);
- forgetting: the loss on unrelated English sentences (scripts/make_minilm_data.py), base → trained model,
  computed here by evaluating both models (preference runs refuse `data.reference` so far).
Writes report.md and results.json into the output folder; CPU, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_model import report_start
from demo_task import write_jsonl
from make_minilm_data import make_splits as sentence_splits

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "examples" / "smollm2_dpo.yaml"
GEN_BATCH, MAX_NEW_TOKENS = 40, 40
SUBJECTS = (
    "the sun", "the moon", "a cat", "a dog", "rain", "a river", "a mountain", "a tree", "coffee", "tea",
    "a bicycle", "a train", "a library", "the ocean", "snow", "a guitar", "a garden", "bread", "a computer",
    "a city", "a bridge", "the wind", "a forest", "an apple", "a horse", "a clock", "a candle", "a lighthouse",
    "a desert", "a volcano", "honey", "a map", "a piano", "an island", "a castle", "a rainbow", "a kite",
    "a farm", "a museum", "a penguin",
)  # fmt: skip
TEMPLATES = (
    "Describe {} in one short sentence.",
    "Give one fact about {}.",
    "What is {}? Answer briefly.",
    "Why do people like {}? One sentence.",
    "Write a short sentence about {}.",
)
HELD_OUT_SUBJECTS = 8  # the last subjects: every held-out prompt is about something no training prompt was


@dataclass(frozen=True)
class Variant:
    """One run: a label, its overrides of examples/smollm2_dpo.yaml, and the run whose adapter it starts from."""

    key: str
    label: str
    overrides: tuple[str, ...] = ()
    sft_rows: bool = False  # trains on chat rows (prompt + chosen answer) instead of pairs
    start_from: str | None = None  # a run's key: model.adapter = that run's final adapter


SFT = ("objective.kind=sft", "data.format=chat", "train.lr=1e-3")
VARIANTS = (
    Variant("sft", "SFT (LoRA) on the chosen answers", SFT, sft_rows=True),
    # start_from="sft" starts DPO from the SFT adapter (the reference is then the SFT model; model.adapter)
    Variant("dpo", "DPO sigmoid β 0.1 (LoRA), from the base", start_from=None),
    Variant("simpo", "SimPO (LoRA), from the base", ("objective.kind=simpo",)),
    Variant("orpo", "ORPO (LoRA), from the base", ("objective.kind=orpo",)),
)


@dataclass
class Outcome:
    variant: Variant
    skipped: str = ""
    reward_accuracy: float = float("nan")
    follows: float = float("nan")
    win_rate: float = float("nan")
    reference_after: float = float("nan")
    train_s: float = 0.0
    last_loss: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)


def follows_rule(answer: str) -> bool:
    """The judge: a real answer (three letters at least) with no capital letter."""
    return sum(c.isalpha() for c in answer) >= 3 and answer == answer.lower()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=24, help="optimizer steps of every run (8 pairs each)")
    p.add_argument("--train-prompts", type=int, default=96, help="at most 32 subjects × 5 templates")
    p.add_argument("--output-dir", default="runs/preference_report")
    p.add_argument("--only", default="", help="comma-separated variant keys (sft,dpo,simpo,orpo); default all")
    return p.parse_args(argv)


def prompts(n_train: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts about the held-out subjects), deterministic."""
    train = [t.format(s) for s in SUBJECTS[:-HELD_OUT_SUBJECTS] for t in TEMPLATES]
    held = [t.format(s) for s in SUBJECTS[-HELD_OUT_SUBJECTS:] for t in TEMPLATES]
    random.Random(0).shuffle(train)
    return train[:n_train], held


def load(model_dir: Path, adapter: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): the base model, with a LoRA adapter folded in when given; left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval(), tok


def generate(model: Any, tok: Any, questions: list[str]) -> list[str]:
    """Greedy answers to single-turn questions, through the chat template."""
    import torch

    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    out: list[str] = []
    for start in range(0, len(texts), GEN_BATCH):
        batch = tok(texts[start : start + GEN_BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        out += [t.strip() for t in tok.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]
    return out


def reference_loss(model: Any, tok: Any, texts: list[str]) -> float:
    """Mean next-token loss per token over unrelated sentences (the forgetting measure)."""
    import torch

    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        total, count = total + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return total / count


def pair_rows(questions: list[str], answers: list[str]) -> list[dict]:
    """Pairs from the base model's answers: chosen follows the rule, rejected does not (one capital at least)."""
    rows = []
    for q, a in zip(questions, answers, strict=True):
        rejected = a if a != a.lower() else a[:1].upper() + a[1:]
        if sum(c.isalpha() for c in a) >= 3 and rejected != a.lower():
            rows.append({"prompt": [{"role": "user", "content": q}], "chosen": a.lower(), "rejected": rejected})
    return rows


def write_data(out: Path, model: Any, tok: Any, n_train: int) -> tuple[dict[str, Path], list[str], list[str]]:
    """Pairs and SFT rows from the base model's own answers, the held-out prompts and the base's answers to
    them, and the reference sentences. Reuses what an earlier run of the report wrote."""
    data = out / "data"
    train_q, held_q = prompts(n_train)
    cache = data / "base_answers.json"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"train": generate(model, tok, train_q), "held": generate(model, tok, held_q)}))
    answers = json.loads(cache.read_text())
    train, held = pair_rows(train_q, answers["train"]), pair_rows(held_q, answers["held"])

    def chat(rows: list[dict]) -> list[dict]:
        return [{"messages": [*r["prompt"], {"role": "assistant", "content": r["chosen"]}]} for r in rows]

    sentences, _ = sentence_splits(64, 1, seed=7)
    paths = {
        "pairs_train": write_jsonl(data / "pairs_train.jsonl", train),
        "pairs_eval": write_jsonl(data / "pairs_eval.jsonl", held),
        "sft_train": write_jsonl(data / "sft_train.jsonl", chat(train)),
        "sft_eval": write_jsonl(data / "sft_eval.jsonl", chat(held)),
    }
    return paths, held_q, [str(r["text"]) for r in sentences]


def train(variant: Variant, model_dir: Path, data: dict[str, Path], out: Path, steps: int) -> tuple[int, float, str]:
    """`python -m launcher train examples/smollm2_dpo.yaml` with the variant's overrides; (exit, seconds, log)."""
    run = out / "runs" / variant.key
    if run.exists():  # a fresh run each time (an existing run directory would be resumed)
        shutil.rmtree(run)
    kind = "sft" if variant.sft_rows else "pairs"
    cmd = [
        sys.executable, "-m", "launcher", "train", str(BASE_CONFIG.relative_to(ROOT)), f"model.path={model_dir}",
        f"data.train={data[kind + '_train']}", f"data.eval={data[kind + '_eval']}", f"output_dir={run}",
        f"train.max_steps={steps}", *variant.overrides,
    ]  # fmt: skip
    if variant.start_from:
        cmd.append(f"model.adapter={out / 'runs' / variant.start_from / 'final'}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    print(f"report: {variant.label}: $ python {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    (run.parent / f"{variant.key}.log").write_text(res.stderr)
    return res.returncode, time.perf_counter() - start, res.stderr


def measure(
    variant: Variant, model_dir: Path, data: dict[str, Path], out: Path, steps: int, base: dict[str, Any]
) -> Outcome:
    """Train one variant (or note why the config refused it), then judge and evaluate its model."""
    code, seconds, log = train(variant, model_dir, data, out, steps)
    if code == 2:  # a config or data problem, reported before any training: the kind is not available here
        lines = [x for x in log.splitlines() if x.strip()]
        return Outcome(variant, skipped=lines[-1].strip().lstrip("- ") if lines else "refused")
    if code != 0:
        raise SystemExit(f"report: {variant.label} failed (exit {code}):\n{log[-3000:]}")
    run = out / "runs" / variant.key
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    model, tok = load(model_dir, run / "final")
    answers = generate(model, tok, base["questions"])
    wins = [follows_rule(a) - follows_rule(b) for a, b in zip(answers, base["answers"], strict=True)]
    return Outcome(
        variant,
        reward_accuracy=evals[-1].get("eval_rewards/accuracies", float("nan")) if evals else float("nan"),
        follows=sum(map(follows_rule, answers)) / len(answers),
        win_rate=sum(1.0 if w > 0 else 0.5 if w == 0 else 0.0 for w in wins) / len(wins),
        reference_after=reference_loss(model, tok, base["sentences"]),
        train_s=seconds,
        last_loss=[r["loss"] for r in rows if "loss" in r][-1],
        extra={"answers": answers[:5]},
    )


def table(outcomes: list[Outcome], base: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    n_pairs = sum(1 for _ in base["pairs"].open())
    lines = [
        "Preference: answer in lowercase only (judged by a program). SmolLM2-135M-Instruct, LoRA r16 all-linear, "
        f"fp32 on CPU; {n_pairs} training pairs from the base model's own answers, {args.max_steps} steps × 8.",
        f"Held-out: {len(base['questions'])} prompts about unseen subjects; the base model follows the rule in "
        f"{100 * base['follows']:.0f}% of its answers. Forgetting: loss on 64 unrelated English sentences, "
        f"base {base['reference']:.3f}.",
        "",
        "| run | held-out implicit-reward accuracy | follows the rule (base → after) | win rate vs base "
        "| reference loss rise | last train loss | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        if o.skipped:
            lines.append(f"| {o.variant.label} | skipped: {o.skipped} | | | | | |")
            continue
        acc = "—" if o.reward_accuracy != o.reward_accuracy else f"{100 * o.reward_accuracy:.0f}%"
        lines.append(
            f"| {o.variant.label} | {acc} | {100 * base['follows']:.0f}% → {100 * o.follows:.0f}% | "
            f"{100 * o.win_rate:.0f}% | {o.reference_after - base['reference']:+.3f} | {o.last_loss:.3f} | "
            f"{o.train_s:.0f} |"
        )
    used = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in used)  # on a shared machine, what wall time on free cores needs
    lines += ["", f"Wall time of the whole report: {wall / 60:.1f} min; CPU time {cpu / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out, model_dir = report_start(args.output_dir)
    model, tok = load(model_dir)
    data, questions, sentences = write_data(out, model, tok, args.train_prompts)
    answers = json.loads((out / "data" / "base_answers.json").read_text())["held"]
    base = {
        "questions": questions,
        "answers": answers,
        "sentences": sentences,
        "pairs": data["pairs_train"],
        "follows": sum(map(follows_rule, answers)) / len(answers),
        "reference": reference_loss(model, tok, sentences),
    }
    del model
    outcomes = []
    for variant in [v for v in VARIANTS if not args.only or v.key in args.only.split(",")]:
        o = measure(variant, model_dir, data, out, args.max_steps, base)
        outcomes.append(o)
        print(f"report: {variant.label}: {o.skipped or f'follows {100 * o.follows:.0f}%'}", flush=True)
    text = table(outcomes, base, args, time.perf_counter() - start)
    (out / "report.md").write_text(text)
    results = {k: v for k, v in base.items() if k in ("follows", "reference")}
    results["runs"] = [{**o.__dict__, "variant": o.variant.__dict__} for o in outcomes]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(text + f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
