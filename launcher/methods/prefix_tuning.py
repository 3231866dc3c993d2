"""Prefix tuning (PEFT): trained key and value prefixes for every layer, fed as past key values."""

from __future__ import annotations

from typing import Any

from launcher.config import Config
from launcher.methods.base import ModelShape
from launcher.methods.prompt_tuning import VirtualTokens, peft_task


class PrefixTuning(VirtualTokens):
    """num_virtual_tokens key and value vectors per layer; causal LMs only."""

    name = "prefix_tuning"

    def peft_config(self, cfg: Config) -> Any:
        """PEFT's PrefixTuningConfig from method.prefix_tuning."""
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type=peft_task(cfg), num_virtual_tokens=cfg.method.prefix_tuning.num_virtual_tokens
        )

    def added_elements(self, cfg: Config, shape: ModelShape) -> int:
        """A key and a value prefix per layer."""
        return cfg.method.prefix_tuning.num_virtual_tokens * shape.hidden * 2 * shape.layers

    def problems(self, cfg: Config) -> list[str]:
        """Past key values are a causal-LM input."""
        p = super().problems(cfg)
        if cfg.model.task != "causal_lm":
            p.append(
                f"method.kind: {self.name} feeds past key values, which sequence-classification encoders do not "
                "take; use prompt_tuning (or adapter) with model.task: sequence_classification"
            )
        return p
