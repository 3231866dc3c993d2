"""Facts about a model's parameters that hold however they are stored: how many elements one stands for
(4-bit, ZeRO-3 partitioned), and what its name says (a new head, a method's added tensor). Torch-free."""

from __future__ import annotations

import math
from typing import Any


def param_numel(p: Any) -> int:
    """Elements a parameter stands for: 4-bit weights count their unpacked shape; ZeRO-3 partitions
    parameters (numel() is 0 there), ds_numel is the full size."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:
        return int(math.prod(quant_state.shape))
    return int(getattr(p, "ds_numel", p.numel()))


def is_new_head(name: str) -> bool:
    """A sequence-classification head is new (not pre-trained): it trains whatever the method."""
    return name.startswith(("score.", "classifier."))


def is_adapter(name: str) -> bool:
    """A tensor a method added to the pre-trained model (LoRA, bottleneck adapters)."""
    return "lora_" in name or "_adapter." in name or "prompt_encoder." in name
