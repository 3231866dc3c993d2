"""Reward models (issue 18): the Bradley–Terry loss on a one-output sequence-classification head against TRL 1.16's
RewardTrainer on the same model and batch, and real `ftl train` runs (full fine-tuning and LoRA) whose saved model
loads with AutoModelForSequenceClassification and gives the rewards the run measured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import base_config, ftl, read_metrics, write_config, write_jsonl
from test_dpo import preference_rows
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from launcher.config_loading import load_config
from launcher.data.pair_batches import PairCollator
from launcher.data.preference import tokenize_pairs
from launcher.objectives import objective_for

REWARD_MODEL = {"task": "sequence_classification", "num_labels": 1}


def reward_config(tmp: Path, model: Path, rows: list[dict], **sections: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp / "pairs.jsonl", rows)
    objective = {"kind": "reward", **sections.pop("objective", {})}
    cfg = base_config(tmp, model, data, model=REWARD_MODEL, data={"format": "preference"}, objective=objective)
    for name, values in sections.items():
        cfg[name].update(values)
    return write_config(tmp / "cfg.yaml", cfg)


@pytest.mark.parametrize(
    ("center", "margins"), [(None, False), (0.01, False), (None, True)], ids=["plain", "centered", "margins"]
)
def test_loss_equals_trl(tmp_path: Path, models: dict, center: float | None, margins: bool) -> None:
    """The same tiny model, score head and pairs: ftl's batch is TRL's, and ftl's reward loss and metrics are
    TRL 1.16's RewardTrainer.compute_loss within 1e-5 (plain, with center_rewards_coefficient, and with a
    per-pair `margin` column)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = preference_rows(6, seed=3)
    if margins:
        rows = [{**r, "margin": m} for r, m in zip(rows, [0.5, 0.0, 2.0, -1.0, 1.5, 3], strict=True)]
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(models["llama"], num_labels=1)
    args = RewardConfig(
        str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=64, center_rewards_coefficient=center
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    theirs = float(trainer.compute_loss(trainer.model, dict(trl_batch)).detach())
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours_batch = PairCollator(tokenizer.pad_token_id)(tokenize_pairs([dict(r) for r in rows], tokenizer, 64), range(6))
    assert torch.equal(ours_batch["input_ids"], trl_batch["input_ids"])
    assert torch.equal(ours_batch["attention_mask"], trl_batch["attention_mask"])
    assert ("margin" in ours_batch) == ("margin" in trl_batch) == margins
    if margins:
        assert torch.equal(ours_batch["margin"], trl_batch["margin"])
    objective = {} if center is None else {"center_rewards_coefficient": center}
    objective_ = objective_for(load_config(reward_config(tmp_path / "ftl", models["llama"], rows, objective=objective)))
    result = objective_.loss_sum(trainer.model, ours_batch)
    pairs = objective_.loss_units(ours_batch)
    assert pairs == 6
    assert float(result.loss.detach()) / pairs == pytest.approx(theirs, abs=1e-5)
    assert 0 < logged["accuracy"] < 1  # the random head orders some pairs each way: the metric is not trivial
    for name in ("accuracy", "margin", "mean_reward"):
        assert result.counts[name] / pairs == pytest.approx(logged[name], abs=1e-5), name


def _scores(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """A reward model's scores of `texts`, scored as a user of transformers would (the tokenizer pads)."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.squeeze(-1)


def _pair_scores(directory: Path, rows: list[dict], **kwargs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and rejected scores of `rows` by the model saved in `directory`."""
    model = AutoModelForSequenceClassification.from_pretrained(directory, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    texts = [[r["prompt"] + r[side] + tokenizer.eos_token for r in rows] for side in ("chosen", "rejected")]
    return _scores(model, tokenizer, texts[0]), _scores(model, tokenizer, texts[1])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_reward_model_learns_and_reloads(tmp_path: Path, models: dict, kind: str) -> None:
    """`ftl train` with objective.kind reward: the loss falls and accuracy rises in the training rows; the saved
    model (final/ for full fine-tuning, `ftl export --merge` for LoRA, whose score head trains and is saved with
    the adapter) loads with AutoModelForSequenceClassification, orders the training pairs, and gives exactly the
    eval pairs' accuracy and margin that the run's eval row reports."""
    rows, held_out = preference_rows(48, seed=1), preference_rows(16, seed=2)
    lr = 3e-3 if kind == "full" else 1e-2
    evals = str(write_jsonl(tmp_path / "eval.jsonl", held_out))
    train = {"max_steps": 16, "lr": lr, "micro_batch_size": 8, "schedule": "constant"}
    res = ftl(
        "train",
        str(reward_config(tmp_path, models["llama"], rows, method={"kind": kind}, train=train, data={"eval": evals})),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    steps = [r for r in metrics if "loss" in r]
    assert all({"accuracy", "margin", "mean_reward"} <= set(r) for r in steps)
    early, late = steps[:3], steps[-3:]
    assert max(r["loss"] for r in late) < min(r["loss"] for r in early)
    assert min(r["accuracy"] for r in late) >= 0.9 > max(r["accuracy"] for r in early)
    (evaluated,) = [r for r in metrics if "eval_loss" in r]
    assert evaluated["eval_accuracy"] >= 0.75 and evaluated["eval_margin"] > 1

    saved = tmp_path / "run" / "final"
    chosen, rejected = _pair_scores(saved, rows, num_labels=1)  # LoRA: transformers attaches the adapter itself
    assert float((chosen > rejected).float().mean()) >= 0.9
    if kind == "lora":
        saved = tmp_path / "merged"
        exported = ftl("export", str(tmp_path / "run"), "--merge", "--out", str(saved))
        assert exported.returncode == 0, exported.stderr[-3000:]
    chosen, rejected = _pair_scores(saved, held_out)
    assert float((chosen > rejected).float().mean()) == pytest.approx(evaluated["eval_accuracy"], abs=1e-6)
    assert float((chosen - rejected).mean()) == pytest.approx(evaluated["eval_margin"], abs=1e-4)


def test_margins_survive_the_cache_and_reach_the_batch(tmp_path: Path, models: dict) -> None:
    """A `margin` column is kept per pair through tokenisation and the on-disk cache, and the collator hands
    pair k's margin at index k, in the order the sampler drew the pairs."""
    from launcher.model import load_tokenizer
    from launcher.prepare import prepare_data

    margins = [0.25 * i for i in range(10)]
    rows = [{**r, "margin": m} for r, m in zip(preference_rows(10, seed=4), margins, strict=True)]
    cfg = load_config(reward_config(tmp_path, models["llama"], rows))
    tokenizer = load_tokenizer(cfg)
    built, cached = prepare_data(cfg, tokenizer).train, prepare_data(cfg, tokenizer).train  # the second: the cache
    assert built.margins.tolist() == cached.margins.tolist() == margins
    batch = PairCollator(tokenizer.pad_token_id)(cached, [7, 2, 5])
    assert batch["margin"].tolist() == [1.75, 0.5, 1.25] and batch["input_ids"].shape[0] == 6
