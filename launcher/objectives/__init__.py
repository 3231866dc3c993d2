"""Training objectives behind one interface (base.py). `objective_for` is the only place that picks one."""

from __future__ import annotations

from launcher.config import Config
from launcher.objectives.base import Batch, LossSum, Objective
from launcher.objectives.causal_lm import CausalLM
from launcher.objectives.classification import SequenceClassification

OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (CausalLM, SequenceClassification)}

__all__ = ["Batch", "LossSum", "Objective", "objective_for"]


def objective_for(cfg: Config) -> Objective:
    """The objective of this run, by what the model is trained to do (model.task)."""
    return OBJECTIVES[cfg.model.task](cfg)
