"""One process, no wrapper; fp16 gets a loss scaler."""

from __future__ import annotations

from torch import nn

from launcher.methods import trainable_parameters
from launcher.strategies.base import OptimizerFactory
from launcher.strategies.unsharded import UnshardedStrategy


class SingleStrategy(UnshardedStrategy):
    """The model as it is, in one process."""

    name = "single"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        """No wrapper; the optimizer over the trainable parameters."""
        self.model = model
        self.optimizer = make_optimizer(trainable_parameters(model))
        self.scaler = self.make_scaler()
        return model
