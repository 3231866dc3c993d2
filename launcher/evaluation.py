"""Evaluation: the eval split's loss (per task too), the reference split's loss and the forgetting report."""

from __future__ import annotations

import math
from typing import Any

import torch

from launcher.checkpoint import TrainState
from launcher.config import Config
from launcher.data import Collator, DataSplits, Samples, label_token_count
from launcher.dist import DistEnv, all_reduce_sum
from launcher.loss import TaskLosses, loss_sum
from launcher.metrics import MetricsWriter, log
from launcher.reference_head import PretrainedLMHead, load_reference_head
from launcher.rng import untouched_global_streams
from launcher.strategies.base import Strategy


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    strategy: Strategy,
    samples: Samples,
    cfg: Config,
    env: DistEnv,
    collate: Collator,
    task_names: list[str] | None = None,
    lm_head: PretrainedLMHead | None = None,
) -> dict[str, float]:
    """Mean eval loss (and accuracy for classification; each task's loss for a multi-task split); every rank
    runs the same number of batches. With `lm_head`, the LM loss through that head (a classifier's reference)."""
    model = strategy.model
    model.eval()
    mbs, dp = cfg.train.micro_batch_size, env.dp_size  # each data-parallel replica its share
    n_chunks = math.ceil(len(samples) / (mbs * dp))
    if cfg.train.eval_batches:
        n_chunks = min(n_chunks, cfg.train.eval_batches)
    loss_total = count = correct = 0.0
    per_task = TaskLosses.zeros(len(task_names)) if task_names and samples.tasks is not None else None
    for c in range(n_chunks):
        start = c * mbs * dp + env.dp_rank * mbs
        ids = list(range(start, min(start + mbs, len(samples))))
        batch = collate(samples, ids or [0])
        with strategy.autocast():
            if lm_head is not None:
                batch = lm_head.prepare(batch)
                loss, right = lm_head.loss_sum(model, to_device(batch, env.device)), 0
            else:
                loss, right = loss_sum(model, to_device(batch, env.device), per_task if ids else None)
        if ids:
            loss_total += float(loss)
            count += label_token_count(batch)
            correct += right
    model.train()
    per_task_sums = per_task.flat() if per_task is not None else []
    loss_total, count, correct, *sums = all_reduce_sum([loss_total, count, correct, *per_task_sums], env)
    out = {"eval_loss": loss_total / max(count, 1)}
    if samples.class_labels is not None:
        out["eval_accuracy"] = correct / max(count, 1)
    means = zip(task_names or [], TaskLosses.means(sums))
    out.update({f"eval_loss/{n}": v for n, v in means if v is not None})
    return out


class Evaluator:
    """The eval split's metrics and the reference split's loss for one run. A classifier's reference loss is
    taken through its checkpoint's pre-trained LM head (launcher/reference_head.py)."""

    def __init__(
        self, strategy: Strategy, data: DataSplits, cfg: Config, env: DistEnv, collate: Collator, tokenizer: Any
    ):
        self.strategy, self.data, self.cfg, self.env, self.collate = strategy, data, cfg, env, collate
        classifier = cfg.model.task == "sequence_classification"
        self.lm_head = load_reference_head(cfg, tokenizer, env.device) if classifier and data.reference else None

    def due(self, step: int, steps: int) -> bool:
        """Whether this step evaluates (train.eval_every, and the last step)."""
        every = self.cfg.train.eval_every
        wanted = self.data.eval is not None or self.data.reference is not None
        return wanted and ((every and step % every == 0) or step == steps)

    @untouched_global_streams()  # evaluation between steps: the next step draws what it would have drawn without it
    def metrics(self, task: bool = True) -> dict[str, float]:
        """The eval split's metrics (when `task`) and the reference split's loss, as one metrics row."""
        s, d, cfg, env, collate = self.strategy, self.data, self.cfg, self.env, self.collate
        out = evaluate(s, d.eval, cfg, env, collate, d.task_names) if task and d.eval is not None else {}
        if d.reference is not None:
            out["reference_loss"] = evaluate(s, d.reference, cfg, env, collate, lm_head=self.lm_head)["eval_loss"]
        return out

    def measure_reference_start(self, state: TrainState, writer: MetricsWriter | None) -> None:
        """data.reference: its loss on the untouched model (a fresh run's step 0), forgetting's baseline."""
        if self.data.reference is None or state.step != 0:
            return
        state.reference_start = self.metrics(task=False)["reference_loss"]
        if writer:
            writer.write({"step": 0, "reference_loss": state.reference_start})


def report_forgetting(state: TrainState, metrics: dict[str, float], steps: int) -> None:
    """At the end: how far the reference loss rose from the pre-trained model's."""
    if state.step == steps and state.reference_start is not None and "reference_loss" in metrics:
        start, end = state.reference_start, metrics["reference_loss"]
        log(f"forgetting: reference loss {start:.4f} -> {end:.4f} ({end - start:+.4f}, {end / start - 1:+.1%})")
