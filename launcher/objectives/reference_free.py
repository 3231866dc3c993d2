"""What SimPO and ORPO share: preference pairs scored by the policy alone, no reference model.

They take DPO's batches (n pairs as 2n rows, chosen first), its unit (pairs), its evaluation report and its metric
names, and score each completion by its per-token average log-probability under the policy. TRL's losses for both
add a term that is a mean over the micro-batch's chosen label tokens (the NLL of the chosen completions); here it
enters the summed loss weighted by the micro-batch's pairs, so that after the division by pairs a micro-batch's
loss is TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from launcher.objectives.base import Batch, Objective
from launcher.objectives.dpo import DPO, METRICS, sequence_logps


@dataclass
class PolicyScores:
    """A micro-batch's pairs as the policy scores them."""

    chosen: torch.Tensor  # per-token average log-prob of each chosen completion, shape (pairs,)
    rejected: torch.Tensor  # the same for the rejected completions
    average: torch.Tensor  # both, as rows (chosen rows first), shape (2·pairs,)
    nll: torch.Tensor  # mean next-token loss over all the chosen completions' label tokens (a scalar)

    @property
    def pairs(self) -> int:
        """How many pairs the micro-batch holds."""
        return int(self.chosen.numel())


def policy_scores(model: nn.Module, batch: Batch) -> PolicyScores:
    """One forward of the batch's 2n rows through the policy, with the graph."""
    logps, lengths = sequence_logps(model, batch)
    average = logps / lengths.clamp(min=1)
    chosen, rejected = average.chunk(2)
    chosen_sum, chosen_len = logps.chunk(2)[0], lengths.chunk(2)[0]
    return PolicyScores(chosen, rejected, average, -chosen_sum.sum() / chosen_len.sum().clamp(min=1))


class ReferenceFree(Objective):
    """A pair objective without a reference. Collation, units and the evaluation report are DPO's (borrowed, not
    inherited: nothing of DPO's reference comes along); each subclass brings its loss and its counts."""

    collator = DPO.collator
    loss_units = DPO.loss_units
    report = DPO.report

    def reward_counts(self, scores: PolicyScores, beta: float) -> dict[str, float]:
        """Sums over pairs of TRL's rewards/* (reward: β · average log-prob) and logps/* (the average log-probs),
        and of the chosen NLL."""
        chosen, rejected = beta * scores.chosen.detach(), beta * scores.rejected.detach()
        logps_chosen, logps_rejected = scores.average.detach().chunk(2)
        values = (chosen, rejected, (chosen > rejected).float(), chosen - rejected, logps_chosen, logps_rejected)
        counts = {name: float(v.sum()) for name, v in zip(METRICS, values, strict=True)}
        return {**counts, "nll_loss": float(scores.nll.detach()) * scores.pairs}

    def step_metrics(self, units: float, counts: dict[str, float]) -> dict[str, float]:
        """Means over the step's pairs of every count, under TRL's names."""
        return {name: counts[name] / max(units, 1) for name in self.counts}
