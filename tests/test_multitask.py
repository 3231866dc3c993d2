"""Multi-task data.train: batches drawn by weight (one seeded order, a pure function of the step), each task's
loss logged and equal to that task's loss computed alone, packing per task, and exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import base_config, ftl, read_metrics, reverse_rows, write_config, write_jsonl

from launcher.data import Collator, MixtureSampler, collate
from launcher.data.tokenized import merged, pack, subset, tokenize_rows
from launcher.loss import TaskLosses, causal_lm_loss_sum


def test_the_mix_matches_the_weights_and_each_task_is_drawn_without_replacement() -> None:
    sizes, weights = (50, 7, 13), (0.6, 0.3, 0.1)
    sampler = MixtureSampler(sum(sizes), 3, 2, 2, seed=5, task_sizes=sizes, weights=weights)
    offsets = np.cumsum([0, *sizes])
    drawn: list[list[int]] = [[], [], []]
    for step in range(400):
        ids = sampler.global_ids(step)
        assert len(ids) == sampler.global_batch == 12
        for t in range(3):
            drawn[t] += [int(i) for i in ids if offsets[t] <= i < offsets[t + 1]]
        seen = step + 1
        for t in range(3):  # never more than one sample away from the exact share, at every step
            assert abs(len(drawn[t]) - seen * 12 * weights[t]) <= 1, (step, t)
    for t in range(3):  # each pass over a task is a permutation of it: every sample drawn equally often (±1)
        times = np.bincount(np.asarray(drawn[t]) - offsets[t], minlength=sizes[t])
        assert times.max() - times.min() <= 1, (t, times)
    # a pure function of the step: a fresh sampler (a resumed run) gives the same batch; ranks split it
    fresh = MixtureSampler(sum(sizes), 3, 2, 2, seed=5, task_sizes=sizes, weights=weights)
    assert fresh.global_ids(399).tolist() == sampler.global_ids(399).tolist()
    parts = [m for r in range(2) for m in fresh.micro_batches(399, r)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(fresh.global_ids(399).tolist())
    other = MixtureSampler(sum(sizes), 3, 2, 2, seed=6, task_sizes=sizes, weights=weights)
    assert other.global_ids(0).tolist() != sampler.global_ids(0).tolist()


def _two_tasks(models: dict) -> tuple[object, object]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["llama"])
    first = tokenize_rows(reverse_rows(6, seed=1), "completion", tok, 64, True)
    second = tokenize_rows(reverse_rows(5, seed=2, fmt="alpaca", lo=6, hi=9), "alpaca", tok, 64, True)
    return tok, merged([first, second])


@pytest.mark.parametrize("head", ["label_only", "plain_logits"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_each_tasks_logged_loss_is_that_tasks_loss_alone(models: dict, head: str, padding_free: bool) -> None:
    from transformers import AutoModelForCausalLM

    from launcher.loss import install_label_only_head

    tok, samples = _two_tasks(models)
    model = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    if head == "label_only":
        assert install_label_only_head(model)
    collator = Collator(tok.pad_token_id, 10**6 if padding_free else 0)  # a wide model: concatenation wins
    ids = list(range(len(samples)))
    batch = collator(samples, ids)
    assert ("position_ids" in batch) == padding_free  # the concatenated path really ran
    sink = TaskLosses.zeros(2)
    with torch.no_grad():
        total = causal_lm_loss_sum(model, batch, sink)
        for t in range(2):
            alone = [i for i in ids if samples.tasks[i] == t]
            part = collate(subset(samples, alone), range(len(alone)), tok.pad_token_id)
            expected = causal_lm_loss_sum(model, part)
            count = int((part["labels"][:, 1:] != -100).sum())
            torch.testing.assert_close(sink.sums[t], expected.double(), rtol=1e-5, atol=1e-5)
            assert int(sink.counts[t]) == count
    torch.testing.assert_close(sink.sums.sum(), total.double(), rtol=1e-5, atol=1e-5)


def test_packing_keeps_each_packed_row_within_one_task(models: dict, tmp_path: Path) -> None:
    from launcher.config import Config
    from launcher.data.splits import finish_split

    _, samples = _two_tasks(models)
    cfg = Config.model_validate({"data": {"packing": True, "max_seq_len": 64}})
    packed = finish_split(samples, cfg, training=True)
    assert packed.tasks is not None and set(packed.tasks.tolist()) == {0, 1}
    per_task = [pack(subset(samples, np.flatnonzero(samples.tasks == t)), 64, 0) for t in range(2)]
    assert len(packed) == sum(len(p) for p in per_task)
    for t, rows in enumerate(per_task):
        tokens = sum(len(x) for x in rows.input_ids)
        assert tokens == sum(len(packed.input_ids[i]) for i in np.flatnonzero(packed.tasks == t))


def _multitask_config(tmp: Path, models: dict, **train: object) -> dict:
    easy = write_jsonl(tmp / "easy.jsonl", reverse_rows(48, seed=3))
    hard = write_jsonl(tmp / "hard.jsonl", reverse_rows(24, seed=4, fmt="alpaca", lo=8, hi=12))
    tasks = [
        {"path": str(easy), "weight": 3.0},
        {"path": str(hard), "format": "alpaca", "weight": 1.0, "name": "long"},
    ]
    return base_config(
        tmp,
        models["llama"],
        easy,
        method={"kind": "full"},
        data={"train": tasks, "eval_fraction": 0.2},
        train={"max_steps": 6, "lr": 1e-2, "micro_batch_size": 4, "eval_every": 3, **train},
        checkpoint={"every_steps": 2, "keep_last": 10},
    )


def test_a_multitask_run_logs_each_tasks_train_and_eval_loss(tmp_path: Path, models: dict) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", _multitask_config(tmp_path, models))
    res = ftl("train", str(cfg))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "tasks: easy: 38 samples, weight 75.0% = 3/batch; long: 19 samples, weight 25.0% = 1/batch" in res.stderr
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(steps) == 6 and len(evals) == 2
    for r in steps:
        assert {"loss/easy", "loss/long"} <= set(r)
        assert min(r["loss/easy"], r["loss/long"]) <= r["loss"] <= max(r["loss/easy"], r["loss/long"])
    for r in evals:
        assert {"eval_loss/easy", "eval_loss/long"} <= set(r)
    assert steps[-1]["loss/easy"] < steps[0]["loss/easy"]


@pytest.mark.slow
def test_a_multitask_run_resumes_exactly(tmp_path: Path, models: dict) -> None:
    from resume_utils import losses, straight_and_resumed

    cfg = write_config(tmp_path / "cfg.yaml", _multitask_config(tmp_path, models))
    straight_run, run = straight_and_resumed(cfg, tmp_path)
    straight = {r["step"]: r["loss/long"] for r in read_metrics(straight_run) if "loss/long" in r}
    resumed = {r["step"]: r["loss/long"] for r in read_metrics(run) if "loss/long" in r}
    assert resumed == pytest.approx(straight, rel=1e-5) and losses(run) == pytest.approx(losses(straight_run))


def test_bad_task_lists_are_refused_naming_the_task(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _multitask_config(tmp_path, models)
    cfg["data"]["train"][1]["path"] = str(tmp_path / "missing.jsonl")
    cfg["data"]["train"].append({"path": str(toy_data["classification"]), "format": "classification"})
    cfg["data"]["train"].append({"path": str(toy_data["text"]), "format": "text", "name": "long"})
    res = ftl("validate", str(write_config(tmp_path / "bad.yaml", cfg)))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "data.train[2].format: 'classification' does not fit model.task='causal_lm'" in res.stderr
    assert "task name(s) long appear twice" in res.stderr
    mixed = _multitask_config(tmp_path, models)
    mixed["data"]["train"].append(str(toy_data["text"]))
    res = ftl("validate", str(write_config(tmp_path / "mixed.yaml", mixed)))
    assert res.returncode == 2 and "data.train" in res.stderr, res.stderr[-3000:]
    missing = _multitask_config(tmp_path, models)
    missing["data"]["train"][1]["path"] = str(tmp_path / "missing.jsonl")
    res = ftl("validate", str(write_config(tmp_path / "missing.yaml", missing)))
    assert res.returncode == 2 and "data.train[1]: file not found" in res.stderr, res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("dist", [{"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}])
def test_two_ranks_log_the_same_task_losses_as_one(tmp_path: Path, models: dict, dist: dict) -> None:
    """The global batch is the same whatever the world size, so each task's loss must be too."""
    runs = {}
    for name, nproc, section, accum in (("one", [], {}, 2), ("two", ["--nproc", "2"], dist, 1)):
        cfg = _multitask_config(tmp_path, models, max_steps=3, grad_accum=accum)
        cfg.update(output_dir=str(tmp_path / name), distributed=section)
        res = ftl("train", str(write_config(tmp_path / f"{name}.yaml", cfg)), *nproc)
        assert res.returncode == 0, res.stderr[-4000:]
        runs[name] = [r for r in read_metrics(tmp_path / name) if "loss" in r or "eval_loss" in r]
    for one, two in zip(runs["one"], runs["two"], strict=True):
        keys = [k for k in one if k.startswith(("loss/", "eval_loss/"))]
        assert len(keys) >= 2 and {k: two[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, rel=1e-4)


def test_classification_tasks_share_the_head_and_log_their_losses(tmp_path: Path, models: dict) -> None:
    """Sequence classification: tasks with one label set train one head; each task's loss is its rows' mean."""
    first = write_jsonl(tmp_path / "short.jsonl", reverse_rows(40, seed=5, fmt="classification"))
    second = write_jsonl(tmp_path / "long.jsonl", reverse_rows(20, seed=6, fmt="classification", lo=8, hi=12))
    cfg = base_config(
        tmp_path,
        models["bert"],
        first,
        model={"task": "sequence_classification"},
        data={
            "train": [{"path": str(first), "weight": 1.0}, {"path": str(second), "weight": 1.0}],
            "format": "classification",
            "eval_fraction": 0.2,
        },
        train={"max_steps": 4, "lr": 1e-2, "eval_every": 4},
    )
    res = ftl("train", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert res.returncode == 0, res.stderr[-4000:]
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    for r in steps:  # 2 + 2 rows of each batch: the mean loss is the mean of the two tasks' means
        assert r["loss"] == pytest.approx((r["loss/short"] + r["loss/long"]) / 2, rel=1e-6)
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and {"eval_loss/short", "eval_loss/long", "eval_accuracy"} <= set(evals[-1])
