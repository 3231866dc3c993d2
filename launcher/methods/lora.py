"""LoRA (PEFT): low-rank adapters beside the target linear layers of a frozen base; they train in fp32."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config import Config
from launcher.errors import ConfigError
from launcher.methods.base import Method, ModelShape
from launcher.methods.lora_start import (
    TRAINED,
    has_reference_adapter,
    reference_adapter_active,
    start_from_adapter,
    start_problems,
)

if TYPE_CHECKING:  # torch-free at import: `ftl estimate` and `ftl validate` ask methods
    from torch import nn

QLORA = "qlora"  # the name of LoRA's quantised subclass (launcher/methods/qlora.py), suggested by `lighter`


def lora_config(cfg: Config) -> Any:
    """PEFT's LoraConfig from method.lora."""
    from peft import LoraConfig, TaskType

    lc = cfg.method.lora
    task = TaskType.SEQ_CLS if cfg.model.task == "sequence_classification" else TaskType.CAUSAL_LM
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        task_type=task,
        bias="none",
    )


def lora_targets(cfg: Config, shape: ModelShape) -> list[tuple[int, int]]:
    """(in, out) of each linear layer of one block that method.lora.target_modules adapts."""
    targets = cfg.method.lora.target_modules
    linears = shape.linears
    if targets == "all-linear":
        return list(linears.values())
    return [io for name, io in linears.items() if any(name.endswith(t) for t in targets)]


class LoRA(Method):
    """Adapters A·B beside the targets; final/ is a PEFT adapter; `--merge` folds them into the base."""

    name = "lora"
    adapters = True
    switches_off = True
    starts_from_adapter = True
    merges = True
    needs_input_grads = True

    def reference_view(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The frozen copy of model.adapter when the run started from one, else PEFT's own switch: the base
        network without the adapter."""
        return reference_adapter_active(model) if has_reference_adapter(model) else model.disable_adapter()

    def attach(self, model: nn.Module, cfg: Config) -> nn.Module:
        """PEFT's LoRA on the targets (seeded), the adapters cast to fp32 whatever the base dtype."""
        import torch
        from peft import get_peft_model

        torch.manual_seed(cfg.train.seed)
        try:
            model = get_peft_model(model, lora_config(cfg))
        except ValueError as err:  # peft: a target module that the model does not have
            raise ConfigError([f"method.lora.target_modules: {err}"]) from None
        if cfg.model.adapter:
            model = start_from_adapter(model, cfg)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # adapters train in fp32 whatever the base dtype
        return model

    def save_final(self, cfg: Config, model: nn.Module, directory: Path, state: dict | None = None) -> None:
        """The trained adapter only, as PEFT stores it (never the frozen copy of model.adapter)."""
        extra = {} if state is None else {"state_dict": state}
        model.save_pretrained(directory, safe_serialization=True, selected_adapters=[TRAINED], **extra)

    def start_problems(self, cfg: Config) -> list[str]:
        """model.adapter: a LoRA adapter directory of this base model, rank and scale."""
        return start_problems(cfg)

    def merge(self, cfg: Config, base: nn.Module, directory: Path) -> nn.Module:
        """PEFT's merge_and_unload on the base the adapter was trained against."""
        return self.load(base, directory).merge_and_unload()

    def added_elements(self, cfg: Config, shape: ModelShape) -> int:
        """r × (in + out) per adapted linear layer."""
        return shape.layers * cfg.method.lora.r * sum(i + o for i, o in lora_targets(cfg, shape))

    def frozen_added_elements(self, cfg: Config, shape: ModelShape) -> int:
        """With model.adapter, a frozen copy of the adapter (the run's starting point)."""
        return self.added_elements(cfg, shape) if cfg.model.adapter else 0

    def activation_elements(self, cfg: Config, shape: ModelShape) -> int:
        """The rank-r intermediate per target, and the dropped-out copy of each adapted input."""
        targets = lora_targets(cfg, shape)
        extra = cfg.method.lora.r * len(targets)
        if cfg.method.lora.dropout > 0:
            extra += sum(i for i, _ in targets)
        return extra

    def lighter(self, cuda: bool) -> list[str]:
        """QLoRA quantises the frozen base (bitsandbytes' 4-bit kernels: CUDA only)."""
        return [QLORA] if cuda else []
