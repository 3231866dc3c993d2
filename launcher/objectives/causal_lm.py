"""Causal-LM supervised fine-tuning: next-token loss over label tokens, normalised by their number."""

from __future__ import annotations

from typing import Any

from torch import nn

from launcher.attention import NAME as SEGMENT_ATTENTION
from launcher.data import Collator, label_token_count
from launcher.loss import TaskLosses, causal_lm_loss_sum
from launcher.objectives.base import Batch, LossSum, Objective


class CausalLM(Objective):
    """SFT on text, completion and chat rows: the label-only loss of launcher/loss.py."""

    name = "causal_lm"

    def collator(self, tokenizer: Any, model_config: Any, may_concatenate: bool) -> Collator:
        """Padding-free concatenation needs the model's width for its cost model; off when it is not known."""
        width = getattr(model_config, "hidden_size", 0) if may_concatenate else 0
        segmented = getattr(model_config, "_attn_implementation", None) == SEGMENT_ATTENTION
        return Collator(tokenizer.pad_token_id, int(width or 0), segmented)

    def loss_units(self, batch: Batch) -> int:
        """Label tokens after the causal shift."""
        return label_token_count(batch)

    def loss_sum(self, model: nn.Module, batch: Batch, per_task: TaskLosses | None = None) -> LossSum:
        """Σ next-token cross-entropy over the label tokens."""
        return LossSum(causal_lm_loss_sum(model, batch, per_task))
