"""Reward modelling on preference pairs: a sequence-classification head with one output scores each completion,
and the Bradley–Terry loss asks the chosen one to score higher.

A batch holds n pairs as 2n rows, the chosen completions then the rejected ones (launcher/data/preference.py),
each row its prompt followed by the completion; the head reads each row at its last token that is not padding
(the model's pad id is the tokenizer's: launcher/model.py). With r_c and r_r a pair's two scores, its loss is
TRL 1.16's RewardTrainer's:
  −logσ(r_c − r_r − μ)  [+ c·(r_c + r_r)² with objective.center_rewards_coefficient c]
with μ the pair's `margin` when the rows give one (else 0), summed over pairs and normalised by pairs. The rows'
label arrays are not used: a reward model has no targets beyond the order of the pair (and its margin).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from launcher.data import PairCollator
from launcher.loss import TaskLosses
from launcher.objectives.base import Batch, LossSum, Objective

METRICS = ("accuracy", "margin", "mean_reward")  # TRL's RewardTrainer names (its eval rows prefix them `eval_`)


def pair_rewards(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores (fp32) of the batch's chosen rows and of their rejected rows, pair k at index k of both."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    chosen, rejected = scores.squeeze(-1).chunk(2)
    return chosen, rejected


def bradley_terry(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, center: float | None
) -> torch.Tensor:
    """Each pair's loss −logσ(r_c − r_r − margin), plus center·(r_c + r_r)² when rewards are pulled toward mean
    zero."""
    gaps = chosen - rejected if margin is None else chosen - rejected - margin
    losses = -F.logsigmoid(gaps)
    return losses if center is None else losses + center * (chosen + rejected) ** 2


class Reward(Objective):
    """A reward model: Bradley–Terry on a one-output head; TRL's accuracy and margin in every row."""

    name = "reward"
    counts = METRICS

    def collator(self, tokenizer: Any, model_config: Any, may_concatenate: bool) -> PairCollator:
        """Pairs stay padded rows, right-padded with the pad id the head looks for (`may_concatenate` unused)."""
        return PairCollator(tokenizer.pad_token_id)

    def loss_units(self, batch: Batch) -> int:
        """Pairs."""
        return int(batch["input_ids"].shape[0]) // 2

    def loss_sum(self, model: nn.Module, batch: Batch, per_task: TaskLosses | None = None) -> LossSum:
        """Σ over the batch's pairs of the Bradley–Terry loss, and the sums behind accuracy, margin and the mean
        reward."""
        chosen, rejected = pair_rewards(model, batch)
        center = self.cfg.objective.center_rewards_coefficient
        loss = bradley_terry(chosen, rejected, batch.get("margin"), center).sum()
        margins = (chosen - rejected).detach()
        # mean_reward is TRL's mean over all 2n scores; counted as half their sum, so that /pairs gives it
        half = float(torch.cat([chosen, rejected]).detach().sum()) / 2
        return LossSum(
            loss, {"accuracy": float((margins > 0).sum()), "margin": float(margins.sum()), "mean_reward": half}
        )

    def step_metrics(self, units: float, counts: dict[str, float]) -> dict[str, float]:
        """Means over the step's pairs: the share ordered right, the mean score gap, the mean score."""
        return {name: counts[name] / max(units, 1) for name in METRICS}

    def report(self, loss_total: float, units: float, counts: dict[str, float]) -> dict[str, float]:
        """Mean loss and the same metrics over the eval pairs, prefixed `eval_` (TRL's eval names)."""
        means = self.step_metrics(units, counts)
        return {"eval_loss": loss_total / max(units, 1), **{f"eval_{k}": v for k, v in means.items()}}
