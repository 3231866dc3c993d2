"""Strategies that hold the whole model on every rank (single process, DDP): their final model and checkpoints.

Rank 0 writes; the trained weights go to safetensors and the optimizer / grad-scaler state (tensors and numbers
only) through torch.save, which loads back with weights_only=True.
"""

from __future__ import annotations

from pathlib import Path

import torch

from launcher.methods import method_for
from launcher.strategies.torch_steps import TorchStepsStrategy

WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


class UnshardedStrategy(TorchStepsStrategy):
    """Every rank holds the whole model; rank 0 writes what is saved."""

    def save_pretrained(self, directory: Path) -> None:
        """Rank 0 writes the final model as the method stores it (PEFT: the adapter only)."""
        if self.env.is_main:
            method_for(self.cfg).save_final(self.cfg, self.unwrapped, directory)

    def save_checkpoint(self, directory: Path) -> None:
        """Rank 0 writes the trainable weights (safetensors) and the optimizer / scaler state."""
        if not self.env.is_main:
            return
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().contiguous().cpu() for n, p in self.checkpointed_parameters()}
        save_file(weights, directory / WEIGHTS_FILE)
        extra = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {}}
        torch.save(extra, directory / OPTIMIZER_FILE)

    def load_checkpoint(self, directory: Path) -> None:
        """Every rank reads the weights and the optimizer state (any world size saved them)."""
        from safetensors.torch import load_file

        weights = load_file(directory / WEIGHTS_FILE)
        params = dict(self.checkpointed_parameters())
        missing = set(params) - set(weights)
        if missing:
            raise RuntimeError(f"checkpoint {directory} lacks trainable parameters: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name].to(p.device, p.dtype))
        extra = torch.load(directory / OPTIMIZER_FILE, weights_only=True, map_location=self.env.device)
        self.optimizer.load_state_dict(extra["optimizer"])
        if self.scaler and extra["scaler"]:
            self.scaler.load_state_dict(extra["scaler"])


def read_checkpoint_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable tensors an unsharded strategy (single, DDP) saved, read offline."""
    from safetensors.torch import load_file

    return load_file(model_dir / WEIGHTS_FILE)
