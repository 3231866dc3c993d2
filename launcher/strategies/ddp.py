"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.methods import trainable_parameters
from launcher.strategies.base import OptimizerFactory
from launcher.strategies.unsharded import UnshardedStrategy


class DDPStrategy(UnshardedStrategy):
    """DistributedDataParallel around the whole model."""

    name = "ddp"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        """DDP's wrapper; the optimizer over the bare model's trainable parameters."""
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = make_optimizer(trainable_parameters(model))
        self.scaler = self.make_scaler()
        return self.model

    @property
    def unwrapped(self) -> nn.Module:
        """The model DDP wraps."""
        return self.model.module

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the loss × the data-parallel size."""
        # The loop divides by the GLOBAL label count, so gradients must be summed over the data-parallel
        # replicas; DDP averages over them.
        super().backward(loss * self.env.dp_size)

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """DDP's no_sync on all but the last micro-step."""
        return contextlib.nullcontext() if last_micro_step else self.model.no_sync()
