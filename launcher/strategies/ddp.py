"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.methods import trainable_parameters
from launcher.strategies.base import OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = make_optimizer(trainable_parameters(model))
        self.scaler = self.make_scaler()
        return self.model

    @property
    def unwrapped(self) -> nn.Module:
        return self.model.module

    def backward(self, loss: torch.Tensor) -> None:
        # The loop divides by the GLOBAL label count, so gradients must be summed over the data-parallel
        # replicas; DDP averages over them.
        super().backward(loss * self.env.dp_size)

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_step else self.model.no_sync()
