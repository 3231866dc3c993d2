"""DPO with full fine-tuning (issue 18, point 3): the reference as a frozen copy of the starting model
(`objective.reference: model`) or as log-probs computed once before training and cached beside the tokenised
data (`precomputed`); `auto` choosing between them and the adapter switched off."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import base_config, ftl, read_metrics, write_config, write_jsonl
from resume_utils import final_weights, finish, kill_after, max_weight_diff, start
from test_dpo import METRICS, preference_rows

from launcher.checkpoint import TrainState
from launcher.config_loading import load_config
from launcher.data.pair_batches import PairCollator
from launcher.data.preference import tokenize_pairs
from launcher.data.tokenized import token_cache_dir
from launcher.dist import init_distributed
from launcher.estimate import GIB, resolve_reference
from launcher.evaluation import evaluate
from launcher.model import load_tokenizer
from launcher.objectives import objective_for
from launcher.objectives.base import Ranks, TrainingStart
from launcher.objectives.reference import ModelCopy, Precomputed, reference_pass
from launcher.optim import optimizer_factory
from launcher.prepare import prepare_data
from launcher.run_context import RunContext
from launcher.run_start import make_collator, start_objective
from launcher.trainer import optimizer_step, plan_run

LN2 = math.log(2)
SINGLE = Ranks(device=torch.device("cpu"), sum=lambda t: t)
COMPUTED, READ = "reference log-probs of data.train: computed", "reference log-probs of data.train: 32 pairs read"


def full_config(tmp: Path, model: Path, rows: list[dict], reference: str, **sections: dict) -> Path:
    """Full fine-tuning DPO on `rows` with `objective.reference`."""
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp / "pairs.jsonl", rows)
    cfg = base_config(
        tmp,
        model,
        data,
        data={"format": "preference"},
        objective={"kind": "dpo", "reference": reference},
        train={"max_steps": 3, "lr": 1e-3, "schedule": "constant"},
    )
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return write_config(tmp / "cfg.yaml", cfg)


def trained(path: Path, steps: int, *overrides: str) -> tuple[list[dict], RunContext]:
    """`steps` optimizer steps of the run `path` configures, in this process (as `ftl train` starts them)."""
    cfg = load_config(path, list(overrides))
    tokenizer = load_tokenizer(cfg)
    run = plan_run(cfg, init_distributed(1), Path(cfg.output_dir), prepare_data(cfg, tokenizer))
    model = run.strategy.build_model()
    run.strategy.setup(model, optimizer_factory(run.cfg.train, model))
    run.collate = make_collator(run, tokenizer)
    start_objective(run)
    state = TrainState()
    return [optimizer_step(run, state) for _ in range(steps)], run


def test_copy_and_precomputed_references_give_the_same_losses(tmp_path: Path, models: dict) -> None:
    """Full fine-tuning: at step 1 the policy is the starting model, so the sigmoid loss is exactly ln 2 with
    either reference; over 3 steps (the policy moving away) the frozen copy and the precomputed log-probs give
    the same losses and metrics. The copy is frozen and stays at the starting weights; with precomputed
    log-probs the objective holds no model at all, and the log-probs ride in the batch. Evaluation agrees too."""
    rows = preference_rows(32)
    results = {}
    for reference in ("model", "precomputed"):
        path = full_config(tmp_path / reference, models["llama"], rows, reference, data={"eval_fraction": 0.25})
        results[reference] = trained(path, 3)
    (copied, copy_run), (stored, stored_run) = results["model"], results["precomputed"]
    evaluated = [evaluate(run, run.data.eval) for run in (copy_run, stored_run)]
    assert evaluated[1] == pytest.approx(evaluated[0], rel=1e-5, abs=1e-7)
    assert abs(evaluated[0]["eval_rewards/margins"]) > 1e-4
    for row in (copied[0], stored[0]):
        assert abs(row["loss"] - LN2) < 1e-6 and row["rewards/margins"] == 0.0
    assert abs(copied[-1]["loss"] - LN2) > 1e-3  # the policy moved, the reference did not
    for a, b in zip(copied, stored, strict=True):
        for key in ("loss", *METRICS):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    frozen = copy_run.objective.reference.model
    assert isinstance(copy_run.objective.reference, ModelCopy) and not frozen.training
    policy = dict(copy_run.strategy.unwrapped.named_parameters())
    start = dict(stored_run.objective.reference.__dict__)  # nothing but the config: no model resident
    assert isinstance(stored_run.objective.reference, Precomputed) and not any(
        isinstance(v, torch.nn.Module) for v in start.values()
    )
    moved = 0
    for name, p in frozen.named_parameters():
        assert not p.requires_grad and p.grad is None
        moved += not torch.equal(p, policy[name])
    assert moved > 0
    batch = stored_run.collate(stored_run.data.train, [5, 1])
    assert torch.equal(
        batch["reference_logps"], torch.from_numpy(stored_run.data.train.reference_logps[[5, 1]].T).flatten()
    )


def test_precomputed_file_is_reused_and_keyed(tmp_path: Path, models: dict, capfd: pytest.CaptureFixture) -> None:
    """A second run with the same model, pairs and settings reads the stored log-probs (no pass, file untouched);
    other pairs, or a max_seq_len that cuts the completions, compute (and store) their own."""
    rows = preference_rows(32, seed=7)
    path = full_config(tmp_path / "a", models["llama"], rows, "precomputed")
    trained(path, 0)
    assert COMPUTED in capfd.readouterr().err
    files = {f: f.stat().st_mtime_ns for f in token_cache_dir().glob("reference-logps-*.npy")}
    _, run = trained(path, 0)
    assert READ in capfd.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in files} == files
    first = run.data.train.reference_logps.copy()
    trained(full_config(tmp_path / "b", models["llama"], preference_rows(32, seed=8), "precomputed"), 0)
    assert COMPUTED in capfd.readouterr().err
    _, cut = trained(path, 0, "data.max_seq_len=12", "data.max_dropped_fraction=1", "output_dir=" + str(tmp_path / "c"))
    assert COMPUTED in capfd.readouterr().err
    assert not (cut.data.train.reference_logps.shape == first.shape and (cut.data.train.reference_logps == first).all())


def test_kill_and_resume_with_precomputed_reads_the_stored_log_probs(tmp_path: Path, models: dict) -> None:
    """kill -9 after step 3 and resume from the step-2 checkpoint: the final weights equal an uninterrupted run's,
    and the resumed run reads the stored log-probs (no reference pass over the resumed weights)."""
    cfg = full_config(
        tmp_path,
        models["llama"],
        preference_rows(32, seed=21),
        "precomputed",
        train={"max_steps": 5},
        checkpoint={"every_steps": 2},
        data={"eval_fraction": 0.25},
    )
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    code, log = finish(start(cfg, f"output_dir={straight}"))
    assert code == 0 and COMPUTED in log, log[-3000:]
    kill_after(cfg, killed, step=3)
    code, log = finish(start(cfg, f"output_dir={killed}"))
    assert code == 0 and "at step 2" in log, log[-3000:]
    assert "of data.train: 24 pairs read" in log and "of data.eval: 8 pairs read" in log and "computed" not in log
    assert max_weight_diff(final_weights(killed), final_weights(straight)) <= 1e-6
    (a,), (b,) = ([r for r in read_metrics(run) if "eval_loss" in r] for run in (straight, killed))
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-6) and a["eval_loss"] != pytest.approx(LN2)


def test_precomputed_under_ddp_each_rank_computes_its_share(tmp_path: Path, models: dict) -> None:
    """Two ranks each compute their share of the pass (30 pairs: uneven last shares), one sum gives both the whole
    array: step 1 is ln 2, and the stored file (found again by a one-process run: the key has no world size)
    equals a one-process pass over the same model."""
    path = full_config(tmp_path, models["llama"], preference_rows(30, seed=11), "precomputed", train={"max_steps": 1})
    res = ftl("train", "--nproc", "2", str(path))
    assert res.returncode == 0 and "reference log-probs of data.train: computed" in res.stderr, res.stderr[-3000:]
    (row,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert row["world_size"] == 2 and abs(row["loss"] - LN2) < 1e-6
    _, run = trained(path, 0, f"output_dir={tmp_path / 'one'}")
    stored = run.data.train.reference_logps
    start = TrainingStart(run.model, run.strategy.unwrapped, run.data, run.collate, run.strategy.autocast, SINGLE)
    assert stored.shape == (30, 2) and np.allclose(reference_pass(start, run.data.train, 4), stored, atol=1e-6)


def test_loss_equals_trl_with_a_reference_model(tmp_path: Path, models: dict) -> None:
    """Full fine-tuning, no adapter: ftl's DPO loss with a frozen copy of the starting model equals TRL 1.16's
    DPOTrainer with a `ref_model` (the same starting weights) once the policy has moved, within 1e-5."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = preference_rows(4, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    policy = AutoModelForCausalLM.from_pretrained(models["llama"])
    objective = objective_for(load_config(full_config(tmp_path / "ftl", models["llama"], rows, "model")))
    collate = PairCollator(tokenizer.pad_token_id)
    # the copy of the starting weights, taken before TRL patches the policy's forward (a closure over it)
    objective.start(TrainingStart(policy, policy, None, collate, torch.no_grad, SINGLE))
    # bf16 off: accelerate would otherwise run TRL's reference model (not its policy) under bf16 autocast on CPU
    args = DPOConfig(str(tmp_path / "trl"), report_to=[], use_cpu=True, beta=0.1, max_length=64, seed=0, bf16=False)
    trainer = DPOTrainer(
        model=policy,
        ref_model=AutoModelForCausalLM.from_pretrained(models["llama"]),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    samples = tokenize_pairs([dict(r) for r in rows], tokenizer, 64)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    theirs = float(trainer.compute_loss(policy, dict(trl_batch)).detach())
    batch = collate(samples, range(len(rows)))
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    result = objective.loss_sum(policy, batch)
    assert float(result.loss.detach()) / len(rows) == pytest.approx(theirs, abs=1e-5)
    assert abs(result.counts["rewards/margins"]) > 1e-3  # the policy really moved off its reference


def test_auto_picks_and_says_why(tmp_path: Path, models: dict, capfd: pytest.CaptureFixture) -> None:
    """auto: the adapter switched off with LoRA; with full fine-tuning a frozen copy when the estimate says it
    fits, else precomputed log-probs; a sharded strategy never copies. The start log says which and why."""
    rows = preference_rows(8)
    full = load_config(full_config(tmp_path / "full", models["llama"], rows, "auto"))
    lora = load_config(full_config(tmp_path / "lora", models["llama"], rows, "auto", method={"kind": "lora"}))
    assert resolve_reference(lora, 1, False, 64 * GIB)[0].objective.reference == "adapter_disabled"
    roomy, note = resolve_reference(full, 1, False, 64 * GIB)
    assert roomy.objective.reference == "model" and "frozen reference copy" in note
    assert resolve_reference(full, 1, False, 0.01 * GIB)[0].objective.reference == "precomputed"
    sharded = full.model_copy(deep=True)
    sharded.distributed.strategy = "fsdp"
    assert resolve_reference(sharded, 2, False, 64 * GIB)[0].objective.reference == "precomputed"
    _, run = trained(full_config(tmp_path / "run", models["llama"], rows, "auto"), 0)
    assert run.cfg.objective.reference == "model" and isinstance(run.objective.reference, ModelCopy)
    assert "objective.reference auto -> model (estimated peak" in capfd.readouterr().err
