"""The interface every sharding strategy implements; the training loop only talks to this.

A strategy owns the wrapped model and the optimizer: it builds and wraps the model, runs backward, steps
(with clipping and the grad norm), skips gradient sync between accumulation micro-steps, writes the final
model and its checkpoints' model/optimizer part, so neither the loop nor the checkpoint manager asks which
one it is. Implementations: torch_steps.TorchStepsStrategy (the torch optimizer steps in the process) with
unsharded.UnshardedStrategy (single, DDP) and fsdp.FSDPStrategy beneath it; deepspeed.DeepSpeedStrategy.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from launcher.config import Config
from launcher.dist import DistEnv
from launcher.methods import method_for
from launcher.strategies.traits import traits

OptimizerFactory = Callable[[Iterable[tuple[str, nn.Parameter]]], torch.optim.Optimizer]  # trainable (name, param)


class Strategy(ABC):
    """Build and wrap, forward context, backward, step, checkpoint and final-model hooks."""

    name: str = "base"

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.model: nn.Module | None = None  # as the loop runs it (wrapped)
        self.optimizer: torch.optim.Optimizer | None = None  # the torch optimizer whose param groups set LRs

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Load the model for this strategy (sharded strategies may load on meta / rank 0 only)."""

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        """Wrap the model for this strategy and build its optimizer over the trainable parameters."""

    @property
    @abstractmethod
    def unwrapped(self) -> nn.Module:
        """The model without the strategy's wrapper (PEFT wrappers stay)."""

    @property
    def forward_only_model(self) -> nn.Module:
        """The module to call for a forward that no backward follows (a preference objective's reference pass).

        It is the model without the wrapper (`unwrapped`): a wrapper's forward only prepares backward (DDP's
        reducer and buffer broadcast, the DeepSpeed engine's gradient hooks), while what gathers sharded weights
        lives on the module itself (FSDP2's `fully_shard` hooks on the model and each block, ZeRO-3's parameter
        hooks on engine.module): each block's weights are gathered for its forward and freed after it, as in a
        training forward."""
        return self.unwrapped

    @abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (fp32: none)."""

    @abstractmethod
    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Skip gradient sync on all but the last accumulation micro-step (where it matters)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss` (already normalised over the global batch)."""

    @abstractmethod
    def step(self, max_grad_norm: float | None) -> float:
        """Clip, update, zero gradients; returns the global grad norm before clipping."""

    @abstractmethod
    def discard_step(self) -> None:
        """Drop this step's gradients without updating anything (train.nonfinite=skip)."""

    @abstractmethod
    def loss_scale(self) -> float | None:
        """The fp16 loss scale in use (None without loss scaling)."""

    @abstractmethod
    def local_numel(self) -> tuple[int, int]:
        """(parameter elements held by this rank, optimizer-state elements held by this rank)."""

    @abstractmethod
    def optimizer_tensors(self) -> list[tuple[dict, torch.Tensor]]:
        """(param group, tensor) for every tensor the optimizer steps: the parameters, or their shards."""

    @abstractmethod
    def save_pretrained(self, directory: Path) -> None:
        """Write the final model as the method stores it, from rank 0; every rank calls it."""

    @abstractmethod
    def save_checkpoint(self, directory: Path) -> None:
        """Write model (trainable parameters only: never a frozen base) + optimizer state into `directory`.
        Called on EVERY rank with the same (temporary) directory; each rank writes only its own share. The
        checkpoint manager handles the atomic rename, the completeness marker and the trainer state."""

    @abstractmethod
    def load_checkpoint(self, directory: Path) -> None:
        """Restore what save_checkpoint wrote (possibly by a different world size). Every rank calls it."""

    def optimizer_holds_shards(self) -> bool:
        """Whether each rank's optimizer holds only its share of the trained weights."""
        return "optimizer" in traits(self.name).sharded_state(getattr(self, "stage", 0))

    def checkpointed_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters a checkpoint holds, as the method declares them (the trained ones)."""
        return iter(method_for(self.cfg).checkpoint_parameters(self.unwrapped))


def precision_autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for train.precision bf16/fp16 on `device`; nothing for fp32."""
    precision = cfg.train.precision
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_group_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[dict, torch.Tensor]]:
    """(param group, tensor) for every tensor in the optimizer's param groups."""
    return [(g, p) for g in optimizer.param_groups for p in g["params"]]


def quantized_linears(model: nn.Module) -> int:
    """How many bitsandbytes 4-bit linear layers `model` holds (QLoRA's frozen base; 0 without bitsandbytes)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) if bnb is not None else 0
