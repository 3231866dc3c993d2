"""SimPO (Meng et al. 2024) on preference pairs: no reference model, a length-normalised reward and a margin.

With a_c and a_r the policy's per-token average log-probabilities of the chosen and rejected completions, each
pair's loss is, as TRL 1.16's CPOTrainer with loss_type "simpo" (ε = label_smoothing, γ = gamma):
  z = β·(a_c − a_r) − γ,   −logσ(z)·(1−ε) − logσ(−z)·ε
plus sft_weight (TRL's cpo_alpha) times the chosen completions' mean next-token loss (CPO-SimPO; 0: the paper's).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from launcher.loss import TaskLosses
from launcher.objectives.base import Batch, LossSum
from launcher.objectives.dpo import METRICS
from launcher.objectives.reference_free import ReferenceFree, policy_scores


class SimPO(ReferenceFree):
    """SimPO, and CPO-SimPO with sft_weight > 0; TRL's CPOTrainer metric names (rewards: β·average log-prob)."""

    name = "simpo"
    counts = (*METRICS, "nll_loss")

    def loss_sum(self, model: nn.Module, batch: Batch, per_task: TaskLosses | None = None) -> LossSum:
        """Σ over the batch's pairs of the SimPO loss (+ the weighted NLL term), and the metrics' sums."""
        o = self.cfg.objective
        scores = policy_scores(model, batch)
        z = o.beta * (scores.chosen - scores.rejected) - o.gamma
        losses = -F.logsigmoid(z) * (1 - o.label_smoothing) - F.logsigmoid(-z) * o.label_smoothing
        loss = losses.sum() + o.sft_weight * scores.nll * scores.pairs
        return LossSum(loss, self.reward_counts(scores, o.beta))
