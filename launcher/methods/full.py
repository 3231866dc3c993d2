"""Full fine-tuning: every weight of the pre-trained model trains (less what `method.freeze` names)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from launcher.config import QLoraSettings
from launcher.methods.base import Method
from launcher.methods.lora import LoRA
from launcher.methods.qlora import QLoRA

if TYPE_CHECKING:  # torch-free at import: `ftl estimate` and `ftl validate` ask methods
    from torch import nn


class FullFineTuning(Method):
    """All weights train; final/ is the whole model; nothing to merge."""

    name = "full"
    adapters = False

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        """final/ is a complete Hugging Face model: loaded as the base's class, the base itself unused."""
        return type(base).from_pretrained(directory)

    def lighter(self, cuda: bool) -> list[str]:
        """LoRA trains far fewer elements; QLoRA also quantises the base (CUDA only)."""
        return [LoRA.name, *([QLoRA.name] if cuda else [])]

    def raw_problems(self, raw_method: dict[str, Any]) -> list[str]:
        """QLoRA settings given while method.kind is full are a contradiction worth naming."""
        given = raw_method.get("qlora")
        if not isinstance(given, dict):
            return []
        try:  # a resolved config.yaml carries the defaults: only values that differ are a contradiction
            if QLoraSettings.model_validate(given) == QLoraSettings():
                return []
        except ValidationError:
            pass
        return [f"method.qlora: settings given but method.kind is '{self.name}' (QLoRA trains adapters only)"]
