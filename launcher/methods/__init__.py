"""Fine-tuning methods, one module each, behind one interface (`launcher.methods.base.Method`).

`method_for` is the only place a method name maps to its implementation; nothing outside this package
compares method names. Torch-free at import (`ftl estimate`, `ftl validate`).
"""

from __future__ import annotations

from typing import Any

from launcher.config import Config
from launcher.methods.adapter import BottleneckAdapters
from launcher.methods.base import Method
from launcher.methods.freezing import block_of, freeze, num_layers, trainable_by_block, trainable_parameters
from launcher.methods.full import FullFineTuning
from launcher.methods.lora import LoRA
from launcher.methods.prefix_tuning import PrefixTuning
from launcher.methods.prompt_tuning import PromptTuning
from launcher.methods.qlora import QLoRA

__all__ = [
    "Method",
    "block_of",
    "freeze",
    "method_for",
    "num_layers",
    "raw_method_problems",
    "trainable_by_block",
    "trainable_parameters",
]

METHODS: dict[str, Method] = {
    m.name: m for m in (FullFineTuning(), LoRA(), QLoRA(), BottleneckAdapters(), PromptTuning(), PrefixTuning())
}


def method_for(cfg_or_kind: Config | str) -> Method:
    """The method a config's method.kind (or a method name) names."""
    kind = cfg_or_kind if isinstance(cfg_or_kind, str) else cfg_or_kind.method.kind
    return METHODS[kind]


def raw_method_problems(raw_method: dict[str, Any]) -> list[str]:
    """What the named method refuses in the `method` section as written (an unknown kind: validation's job)."""
    kind = raw_method.get("kind")
    return METHODS[kind].raw_problems(raw_method) if kind in METHODS else []
