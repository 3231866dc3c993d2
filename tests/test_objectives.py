"""The objective seam: the loop and evaluation take the loss, its normaliser and what is reported from the
run's objective, and the two objectives compute what Hugging Face's own heads compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import base_config, write_config
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from launcher.checkpoint import TrainState
from launcher.config_loading import load_config
from launcher.data import collate
from launcher.data.tokenized import Samples
from launcher.dist import init_distributed
from launcher.model import load_tokenizer
from launcher.objectives import objective_for
from launcher.objectives.causal_lm import CausalLM
from launcher.optim import optimizer_factory
from launcher.prepare import prepare_data
from launcher.run_start import make_collator
from launcher.trainer import optimizer_step, plan_run


class DoubleUnits(CausalLM):
    """Causal LM whose loss is normalised by twice the label tokens: every step's loss and gradient halve."""

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        return 2 * super().loss_units(batch)


def _first_step(tmp_path: Path, models: dict, toy_data: dict, objective_class: type | None) -> dict[str, float]:
    tmp_path.mkdir()
    path = write_config(
        tmp_path / "cfg.yaml",
        base_config(
            tmp_path, models["llama"], toy_data["completion"], method={"kind": "full"}, train={"grad_accum": 2}
        ),
    )
    cfg = load_config(path)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    run = plan_run(cfg, init_distributed(1), tmp_path / "run", data)
    if objective_class is not None:
        run.objective = objective_class(cfg)
    model = run.strategy.build_model()
    run.strategy.setup(model, optimizer_factory(cfg.train, model))
    run.collate = make_collator(run, tokenizer)
    return optimizer_step(run, TrainState())


def test_the_loop_normalises_by_what_the_objective_counts(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """train_step divides by the objective's global unit count, not by label tokens it counts itself."""
    plain = _first_step(tmp_path / "plain", models, toy_data, None)
    halved = _first_step(tmp_path / "halved", models, toy_data, DoubleUnits)
    assert halved["loss"] == pytest.approx(plain["loss"] / 2, rel=1e-6)
    assert halved["grad_norm"] == pytest.approx(plain["grad_norm"] / 2, rel=1e-5)


def test_objective_follows_the_model_task(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """model.task picks the objective: the label-only causal loss, or rows through a classification head."""
    for task, fmt in (("causal_lm", "completion"), ("sequence_classification", "classification")):
        raw = base_config(tmp_path, models["llama"], toy_data[fmt], model={"task": task}, data={"format": fmt})
        assert objective_for(load_config(write_config(tmp_path / f"{task}.yaml", raw))).name == task


def test_classification_loss_is_the_heads_cross_entropy_summed_over_rows(tmp_path: Path, models: dict) -> None:
    """SequenceClassification's sum and accuracy count equal HF's mean cross-entropy × rows and argmax hits."""
    model = AutoModelForSequenceClassification.from_pretrained(models["llama"], num_labels=3).eval()
    model.config.pad_token_id = AutoTokenizer.from_pretrained(models["llama"]).pad_token_id
    rows = [torch.randint(3, 60, (n,)).numpy() for n in (5, 7, 4)]
    labels = torch.tensor([0, 2, 1])
    samples = Samples(input_ids=rows, labels=None, class_labels=labels.numpy())
    batch = collate(samples, [0, 1, 2], model.config.pad_token_id)
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml",
            {
                "model": {"path": str(models["llama"]), "task": "sequence_classification", "num_labels": 3},
                "data": {"train": "x.jsonl", "format": "classification"},
                "train": {"max_steps": 1},
                "output_dir": str(tmp_path / "run"),
            },
        )
    )
    with torch.no_grad():
        got = objective_for(cfg).loss_sum(model, batch)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    assert float(got.loss) == pytest.approx(float(hf.loss) * 3, rel=1e-6)
    assert got.counts["correct"] == float((hf.logits.argmax(-1) == labels).sum())


def test_every_task_has_one_objective_and_one_declaration() -> None:
    """model.task's values and objective.kind's, the torch-free declarations and the implementations name the
    same objectives."""
    from typing import get_args

    from launcher.config import ModelConfig, ObjectiveConfig
    from launcher.objectives import IMPLEMENTATIONS
    from launcher.objectives.traits import KINDS, TRAITS

    tasks = set(get_args(ModelConfig.model_fields["task"].annotation))
    literal, _ = get_args(ObjectiveConfig.model_fields["kind"].annotation)  # Literal[...] | None
    kinds = set(get_args(literal))
    assert kinds == set(KINDS) and tasks <= set(KINDS.values())
    assert tasks | set(KINDS.values()) == set(TRAITS) == set(IMPLEMENTATIONS)
