"""ORPO (Hong et al. 2024) on preference pairs: no reference model; an SFT loss on the chosen completion plus a
weighted odds-ratio term.

With a_c and a_r the policy's per-token average log-probabilities of the chosen and rejected completions, the odds
of a completion are p/(1−p) with p = exp(a), and the pairs of a micro-batch lose, as TRL 1.16's ORPOTrainer:
  L_NLL − β · mean over pairs of logσ(log odds_c − log odds_r),   log odds = a − log(1 − exp(a))
L_NLL is the mean next-token loss over the chosen completions' label tokens. TRL's ORPOTrainer also counts the
prompt's tokens in it; here the prompt never carries loss (data.mask_prompt), as in every pair objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from launcher.loss import TaskLosses
from launcher.objectives.base import Batch, LossSum
from launcher.objectives.dpo import METRICS
from launcher.objectives.reference_free import ReferenceFree, policy_scores

LN_HALF = -math.log(2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, each branch where it keeps its precision (as TRL)."""
    return torch.where(x < LN_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPO(ReferenceFree):
    """ORPO; TRL's ORPOTrainer metric names (rewards: β·average log-prob; nll_loss, log_odds_ratio,
    log_odds_chosen)."""

    name = "orpo"
    counts = (*METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")

    def loss_sum(self, model: nn.Module, batch: Batch, per_task: TaskLosses | None = None) -> LossSum:
        """Σ over the batch's pairs of the ORPO loss (its NLL term weighted by the pairs), and the metrics' sums."""
        beta = self.cfg.objective.beta
        scores = policy_scores(model, batch)
        log_odds = (scores.chosen - scores.rejected) - (log1mexp(scores.chosen) - log1mexp(scores.rejected))
        ratio = F.logsigmoid(log_odds)
        loss = scores.nll * scores.pairs - beta * ratio.sum()
        counts = {"log_odds_ratio": float(ratio.detach().sum()), "log_odds_chosen": float(log_odds.detach().sum())}
        return LossSum(loss, {**self.reward_counts(scores, beta), **counts})
