"""Evaluation: the eval split's metrics (per task too), the reference split's loss and the forgetting report."""

from __future__ import annotations

import math
from typing import Any

import torch

from launcher.checkpoint import TrainState
from launcher.data import Samples, label_token_count
from launcher.dist import all_reduce_sum
from launcher.loss import TaskLosses
from launcher.metrics import MetricsWriter, log
from launcher.objectives.base import Batch
from launcher.reference_head import PretrainedLMHead
from launcher.rng import untouched_global_streams
from launcher.run_context import RunContext


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    run: RunContext, samples: Samples, task_names: list[str] | None = None, lm_head: PretrainedLMHead | None = None
) -> dict[str, float]:
    """What the objective reports over `samples` (with `task_names`, each task's loss of a multi-task split);
    every rank runs the same number of batches. With `lm_head`, the LM loss through that head (a classifier's
    reference split)."""
    model, env, objective = run.model, run.env, run.objective
    model.eval()
    mbs, dp = run.cfg.train.micro_batch_size, env.dp_size  # each data-parallel replica its share
    n_chunks = math.ceil(len(samples) / (mbs * dp))
    if run.cfg.train.eval_batches:
        n_chunks = min(n_chunks, run.cfg.train.eval_batches)
    per_task = TaskLosses.zeros(len(task_names)) if task_names and samples.tasks is not None else None
    counts = objective.counts if lm_head is None else ()
    totals = [0.0] * (2 + len(counts))  # loss, units, the objective's counts
    for c in range(n_chunks):
        start = c * mbs * dp + env.dp_rank * mbs
        ids = list(range(start, min(start + mbs, len(samples))))
        batch = run.collate(samples, ids or [0])  # a rank without rows left still joins the collectives
        with run.strategy.autocast():
            if lm_head is not None:
                batch = lm_head.prepare(batch)
                loss, found = lm_head.loss_sum(model, to_device(batch, env.device)), {}
                units = label_token_count(batch)
            else:
                result = objective.loss_sum(model, to_device(batch, env.device), per_task if ids else None)
                loss, found, units = result.loss, result.counts, objective.loss_units(batch)
        if ids:
            totals = [a + b for a, b in zip(totals, [float(loss), units, *(found[k] for k in counts)], strict=True)]
    model.train()
    loss_total, units, *rest = all_reduce_sum([*totals, *(per_task.flat() if per_task else [])], env)
    found = dict(zip(counts, rest[: len(counts)], strict=True))
    out = objective.report(loss_total, units, found) if lm_head is None else {"eval_loss": loss_total / max(units, 1)}
    means = zip(task_names or [], TaskLosses.means(rest[len(counts) :]))
    out.update({f"eval_loss/{n}": v for n, v in means if v is not None})
    return out


class Evaluator:
    """The eval split's metrics and the reference split's loss for one run. What scores the reference split is
    the objective's choice (a classifier: its checkpoint's pre-trained LM head, launcher/reference_head.py)."""

    def __init__(self, run: RunContext, tokenizer: Any):
        self.run = run
        self.lm_head = run.objective.reference_head(tokenizer, run.env.device) if run.data.reference else None

    def due(self, step: int) -> bool:
        """Whether this step evaluates (train.eval_every, and the last step)."""
        every, data = self.run.cfg.train.eval_every, self.run.data
        wanted = data.eval is not None or data.reference is not None
        return wanted and ((every and step % every == 0) or step == self.run.steps)

    @untouched_global_streams()  # evaluation between steps: the next step draws what it would have drawn without it
    def metrics(self, task: bool = True) -> dict[str, float]:
        """The eval split's metrics (when `task`) and the reference split's loss, as one metrics row."""
        data = self.run.data
        out = evaluate(self.run, data.eval, data.task_names) if task and data.eval is not None else {}
        if data.reference is not None:
            out["reference_loss"] = evaluate(self.run, data.reference, lm_head=self.lm_head)["eval_loss"]
        return out

    def measure_reference_start(self, state: TrainState, writer: MetricsWriter | None) -> None:
        """data.reference: its loss on the untouched model (a fresh run's step 0), forgetting's baseline."""
        if self.run.data.reference is None or state.step != 0:
            return
        state.reference_start = self.metrics(task=False)["reference_loss"]
        if writer:
            writer.write({"step": 0, "reference_loss": state.reference_start})


def report_forgetting(state: TrainState, metrics: dict[str, float], steps: int) -> None:
    """At the end: how far the reference loss rose from the pre-trained model's."""
    if state.step == steps and state.reference_start is not None and "reference_loss" in metrics:
        start, end = state.reference_start, metrics["reference_loss"]
        log(f"forgetting: reference loss {start:.4f} -> {end:.4f} ({end - start:+.4f}, {end / start - 1:+.1%})")
