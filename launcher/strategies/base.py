"""The one small interface every sharding strategy implements; the training loop only talks to this.

A strategy owns the wrapped model and the optimizer: it wraps, runs backward, steps (with clipping and the
grad norm), skips gradient sync between accumulation micro-steps, and hands back a full state dict for
export. Checkpoint save/load hooks live here too, so the checkpoint manager never asks which one it is.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from launcher.config import Config
from launcher.dist import DistEnv
from launcher.methods import save_trained_model, trainable_parameters
from launcher.model import build_model
from launcher.optim import drop_inactive_gradients
from launcher.strategies.traits import traits

OptimizerFactory = Callable[[Iterable[tuple[str, nn.Parameter]]], torch.optim.Optimizer]  # trainable (name, param)


class Strategy(ABC):
    """Wrap, backward, step, no-sync, state hooks, full-state gather."""

    name: str = "base"

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None

    def build_model(self) -> nn.Module:
        """Load the model for this strategy (sharded strategies may load on meta / rank 0 only)."""
        return build_model(self.cfg, self.env.device)

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        """Wrap the model for this strategy and build its optimizer over the trainable parameters."""

    @property
    def unwrapped(self) -> nn.Module:
        """The model without the strategy's wrapper (PEFT wrappers stay)."""
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (fp32: none)."""
        precision = self.cfg.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.env.device.type, dtype=dtype)

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Skip gradient sync on all but the last accumulation micro-step (where it matters)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
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
        """Drop this step's gradients without updating anything (train.nonfinite=skip)."""
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
        """The fp16 loss scale in use (None without loss scaling); a skipped step halves it."""
        return float(self.scaler.get_scale()) if self.scaler else None

    def clip_grad_norm(self, params: list[nn.Parameter], max_grad_norm: float | None) -> float:
        """The global grad norm (clipped to max_grad_norm when set); sharded strategies reduce over shards."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf")))

    def local_numel(self) -> tuple[int, int]:
        """(parameter elements held by this rank, optimizer-state elements held by this rank)."""
        params = sum(_local(p).numel() for p in self.model.parameters())
        state = sum(
            _local(t).numel()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
        return params, state

    def save_pretrained(self, directory: Path) -> None:
        """Write the final model (PEFT: the adapter only) as a Hugging Face directory, from rank 0."""
        if self.env.is_main:
            save_trained_model(self.cfg, self.unwrapped, directory)

    def save_checkpoint(self, directory: Path) -> None:
        """Write model (trainable parameters only: never a frozen base) + optimizer state into `directory`.

        Called on EVERY rank with the same (temporary) directory; each rank writes only its own shard. This
        default is for unsharded strategies (single, DDP): rank 0 writes trainable weights as safetensors and
        the optimizer / grad-scaler state with torch.save (tensors and numbers only). Sharded strategies
        override it. The checkpoint manager handles atomic rename, the completeness marker and trainer state.
        """
        if not self.env.is_main:
            return
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().contiguous().cpu() for n, p in self.iter_trainable()}
        save_file(weights, directory / "trainable.safetensors")
        extra = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {}}
        torch.save(extra, directory / "optimizer.pt")

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what save_checkpoint wrote (possibly by a different world size). Every rank calls it."""
        from safetensors.torch import load_file

        weights = load_file(directory / "trainable.safetensors")
        params = dict(self.iter_trainable())
        missing = set(params) - set(weights)
        if missing:
            raise RuntimeError(f"checkpoint {directory} lacks trainable parameters: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        extra = torch.load(directory / "optimizer.pt", weights_only=True, map_location=self.env.device)
        self.optimizer.load_state_dict(extra["optimizer"])
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])

    def optimizer_tensors(self) -> list[tuple[dict, torch.Tensor]]:
        """(param group, tensor) for every tensor the optimizer steps: the parameters, or their shards."""
        return [(g, p) for g in self.optimizer.param_groups for p in g["params"]]

    def optimizer_holds_shards(self) -> bool:
        """Whether each rank's optimizer holds only its share of the trained weights."""
        return "optimizer" in traits(self.name).sharded_state(getattr(self, "stage", 0))

    def iter_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(trainable_parameters(self.unwrapped))


def quantized_linears(model: nn.Module) -> int:
    """How many bitsandbytes 4-bit linear layers `model` holds (QLoRA's frozen base; 0 without bitsandbytes)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) if bnb is not None else 0


def read_checkpoint_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors an unsharded strategy (single, DDP) saved, read offline."""
    from safetensors.torch import load_file

    return load_file(model_dir / "trainable.safetensors")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard a rank holds for a DTensor, else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
