"""Sequence classification: cross-entropy over rows, normalised by rows; evaluation adds accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from launcher.data import Collator
from launcher.loss import TaskLosses
from launcher.objectives.base import Batch, LossSum, Objective
from launcher.reference_head import PretrainedLMHead, load_reference_head

INPUTS = ("input_ids", "attention_mask")


class SequenceClassification(Objective):
    """One label per row from the model's classification head."""

    name = "sequence_classification"
    counts = ("correct",)

    def collator(self, tokenizer: Any, model_config: Any, may_concatenate: bool) -> Collator:
        """Rows stay rows: each has its own label."""
        return Collator(tokenizer.pad_token_id)

    def loss_units(self, batch: Batch) -> int:
        """Rows."""
        return int(batch["class_labels"].numel())

    def loss_sum(self, model: nn.Module, batch: Batch, per_task: TaskLosses | None = None) -> LossSum:
        """Σ cross-entropy over rows, and how many rows the head got right."""
        logits = model(**{k: batch[k] for k in INPUTS}).logits.float()
        labels = batch["class_labels"]
        correct = float((logits.argmax(-1) == labels).sum())
        tasks = batch.get("task_ids")
        if per_task is None or tasks is None:
            return LossSum(F.cross_entropy(logits, labels, reduction="sum"), {"correct": correct})
        losses = F.cross_entropy(logits, labels, reduction="none")
        per_task.add(losses, tasks[:, 0])  # a row's first token carries its task
        return LossSum(losses.sum(), {"correct": correct})

    def report(self, loss_total: float, units: float, counts: dict[str, float]) -> dict[str, float]:
        """Mean loss and accuracy over the rows."""
        return {"eval_loss": loss_total / max(units, 1), "eval_accuracy": counts["correct"] / max(units, 1)}

    def reference_head(self, tokenizer: Any, device: torch.device) -> PretrainedLMHead | None:
        """A classifier scores data.reference through its checkpoint's pre-trained LM head."""
        return load_reference_head(self.cfg, tokenizer, device)
