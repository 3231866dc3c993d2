"""Bottleneck adapters (ftl's own, launcher/methods/bottleneck.py) as a method: added layers train, final/
holds them with the settings that rebuild them; they add layers, so nothing merges."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config import Config
from launcher.methods.base import Method, ModelShape

if TYPE_CHECKING:  # torch-free at import: `ftl estimate` and `ftl validate` ask methods
    from torch import nn


class BottleneckAdapters(Method):
    """Down → nonlinearity → up + residual after attention and/or feed-forward, in every block."""

    name = "adapter"
    adapters = True
    needs_input_grads = True
    exports_with_base = True

    def attach(self, model: nn.Module, cfg: Config) -> nn.Module:
        """Insert the adapters (seeded) and train only them, configured norms and a new head."""
        import torch

        from launcher.methods.bottleneck import attach_adapters  # defines nn.Modules: torch, kept off estimate

        torch.manual_seed(cfg.train.seed)
        return attach_adapters(model, cfg.method.adapter)

    def save_final(self, cfg: Config, model: nn.Module, directory: Path, state: dict | None = None) -> None:
        """The trained tensors and the settings that rebuild the adapters onto the base model."""
        from launcher.methods.bottleneck import adapter_state, save_adapter  # torch, kept off estimate

        save_adapter(model, directory, cfg.method.adapter, state if state is not None else adapter_state(model))

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        """The adapters saved in `directory`, attached to the base and loaded."""
        from launcher.methods.bottleneck import load_adapter  # torch, kept off estimate

        return load_adapter(base, directory)

    def merge_refusal(self) -> str | None:
        """Adapters are layers of their own."""
        return (
            "--merge: bottleneck adapters add layers, they cannot be folded into the base weights; "
            "export without --merge writes the base model and the adapters together "
            "(reload: launcher.methods.bottleneck.load_adapter)"
        )

    def added_elements(self, cfg: Config, shape: ModelShape) -> int:
        """Down + up with biases, one (pfeiffer) or two (houlsby) sites per block."""
        a = cfg.method.adapter
        sites = 1 if a.placement == "pfeiffer" else 2
        return shape.layers * sites * (2 * shape.hidden * a.size + a.size + shape.hidden)
