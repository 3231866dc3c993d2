"""Training objectives behind one interface (base.py). `objective_for` is the only place that picks one.

This package's __init__ and traits.py import nothing heavy, so `ftl validate` can ask what an objective reads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from launcher.config import Config
from launcher.objectives.traits import objective_name

if TYPE_CHECKING:
    from launcher.objectives.base import Objective

IMPLEMENTATIONS = {
    "causal_lm": "launcher.objectives.causal_lm:CausalLM",
    "sequence_classification": "launcher.objectives.classification:SequenceClassification",
    "dpo": "launcher.objectives.dpo:DPO",
    "simpo": "launcher.objectives.simpo:SimPO",
    "orpo": "launcher.objectives.orpo:ORPO",
    "reward": "launcher.objectives.reward:Reward",
}


def objective_for(cfg: Config) -> Objective:
    """The objective of this run: objective.kind when given, else by what the model is trained to do (model.task)."""
    module, name = IMPLEMENTATIONS[objective_name(cfg)].split(":")
    return getattr(importlib.import_module(module), name)(cfg)
