"""What a training objective is: the one place that knows what a batch's loss means.

The loop and evaluation ask the run's objective for everything that depends on the kind of training: how a
micro-batch is collated, how many units its summed loss is normalised by (label tokens, rows, pairs), the
summed loss itself with any counts worth reporting, and what evaluation reports from those sums. Causal-LM
SFT and sequence classification are the first two; a preference objective is one more module beside them.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from launcher.config import Config
from launcher.data import Collator, DataSplits
from launcher.loss import TaskLosses
from launcher.objectives.traits import ObjectiveTraits, objective_traits
from launcher.reference_head import PretrainedLMHead

Batch = dict[str, torch.Tensor]


@dataclass
class LossSum:
    """A micro-batch's loss summed over its units (with its graph), and counts summed alongside it."""

    loss: torch.Tensor
    counts: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingStart:
    """What an objective may prepare from once before the first step, while the model holds its starting
    weights (no checkpoint loaded yet)."""

    model: nn.Module  # as the strategy runs it (wrapped): a forward every rank joins
    bare: nn.Module  # the same without the strategy's wrapper
    data: DataSplits
    collate: Collator
    autocast: Callable[[], contextlib.AbstractContextManager]  # the strategy's forward context
    ranks: Ranks


@dataclass(frozen=True)
class Ranks:
    """This process among the run's ranks, as far as an objective's preparation needs it."""

    device: torch.device
    sum: Callable[[torch.Tensor], torch.Tensor]  # Σ of a CPU tensor across ranks (itself in one process)
    dp_rank: int = 0
    dp_size: int = 1
    is_main: bool = True  # logs
    writes: bool = True  # the first rank on its machine: writes what is cached there
    first_of_replica: bool = True  # the first rank of its data-parallel replica: its share counts once in `sum`


class Objective(ABC):
    """Collation, normalisation, loss and evaluation report of one kind of training."""

    name: str = "base"
    counts: tuple[str, ...] = ()  # the names of LossSum.counts, all-reduced with the loss (training and evaluation)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # what a forward without backward calls (None: the model `loss_sum` is given); see `use_forward_only`
        self.forward_only: nn.Module | None = None

    def use_forward_only(self, module: nn.Module) -> None:
        """Once the strategy has wrapped the model: the module to call for a forward that no backward follows
        (the strategy's `forward_only_model`). An objective that scores a batch a second time without gradients
        (a preference reference) calls it, not the wrapper `loss_sum` is given."""
        self.forward_only = module

    @property
    def traits(self) -> ObjectiveTraits:
        """What this objective declares without torch (formats it reads, packing)."""
        return objective_traits(self.name)

    def start(self, start: TrainingStart) -> None:
        """Prepare what the objective needs from the starting model (e.g. a reference); nothing by default."""
        return

    @abstractmethod
    def collator(self, tokenizer: Any, model_config: Any, may_concatenate: bool) -> Collator:
        """How sample ids become a batch; `may_concatenate`: the method and data.padding_free allow joining
        a micro-batch's rows into one."""

    @abstractmethod
    def loss_units(self, batch: Batch) -> int:
        """What the batch's summed loss is normalised by (taken before the forward: the loop all-reduces it)."""

    @abstractmethod
    def loss_sum(self, model: nn.Module, batch: Batch, per_task: TaskLosses | None = None) -> LossSum:
        """The summed loss of `batch` (on the model's device); each task's share added to `per_task`."""

    def step_metrics(self, units: float, counts: dict[str, float]) -> dict[str, float]:
        """What a training row shows beyond the loss, from the step's all-reduced unit count and `counts`."""
        return {}

    def report(self, loss_total: float, units: float, counts: dict[str, float]) -> dict[str, float]:
        """The evaluation row from all-reduced sums."""
        return {"eval_loss": loss_total / max(units, 1)}

    def reference_head(self, tokenizer: Any, device: torch.device) -> PretrainedLMHead | None:
        """What scores data.reference when the trained model itself cannot (None: the model scores it)."""
        return None
