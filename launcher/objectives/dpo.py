"""Direct preference optimisation (DPO) on preference pairs, against the reference objective.reference names
(launcher/objectives/reference.py: the adapter switched off, a frozen copy, or precomputed log-probs).

A batch holds n pairs as 2n sequences: the chosen completions, then the rejected ones, as padded rows, one
padding-free row or packed rows; the batch's `sequence_ids` say which token is which (launcher/data/preference.py).
With π the policy's and ρ the reference's summed log-probability of a completion given its prompt, each pair's
margin is m = (π_c − ρ_c) − (π_r − ρ_r), and its loss (TRL 1.16's definitions; ε = label_smoothing):
  sigmoid  −logσ(β·m)·(1−ε) − logσ(−β·m)·ε          (ε > 0: conservative DPO)
  ipo      (m̄ − 1/(2β))², m̄ on log-ratios averaged over each completion's tokens (as TRL)
  hinge    relu(1 − β·m)
The summed loss is normalised by pairs. The log-probs come from the label-only output layer of launcher/loss.py
(label positions only, in chunks, one sum per sequence) where the model has it, else from the model's full logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from launcher.attention import NAME as SEGMENT_ATTENTION
from launcher.config import Config
from launcher.data import PairCollator
from launcher.data.pair_batches import pair_count
from launcher.loss import TaskLosses
from launcher.objectives.base import Batch, LossSum, Objective, TrainingStart
from launcher.objectives.reference import reference_for, sequence_logps

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def pair_losses(
    margins: torch.Tensor, avg_margins: torch.Tensor, beta: float, loss_type: str, eps: float
) -> torch.Tensor:
    """Each pair's loss from its margin m (summed log-ratios) and, for IPO, its token-averaged margin."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margins) * (1 - eps) - F.logsigmoid(-beta * margins) * eps
    if loss_type == "ipo":
        return (avg_margins - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * margins)
    raise ValueError(f"objective.loss_type: unknown {loss_type!r}")


class DPO(Objective):
    """DPO with the sigmoid, IPO or hinge loss; TRL's metric names."""

    name = "dpo"
    counts = METRICS

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.reference = reference_for(cfg)

    def start(self, start: TrainingStart) -> None:
        """The reference's preparation: a frozen copy, or the precomputed log-probs (nothing with adapters)."""
        self.reference.start(start)

    def collator(self, tokenizer: Any, model_config: Any, may_concatenate: bool) -> PairCollator:
        """Pairs padded, or concatenated padding-free where that computes less (as SFT's rows); packed rows when
        the split was packed."""
        width = getattr(model_config, "hidden_size", 0) if may_concatenate else 0
        segmented = getattr(model_config, "_attn_implementation", None) == SEGMENT_ATTENTION
        return PairCollator(tokenizer.pad_token_id, int(width or 0), segmented)

    def loss_units(self, batch: Batch) -> int:
        """Pairs."""
        return pair_count(batch)

    def reference_logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The reference's per-row log-probs, no graph. A forward goes through the strategy's module for a forward
        without backward (`use_forward_only`; else `model` itself)."""
        return self.reference.logps(self.forward_only if self.forward_only is not None else model, batch)

    def loss_sum(self, model: nn.Module, batch: Batch, per_task: TaskLosses | None = None) -> LossSum:
        """Σ over the batch's pairs of the DPO loss, and the sums behind TRL's reward and log-prob metrics."""
        o = self.cfg.objective
        reference = self.reference_logps(model, batch)
        policy, lengths = sequence_logps(model, batch)
        ratios = policy - reference
        chosen, rejected = ratios.chunk(2)
        chosen_len, rejected_len = lengths.clamp(min=1).chunk(2)
        margins = chosen - rejected
        averaged = chosen / chosen_len - rejected / rejected_len
        loss = pair_losses(margins, averaged, o.beta, o.loss_type, o.label_smoothing).sum()
        return LossSum(loss, self._counts(o.beta * chosen.detach(), o.beta * rejected.detach(), policy.detach()))

    @staticmethod
    def _counts(chosen: torch.Tensor, rejected: torch.Tensor, policy: torch.Tensor) -> dict[str, float]:
        """Sums over pairs of the implicit rewards β·(π − ρ), their order and margin, and the policy log-probs."""
        logps_chosen, logps_rejected = policy.chunk(2)
        values = (chosen, rejected, (chosen > rejected).float(), chosen - rejected, logps_chosen, logps_rejected)
        return {name: float(v.sum()) for name, v in zip(METRICS, values, strict=True)}

    def step_metrics(self, units: float, counts: dict[str, float]) -> dict[str, float]:
        """Means over the step's pairs, under TRL's names."""
        return {name: counts[name] / max(units, 1) for name in METRICS}

    def report(self, loss_total: float, units: float, counts: dict[str, float]) -> dict[str, float]:
        """Mean loss and the same metrics over the eval pairs, prefixed `eval_`."""
        means = self.step_metrics(units, counts)
        return {"eval_loss": loss_total / max(units, 1), **{f"eval_{k}": v for k, v in means.items()}}
