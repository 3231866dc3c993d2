"""What each strategy is, declared once: its checkpoint family and format, whether loading that format
unpickles, how its weights are read offline, and what it cannot do without CUDA. config.py, checkpoint.py
export.py and estimate.py ask here instead of matching strategy names. Torch-free, so `ftl validate` stays fast."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StrategyTraits:
    """A strategy family's declaration."""

    family: str  # checkpoints load across the strategies of one family (any world size)
    format: str  # what its checkpoint's model/ directory holds
    unpickles: bool  # loading the format runs pickle: only from the run's own checkpoint directory
    fp16_needs_cuda: bool  # its fp16 loss scaling exists only on CUDA
    skips_steps: bool  # a step's update can be dropped (train.nonfinite: skip)
    fp32_master_copy: bool  # its checkpoints also hold an fp32 copy of the trained weights
    weights_reader: str  # module whose `read_checkpoint_weights(model_dir)` consolidates weights offline
    # what is split across ranks ("weights", "gradients", "optimizer"), by ZeRO stage (one entry: no stages)
    sharded: tuple[tuple[str, ...], ...] = ((),)
    gradient_copies: int = 1  # DDP's gradient buckets hold a second copy
    replicated: bool = False  # every rank holds the whole model and optimizer as a plain torch module
    whole_model_on_rank0: bool = False  # rank 0 loads every weight into host memory before sharding
    frees_gradients: bool = True  # gradients are freed after each step (not kept in persistent buffers)
    flat_optimizer_step: bool = False  # the optimizer steps one flat tensor per rank (its temporaries are that big)

    def sharded_state(self, stage: int) -> tuple[str, ...]:
        """What this strategy splits across ranks at this ZeRO stage (ignored where there are no stages)."""
        return self.sharded[min(stage, len(self.sharded) - 1)]

    def read_weights(self, model_dir: Path) -> dict[str, Any]:
        """The trained tensors of a checkpoint's model/ directory, consolidated on CPU in one process."""
        return importlib.import_module(self.weights_reader).read_checkpoint_weights(model_dir)


_TORCH = StrategyTraits(
    family="torch",
    replicated=True,
    format="safetensors + torch optimizer state",
    unpickles=False,
    fp16_needs_cuda=False,
    skips_steps=True,
    fp32_master_copy=False,
    weights_reader="launcher.strategies.unsharded",
)
TRAITS = {
    "single": _TORCH,
    "ddp": replace(_TORCH, gradient_copies=2, frees_gradients=False),
    "fsdp": StrategyTraits(
        family="fsdp",
        format="FSDP (torch.distributed.checkpoint)",
        unpickles=True,
        fp16_needs_cuda=False,
        skips_steps=True,
        fp32_master_copy=False,
        weights_reader="launcher.strategies.fsdp",
        sharded=(("weights", "gradients", "optimizer"),),
        whole_model_on_rank0=True,
    ),
    "deepspeed": StrategyTraits(
        family="deepspeed",
        format="DeepSpeed",
        unpickles=True,
        fp16_needs_cuda=True,
        skips_steps=False,
        fp32_master_copy=True,
        weights_reader="launcher.strategies.deepspeed",
        frees_gradients=False,
        flat_optimizer_step=True,
        sharded=((), ("optimizer",), ("optimizer", "gradients"), ("optimizer", "gradients", "weights")),
    ),
}


def replicated_strategies() -> list[str]:
    """The strategies that keep the whole model on every rank, for messages."""
    return [name for name, declared in TRAITS.items() if declared.replicated]


def traits(strategy: str) -> StrategyTraits | None:
    """The declaration of a resolved strategy name; None for 'auto' (not resolved yet)."""
    return TRAITS.get(strategy)
