"""What one training run is made of, built once before the loop and handed to the loop's parts.

It replaces the (strategy, cfg, env, data, collate, ...) tuple that travelled through every function of the
loop: each part takes the run and reads what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from launcher.config import Config
from launcher.data import Collator, DataSplits, GlobalBatchSampler
from launcher.dist import DistEnv
from launcher.objectives.base import Objective
from launcher.strategies.base import Strategy


@dataclass
class RunContext:
    """The parts of one run: its config, process world, data, strategy and objective, and how long it is."""

    cfg: Config
    env: DistEnv
    out_dir: Path
    data: DataSplits
    strategy: Strategy
    objective: Objective
    sampler: GlobalBatchSampler
    steps: int  # optimizer steps the whole run takes
    collate: Collator | None = None  # set once the model is built (padding-free needs its width)

    @property
    def model(self) -> nn.Module:
        """The model as the strategy runs it (wrapped)."""
        return self.strategy.model
