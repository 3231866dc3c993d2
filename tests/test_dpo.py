"""Preference tuning (issue 18, first slice): DPO with the adapter-disabled reference, against the exact step-1
value, against TRL 1.16 on the same model and batch, and in a real `ftl train` run."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from helpers import WORDS, base_config, ftl, read_metrics, write_config, write_jsonl

from launcher.checkpoint import TrainState
from launcher.config_loading import load_config
from launcher.data.pair_batches import PairCollator
from launcher.data.preference import tokenize_pairs
from launcher.dist import init_distributed
from launcher.model import load_tokenizer
from launcher.objectives import objective_for
from launcher.optim import optimizer_factory
from launcher.prepare import prepare_data
from launcher.run_start import make_collator
from launcher.trainer import optimizer_step, plan_run

LN2 = math.log(2)
METRICS = (  # TRL's names, written out here so the test holds the product to them (not to its own list)
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def preference_rows(n: int, seed: int = 0, messages: bool = False) -> list[dict]:
    """Reverse a few words (chosen) rather than repeat them with a stray word (rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(3, 6))]
        prompt = "reverse : " + " ".join(words)
        chosen, rejected = " ".join(reversed(words)), " ".join(words) + " w30"
        if messages:
            rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def dpo_config(tmp: Path, model: Path, rows: list[dict], **sections: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp / "pairs.jsonl", rows)
    objective = {"kind": "dpo", **sections.pop("objective", {})}
    cfg = base_config(tmp, model, data, method={"kind": "lora"}, data={"format": "preference"}, objective=objective)
    for name, values in sections.items():
        cfg[name].update(values)
    return write_config(tmp / "cfg.yaml", cfg)


def first_step(path: Path) -> dict[str, float]:
    """Step 1 of the run `path` configures, in this process."""
    cfg = load_config(path)
    tokenizer = load_tokenizer(cfg)
    run = plan_run(cfg, init_distributed(1), Path(cfg.output_dir), prepare_data(cfg, tokenizer))
    model = run.strategy.build_model()
    run.strategy.setup(model, optimizer_factory(cfg.train, model))
    run.objective.use_forward_only(run.strategy.forward_only_model)
    run.collate = make_collator(run, tokenizer)
    return optimizer_step(run, TrainState())


@pytest.mark.parametrize("messages", [False, True], ids=["text", "messages"])
def test_a_sample_is_a_pair_and_a_batch_keeps_pairs_whole(tmp_path: Path, models: dict, messages: bool) -> None:
    """Sample ids name pairs (the sampler draws pairs), the cache keeps both sides, and the collator lays out pair
    k as rows k (chosen) and n+k (rejected): one prompt, labels on the completions only."""
    rows = preference_rows(12, messages=messages)
    cfg = load_config(dpo_config(tmp_path, models["llama"], rows))
    tokenizer = load_tokenizer(cfg)
    built, cached = prepare_data(cfg, tokenizer).train, prepare_data(cfg, tokenizer).train  # the second: the cache
    assert len(built) == len(cached) == len(built.rejected) == 12
    assert all((a == b).all() for a, b in zip(built.rejected.input_ids, cached.rejected.input_ids, strict=True))
    ids = [7, 2, 5]
    batch = PairCollator(tokenizer.pad_token_id)(cached, ids)
    assert batch["input_ids"].shape[0] == 6
    for k, i in enumerate(ids):
        chosen, rejected = batch["labels"][k], batch["labels"][3 + k]
        start = int((chosen != -100).nonzero()[0])
        assert start == int((rejected != -100).nonzero()[0])  # the completions start where the shared prompt ends
        assert torch.equal(batch["input_ids"][k, :start], batch["input_ids"][3 + k, :start])
        words = tokenizer.decode(batch["input_ids"][k][chosen != -100], skip_special_tokens=True).split()
        prompt = rows[i]["prompt"] if not messages else rows[i]["prompt"][0]["content"]
        assert words == prompt.split()[2:][::-1]


@pytest.mark.parametrize("messages", [False, True], ids=["text", "messages"])
def test_first_step_sigmoid_loss_is_ln2(tmp_path: Path, models: dict, messages: bool) -> None:
    """At step 1 the LoRA update is zero, so the policy is its reference: every margin is 0, the loss ln 2."""
    row = first_step(dpo_config(tmp_path, models["llama"], preference_rows(32, messages=messages)))
    assert abs(row["loss"] - LN2) < 1e-6
    assert row["rewards/chosen"] == row["rewards/rejected"] == row["rewards/margins"] == 0.0
    assert row["logps/chosen"] < 0 and row["logps/rejected"] < 0


def test_dpo_learns_the_preference(tmp_path: Path, models: dict) -> None:
    """`ftl train` with LoRA: the loss falls below ln 2 and the implicit reward comes to prefer the chosen side;
    every training row and the eval row carry TRL's metric names."""
    path = dpo_config(
        tmp_path,
        models["llama"],
        preference_rows(64),
        train={"max_steps": 16, "lr": 1e-2},
        data={"eval_fraction": 0.25},
    )
    res = ftl("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    assert all(set(METRICS) <= set(r) for r in steps)
    assert abs(steps[0]["loss"] - LN2) < 1e-6 and steps[0]["rewards/accuracies"] == 0.0
    late = steps[-4:]
    assert max(r["loss"] for r in late) < LN2 - 0.05
    assert min(r["rewards/accuracies"] for r in late) >= 0.75
    (evaluated,) = [r for r in rows if "eval_loss" in r]
    assert evaluated["eval_loss"] < LN2 and evaluated["eval_rewards/accuracies"] >= 0.75
    assert all(f"eval_{name}" in evaluated for name in METRICS)
    assert "data.train: 64 pairs read, 48 kept (16 held out as data.eval); from " in res.stderr
    assert "data.eval: 16 pairs read, 16 kept; from data.eval_fraction=0.25 of data.train" in res.stderr
    assert "= 4 pairs;" in res.stderr


@pytest.mark.parametrize("width", [0, 10**6], ids=["padded", "padding_free"])
def test_label_only_log_probs_equal_full_logits(models: dict, width: int) -> None:
    """The label-only output layer's per-sequence sums (no full-vocabulary logits) equal the full logits'
    log-probs, values and gradients, in chunks smaller than a sequence; in 2n padded rows, and with the 2n
    sequences concatenated into one row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher import loss_models
    from launcher.loss import install_label_only_head
    from launcher.objectives.dpo import sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    samples = tokenize_pairs(preference_rows(6, seed=5), tokenizer, 64)
    batch = PairCollator(tokenizer.pad_token_id, width)(samples, range(6))
    assert batch["input_ids"].shape[0] == (12 if width == 0 else 1)
    plain, switched = (AutoModelForCausalLM.from_pretrained(models["llama"]) for _ in range(2))
    assert install_label_only_head(switched)
    chunk, loss_models.CHUNK_ELEMENTS = loss_models.CHUNK_ELEMENTS, 3 * switched.config.vocab_size  # 3 positions
    try:
        results = [sequence_logps(m, batch) for m in (plain, switched)]
    finally:
        loss_models.CHUNK_ELEMENTS = chunk
    (full, full_len), (label_only, label_len) = results
    assert torch.equal(full_len, label_len) and full.shape == label_only.shape == (12,)
    assert torch.allclose(full, label_only, atol=1e-5)
    weights = torch.arange(12.0)  # a different weight per row: a row mixed up with another would show
    (full * weights).sum().backward()
    (label_only * weights).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), switched.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def _trl_batch_and_model(models: dict, rows: list[dict], tmp_path: Path, beta: float):
    """TRL's DPOTrainer on the tiny model with a LoRA adapter it creates (its reference: the adapter switched off),
    the adapter then moved away from zero so that policy and reference differ; and TRL's collated batch."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    args = DPOConfig(str(tmp_path / "trl"), report_to=[], use_cpu=True, beta=beta, max_length=64, seed=0)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(models["llama"]),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return trainer, batch, tokenizer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_equals_trl(tmp_path: Path, models: dict, loss_type: str) -> None:
    """The same tiny model, adapter and pairs: ftl's tokenised batch is TRL's, and ftl's DPO loss is TRL 1.16's
    DPOTrainer loss (its reference also the adapter switched off) within 1e-5."""
    rows = preference_rows(4, seed=3)
    trainer, trl_batch, tokenizer = _trl_batch_and_model(models, rows, tmp_path, beta=0.1)
    trainer.loss_types = [loss_type]
    theirs = float(trainer.compute_loss(trainer.model, dict(trl_batch)).detach())

    samples = tokenize_pairs([dict(r) for r in rows], tokenizer, 64)
    ours_batch = PairCollator(tokenizer.pad_token_id)(samples, range(len(rows)))
    assert torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    completion = trl_batch["completion_mask"].bool()
    assert torch.equal(ours_batch["labels"] != -100, completion)
    path = dpo_config(tmp_path / "ftl", models["llama"], rows, objective={"loss_type": loss_type, "beta": 0.1})
    objective = objective_for(load_config(path))
    trainer.model.train()
    result = objective.loss_sum(trainer.model, ours_batch)
    ours = float(result.loss.detach()) / objective.loss_units(ours_batch)
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert abs(result.counts["rewards/margins"]) > 1e-2  # the adapter really moved the policy off its reference
    assert result.counts["logps/chosen"] / len(rows) == pytest.approx(
        trainer._metrics["train"]["logps/chosen"][-1], abs=1e-4
    )


def test_resume_continues_exactly(tmp_path: Path, models: dict) -> None:
    """Resumed from the step-2 checkpoint: steps 3-4 equal an uninterrupted run's (the sampler draws pairs, and the
    reference is the same network, so nothing beyond the usual checkpoint is needed)."""
    train = {"max_steps": 4, "lr": 1e-2, "schedule": "constant"}
    whole = dpo_config(tmp_path / "whole", models["llama"], preference_rows(32), train=train)
    assert ftl("train", str(whole)).returncode == 0
    parts = dpo_config(tmp_path / "parts", models["llama"], preference_rows(32), train=train)
    first = ftl("train", str(parts), "train.max_steps=3", "checkpoint.every_steps=2")  # step 3: final/ only
    assert first.returncode == 0, first.stderr[-3000:]
    second = ftl("train", str(parts), "checkpoint.every_steps=2")
    assert second.returncode == 0 and "at step 2 " in second.stderr, second.stderr[-3000:]
    expected = [r for r in read_metrics(tmp_path / "whole" / "run") if "loss" in r]
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "parts" / "run") if "loss" in r}
    for row in expected[2:]:
        for key in ("loss", *METRICS):
            assert resumed[row["step"]][key] == pytest.approx(row[key], abs=1e-6), (row["step"], key)
