"""Strategies whose torch optimizer (and fp16 GradScaler) step in the process: single, DDP and FSDP2.

They share everything about a step — scaled backward, unscale, clip, skip a non-finite update, step, zero —
and differ in how the model is wrapped and how a checkpoint is written.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from launcher.config import Config
from launcher.dist import DistEnv
from launcher.methods import trainable_parameters
from launcher.model import build_model
from launcher.optim import drop_inactive_gradients
from launcher.strategies.base import Strategy, param_group_tensors, precision_autocast


class TorchStepsStrategy(Strategy):
    """The step of a plain torch optimizer over the model's own parameters (or their DTensor shards)."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.scaler: torch.amp.GradScaler | None = None

    def build_model(self) -> nn.Module:
        """The whole model on this rank's device."""
        return build_model(self.cfg, self.env.device)

    @property
    def unwrapped(self) -> nn.Module:
        """The model itself (wrapping strategies return what they wrapped)."""
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast for bf16/fp16."""
        return precision_autocast(self.cfg, self.env.device)

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Nothing to skip where nothing syncs."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through the fp16 loss scale when there is one."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, max_grad_norm: float | None) -> float:
        """Unscale, clip, step, zero grads; returns the global grad norm before clipping.

        With train.nonfinite=skip a non-finite norm drops the update (fp16 leaves that to its scaler)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        drop_inactive_gradients(self.optimizer)  # scheduled-frozen groups count in no norm
        params = [p for _, p in trainable_parameters(self.model)]
        norm = self.clip_grad_norm(params, max_grad_norm)
        if self.cfg.train.nonfinite == "skip" and not self.scaler and not math.isfinite(norm):
            self.discard_step()
            return norm
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def discard_step(self) -> None:
        """Zero the gradients; the weights and optimizer state stay as they were."""
        self.optimizer.zero_grad(set_to_none=True)

    def make_scaler(self, scaler_class: type = torch.amp.GradScaler) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (None otherwise), started and grown as train.fp16_* say."""
        t = self.cfg.train
        if t.precision != "fp16":
            return None
        return scaler_class(
            self.env.device.type, init_scale=t.fp16_initial_scale, growth_interval=t.fp16_growth_interval
        )

    def loss_scale(self) -> float | None:
        """The GradScaler's scale; a skipped step halves it."""
        return float(self.scaler.get_scale()) if self.scaler else None

    def clip_grad_norm(self, params: list[nn.Parameter], max_grad_norm: float | None) -> float:
        """The global grad norm (clipped to max_grad_norm when set); sharded strategies reduce over shards."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf")))

    def local_numel(self) -> tuple[int, int]:
        """Elements of the parameters (their local shards) and of the optimizer state on this rank."""
        params = sum(_local(p).numel() for p in self.model.parameters())
        state = sum(
            _local(t).numel()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        return params, state

    def optimizer_tensors(self) -> list[tuple[dict, torch.Tensor]]:
        """The optimizer's own parameters (DTensor shards under FSDP2)."""
        return param_group_tensors(self.optimizer)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard a rank holds for a DTensor, else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
