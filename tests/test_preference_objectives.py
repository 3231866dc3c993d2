"""SimPO and ORPO (issue 18): the reference-free pair objectives against TRL 1.16's CPOTrainer (loss_type simpo) and
ORPOTrainer on the same tiny model and batch, in real `ftl train` runs (LoRA and full fine-tuning), and the
settings each of them reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import ftl, read_metrics
from test_dpo import METRICS, dpo_config, preference_rows

from launcher.cli import main
from launcher.config_loading import load_config
from launcher.data.pair_batches import PairCollator
from launcher.data.preference import tokenize_pairs
from launcher.objectives import objective_for

CPO_METRICS = (*METRICS, "nll_loss")  # TRL's CPOTrainer names, less logits/* (ftl builds no full-vocabulary logits)
ORPO_METRICS = (*CPO_METRICS, "log_odds_ratio", "log_odds_chosen")


def _trl(kind: str, models: dict, rows: list[dict], tmp_path: Path, **settings: float):
    """TRL's trainer for `kind` on the tiny model (reference-free: no adapter needed), its collated batch, and that
    batch as ftl lays pairs out (the chosen rows, then the rejected rows)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config, trainer_class = (CPOConfig, CPOTrainer) if kind == "simpo" else (ORPOConfig, ORPOTrainer)
    extra = {"loss_type": "simpo"} if kind == "simpo" else {}
    args = config(str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=64, seed=0, **extra, **settings)
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(models["llama"]),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    joined = trainer.concatenated_inputs(batch, padding_value=tokenizer.pad_token_id)
    ours = {k: joined[f"concatenated_{k}"] for k in ("input_ids", "attention_mask", "labels")}
    return trainer, batch, ours, tokenizer


def _ours(tmp_path: Path, models: dict, rows: list[dict], batch: dict, objective: dict) -> tuple[float, dict]:
    """ftl's loss per pair and metric means on `batch`, with the objective a config with `objective` builds."""
    from transformers import AutoModelForCausalLM

    path = dpo_config(tmp_path / "ftl", models["llama"], rows, objective=objective, method={"kind": "full"})
    chosen = objective_for(load_config(path))
    result = chosen.loss_sum(AutoModelForCausalLM.from_pretrained(models["llama"]), batch)
    pairs = chosen.loss_units(batch)
    return float(result.loss.detach()) / pairs, chosen.step_metrics(pairs, result.counts)


@pytest.mark.parametrize(
    ("beta", "gamma", "eps", "alpha"),
    [(2.0, 0.5, 0.0, 0.0), (0.5, 0.3, 0.1, 1.0)],
    ids=["simpo", "cpo-simpo-smoothed"],
)
def test_simpo_equals_trl(tmp_path: Path, models: dict, beta: float, gamma: float, eps: float, alpha: float) -> None:
    """ftl's pairs tokenise to TRL's CPOTrainer batch, and on it ftl's SimPO loss and metrics equal TRL 1.16's
    (loss_type simpo; cpo_alpha = sft_weight) within 1e-5."""
    rows = preference_rows(4, seed=3)
    settings = {"beta": beta, "simpo_gamma": gamma, "label_smoothing": eps, "cpo_alpha": alpha}
    trainer, trl_batch, batch, tokenizer = _trl("simpo", models, rows, tmp_path, **settings)
    theirs = float(trainer.compute_loss(trainer.model, dict(trl_batch)).detach())
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    built = PairCollator(tokenizer.pad_token_id)(tokenize_pairs([dict(r) for r in rows], tokenizer, 64), range(4))
    assert torch.equal(built["input_ids"], batch["input_ids"]) and torch.equal(built["labels"], batch["labels"])
    objective = {"kind": "simpo", "beta": beta, "gamma": gamma, "label_smoothing": eps, "sft_weight": alpha}
    ours, metrics = _ours(tmp_path, models, rows, batch, objective)
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert abs(metrics["rewards/margins"]) > 1e-2 and 0 < metrics["rewards/accuracies"] < 1  # not a degenerate batch
    for name in CPO_METRICS if alpha else METRICS:  # TRL logs nll_loss 0 when cpo_alpha is 0 (it skips the term)
        assert metrics[name] == pytest.approx(logged[name], abs=1e-5), name


@pytest.mark.parametrize("prompt", ["", "words"], ids=["one-token-prompt", "prompt"])
def test_orpo_equals_trl(tmp_path: Path, models: dict, prompt: str) -> None:
    """ftl's ORPO on TRL 1.16's ORPOTrainer batch: the odds-ratio term and every metric but nll_loss equal TRL's
    within 1e-5. TRL's NLL also counts the prompt's tokens and ftl's does not: with a prompt that is only BOS (no
    prompt token is predicted) the whole loss and nll_loss equal TRL's too."""
    rows = [{**r, "prompt": r["prompt"] if prompt else ""} for r in preference_rows(4, seed=3)]
    trainer, trl_batch, batch, _ = _trl("orpo", models, rows, tmp_path, beta=0.5)
    theirs = float(trainer.compute_loss(trainer.model, dict(trl_batch)).detach())
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    ours, metrics = _ours(tmp_path, models, rows, batch, {"kind": "orpo", "beta": 0.5})
    assert ours - metrics["nll_loss"] == pytest.approx(theirs - logged["nll_loss"], abs=1e-5)
    assert abs(metrics["log_odds_chosen"]) > 1e-2 and 0 < metrics["rewards/accuracies"] < 1
    for name in ORPO_METRICS if not prompt else (m for m in ORPO_METRICS if m != "nll_loss"):
        assert metrics[name] == pytest.approx(logged[name], abs=1e-5), name
    if not prompt:
        assert ours == pytest.approx(theirs, abs=1e-5)
    else:
        assert metrics["nll_loss"] != pytest.approx(logged["nll_loss"], abs=1e-3)  # the prompt's tokens differ


@pytest.mark.parametrize(
    ("kind", "method", "names"),
    [("simpo", "lora", CPO_METRICS), ("orpo", "full", ORPO_METRICS)],
    ids=["simpo-lora", "orpo-full"],
)
def test_train_learns_the_preference(tmp_path: Path, models: dict, kind: str, method: str, names: tuple) -> None:
    """`ftl train`: the loss falls and the implicit reward comes to prefer the chosen side; every training row
    carries TRL's names and the eval row the same, prefixed `eval_`. ORPO runs with full fine-tuning: neither
    objective needs a reference, so no adapter is required."""
    train = {"max_steps": 16, "lr": 1e-2}
    objective = {"kind": kind, "beta": 2.0}
    path = dpo_config(
        tmp_path, models["llama"], preference_rows(64), objective=objective, method={"kind": method}, train=train
    )
    res = ftl("train", str(path), "data.eval_fraction=0.25")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 16 and all(set(names) <= set(r) for r in steps)
    early, late = steps[:2], steps[-4:]
    assert max(r["loss"] for r in late) < min(r["loss"] for r in early) - 0.05
    assert min(r["rewards/accuracies"] for r in late) >= 0.75
    (evaluated,) = [r for r in rows if "eval_loss" in r]
    assert all(f"eval_{name}" in evaluated for name in names) and evaluated["eval_rewards/accuracies"] >= 0.75


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_full_fine_tuning_is_accepted_and_the_resolved_config_round_trips(
    tmp_path: Path, models: dict, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reference-free objective needs no adapter: method.kind full validates. The resolved config `ftl validate`
    prints (every default written out, DPO's among them) validates again."""
    path = dpo_config(tmp_path, models["llama"], preference_rows(4), objective={"kind": kind}, method={"kind": "full"})
    assert main(["validate", str(path)]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["objective"]["kind"] == kind and resolved["objective"]["loss_type"] == "sigmoid"
    again = tmp_path / "resolved.yaml"
    again.write_text(yaml.safe_dump(resolved))
    assert main(["validate", str(again)]) == 0, capsys.readouterr().err
