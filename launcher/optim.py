"""Optimizers and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from launcher.config import TrainConfig


def build_optimizer(t: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, bitsandbytes 8-bit AdamW, or SGD with momentum over `params`."""
    params = list(params)
    if t.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, foreach=False)


def lr_factor(step: int, t: TrainConfig, total_steps: int) -> float:
    """Multiplier on the peak LR at `step` (0-based): linear warmup, then cosine / linear / constant."""
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.schedule == "constant":
        return 1.0
    span = max(1, total_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
