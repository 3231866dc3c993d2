"""One process, no wrapper; fp16 gets a loss scaler (CUDA only — config validation says so)."""

from __future__ import annotations

import torch
from torch import nn

from launcher.strategies.base import OptimizerFactory, Strategy


class SingleStrategy(Strategy):
    name = "single"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        self.model = model
        self.optimizer = make_optimizer(p for p in model.parameters() if p.requires_grad)
        if self.cfg.train.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.env.device.type)
        return model
