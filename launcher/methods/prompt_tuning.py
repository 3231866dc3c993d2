"""Prompt tuning (PEFT): trained virtual-token embeddings prepended to every row of a frozen model."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config import Config
from launcher.methods.base import Method, ModelShape

if TYPE_CHECKING:  # torch-free at import: `ftl estimate` and `ftl validate` ask methods
    from torch import nn


def peft_task(cfg: Config) -> str:
    """PEFT's task type for the configured model task."""
    return "SEQ_CLS" if cfg.model.task == "sequence_classification" else "CAUSAL_LM"


class VirtualTokens(Method):
    """What prompt and prefix tuning share: PEFT's prompt learning, which widens a 2D attention mask for the
    virtual tokens (no packing: it cannot follow a block-diagonal 4D mask), and nothing to merge."""

    adapters = True
    switches_off = True
    concatenates = False

    def peft_config(self, cfg: Config) -> Any:
        """PEFT's config for this method's settings."""
        raise NotImplementedError

    def reference_view(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """PEFT's own switch: the base network without the virtual tokens."""
        return model.disable_adapter()

    def attach(self, model: nn.Module, cfg: Config) -> nn.Module:
        """PEFT's prompt-learning model (seeded)."""
        import torch
        from peft import get_peft_model

        torch.manual_seed(cfg.train.seed)
        return get_peft_model(model, self.peft_config(cfg))

    def save_final(self, cfg: Config, model: nn.Module, directory: Path, state: dict | None = None) -> None:
        """PEFT's own save, or from gathered tensors PEFT's layout: its save runs the prompt encoder, whose
        weight is a shard under FSDP or ZeRO-3."""
        if state is None:
            super().save_final(cfg, model, directory)
            return
        save_virtual_tokens(model, directory, state)

    def merge_refusal(self) -> str | None:
        """Virtual tokens are inputs, not weights."""
        return f"--merge: {self.name} trains virtual tokens, there is nothing to fold into weights"


def save_virtual_tokens(model: nn.Module, directory: Path, state: dict) -> None:
    """PEFT's prompt-learning adapter (`prompt_embeddings` + adapter_config.json) from gathered tensors."""
    import copy

    from safetensors.torch import save_file

    config = model.peft_config["default"]
    weight = next(v for k, v in state.items() if k.endswith("prompt_encoder.default.embedding.weight"))
    is_prefix = config.peft_type.value == "PREFIX_TUNING"
    rows = config.num_virtual_tokens * (1 if is_prefix else config.num_transformer_submodules)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": weight[:rows].contiguous()}, str(directory / "adapter_model.safetensors"))
    saved = copy.deepcopy(config)
    saved.inference_mode = True  # as PEFT saves it: loading makes it trainable again only when asked
    saved.save_pretrained(str(directory))


class PromptTuning(VirtualTokens):
    """Trained embeddings of num_virtual_tokens tokens, prepended to the input (optionally from a text)."""

    name = "prompt_tuning"

    def peft_config(self, cfg: Config) -> Any:
        """PEFT's PromptTuningConfig from method.prompt_tuning (random, or initialised from init_text)."""
        from peft import PromptTuningConfig, PromptTuningInit

        s = cfg.method.prompt_tuning
        text: dict[str, Any] = {"prompt_tuning_init": PromptTuningInit.RANDOM}
        if s.init_text:
            tokenizer = cfg.model.tokenizer or cfg.model.path
            text = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": s.init_text}
            text["tokenizer_name_or_path"] = tokenizer
        return PromptTuningConfig(task_type=peft_task(cfg), num_virtual_tokens=s.num_virtual_tokens, **text)

    def added_elements(self, cfg: Config, shape: ModelShape) -> int:
        """One embedding per virtual token."""
        return cfg.method.prompt_tuning.num_virtual_tokens * shape.hidden
