"""One process, no wrapper; fp16 gets a loss scaler."""

from __future__ import annotations

from torch import nn

from launcher.methods import trainable_parameters
from launcher.strategies.base import OptimizerFactory, Strategy


class SingleStrategy(Strategy):
    name = "single"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        self.model = model
        self.optimizer = make_optimizer(trainable_parameters(model))
        self.scaler = self.make_scaler()
        return model
