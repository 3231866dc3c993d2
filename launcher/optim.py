"""Optimizers over param groups, and the learning-rate schedule (warmup + decay, or ULMFiT's STLR).

Param groups are built here for every strategy: one group per depth (embeddings, each block, head) when
`train.layer_lr_decay` < 1, else one group. Each group carries `lr_scale`; `set_lr` applies
peak LR × schedule × lr_scale, so the groups' LRs always equal the formula, whatever wraps the optimizer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from launcher.config import TrainConfig
from launcher.methods import block_of, num_layers
from launcher.params import is_adapter, is_new_head


def param_groups(t: TrainConfig, named: Iterable[tuple[str, nn.Parameter]], layers: int) -> list[dict]:
    """Groups by depth, bottom to top, each with `lr_scale` = layer_lr_decay^(L-1-l) (head: 1). Added tensors
    (adapters: they train from the start under gradual unfreezing) and a new head (not pre-trained: no L2-SP
    anchor) get groups of their own. `l2sp` marks the groups of trained pre-trained weights."""
    named = list(named)
    gradual = bool(t.gradual_unfreeze.every_steps or t.gradual_unfreeze.every_epochs)
    if t.layer_lr_decay == 1.0 and not gradual and not t.l2sp.weight:
        return [{"params": [p for _, p in named], "lr_scale": 1.0, "label": "all", "depth": layers, "layers": layers}]
    by_key: dict[tuple[int, str], list[nn.Parameter]] = {}
    for name, p in named:
        kind = "/adapter" if is_adapter(name) else "/new" if is_new_head(name) else ""
        by_key.setdefault((block_of(name, layers), kind), []).append(p)
    return [
        {
            "params": ps,
            "lr_scale": t.layer_lr_decay ** max(0, layers - 1 - depth),
            "label": depth_label(depth, layers) + kind,
            "depth": layers if kind else depth,  # added or new tensors are never scheduled-frozen
            "layers": layers,
            "l2sp": not kind,
        }
        for (depth, kind), ps in sorted(by_key.items())
    ]


def optimizer_factory(t: TrainConfig, model: nn.Module) -> Callable[[Iterable[tuple[str, nn.Parameter]]], Any]:
    """What a strategy calls with the trainable (name, parameter) pairs it holds (after wrapping/sharding)."""
    return functools.partial(build_optimizer, t, num_layers(model))


def build_optimizer(t: TrainConfig, layers: int, named: Iterable[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """AdamW, bitsandbytes 8-bit AdamW, or SGD with momentum over the trainable (name, parameter) pairs."""
    groups = param_groups(t, named, layers)
    for g in groups:
        g["lr"], g["active"] = t.lr * g["lr_scale"], True
    if t.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, lr=t.lr, weight_decay=t.weight_decay)
    elif t.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, foreach=False)
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: drop_inactive_gradients(opt))
    return optimizer


def drop_inactive_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Scheduled-frozen groups (gradual unfreezing) step with no gradient at all: torch's and bitsandbytes'
    optimizers then skip the parameter entirely — no update, no weight decay, and no Adam moment builds up,
    so a block starts from fresh moments when it thaws. Zero LR alone would still feed its moments. It runs
    as the optimizer's step pre-hook (so also where DeepSpeed steps its flat fp32 partitions), and before the
    clip norm is taken (strategies call it), so the norm counts only what trains."""
    for group in optimizer.param_groups:
        if not group.get("active", True):
            for p in group["params"]:
                p.grad = None


def zero_inactive_gradients_in_backward(optimizer: torch.optim.Optimizer) -> None:
    """For engines that reduce and clip gradients themselves (DeepSpeed): a scheduled-frozen parameter's
    gradient is zero from backward on, so the engine's norm counts only what trains. Call before the engine
    takes the optimizer (its groups still hold the model's parameters; the group dicts stay the engine's)."""
    for group in optimizer.param_groups:
        if group.get("depth", 0) < group.get("layers", 0):  # a group gradual unfreezing can hold frozen
            for p in group["params"]:
                p.register_hook(lambda grad, g=group: grad if g.get("active", True) else torch.zeros_like(grad))


def lr_factor(step: int, t: TrainConfig, total_steps: int) -> float:
    """Multiplier on the peak LR at `step` (0-based): linear warmup, then cosine / linear / constant; or STLR."""
    if t.schedule == "stlr":
        return stlr_factor(step, total_steps, t.stlr.cut_frac, t.stlr.ratio)
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    if t.schedule == "constant":
        return 1.0
    span = max(1, total_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def stlr_factor(step: int, total_steps: int, cut_frac: float, ratio: float) -> float:
    """Slanted triangular LR (Howard & Ruder 2018, eq. 3): a short linear rise over cut_frac of the steps,
    a long linear fall; `ratio` is how much smaller the lowest LR is than the peak."""
    cut = max(1, math.floor(total_steps * cut_frac))
    p = step / cut if step < cut else 1 - (step - cut) / (cut * (1 / cut_frac - 1))
    return (1 + max(p, 0.0) * (ratio - 1)) / ratio


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int = 0, unfreeze_every: int = 0) -> None:
    """Every group's LR: `lr` (peak × schedule) × its lr_scale, or 0 while gradual unfreezing (one block
    more from the top every `unfreeze_every` steps; a pure function of the step) still holds it frozen."""
    for group in optimizer.param_groups:
        thawed = step // unfreeze_every if unfreeze_every else None
        layers = group.get("layers", 0)
        group["active"] = thawed is None or group.get("depth", layers) >= layers - thawed
        group["lr"] = lr * group.get("lr_scale", 1.0) * group["active"]


def unfreeze_period(t: TrainConfig, steps_per_epoch: int) -> int:
    """Steps between two thaws of gradual unfreezing (0: off)."""
    g = t.gradual_unfreeze
    return g.every_steps or (max(1, round(g.every_epochs * steps_per_epoch)) if g.every_epochs else 0)


def depth_label(depth: int, layers: int) -> str:
    return "emb" if depth == -1 else "head" if depth >= layers else str(depth)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The LR of each group as the optimizer holds it, keyed emb / 0..L-1 / head (or all)."""
    return {str(g.get("label", i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
