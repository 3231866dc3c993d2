"""QLoRA: LoRA on a base whose linear weights bitsandbytes stores in 4 bits.

Under sharding the 4-bit weights are stored in a float dtype (the strategies' quant_storage) so FSDP and
ZeRO-3 can shard them; bitsandbytes quantises while loading, which has no meta-device path, so every rank
loads the (small) 4-bit model. `ftl export --merge` folds the adapter into the *dequantised* base (the weights
the adapter was trained against), in the QLoRA compute dtype, so the merged model reproduces the trained one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config import Config
from launcher.methods.base import DTYPE_BYTES
from launcher.methods.lora import QLORA, LoRA

if TYPE_CHECKING:  # torch-free at import: `ftl estimate` and `ftl validate` ask methods
    from torch import nn


def dequantize_4bit(model: nn.Module, dtype: Any) -> nn.Module:
    """Replace every bitsandbytes Linear4bit by a plain nn.Linear holding its dequantised weight."""
    import bitsandbytes as bnb
    from torch import nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, dtype=dtype)
            linear.weight.data.copy_(weight.to(dtype))
            if child.bias is not None:
                linear.bias.data.copy_(child.bias.data.to(dtype))
            setattr(parent, name, linear)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return nn.Module.to(model, dtype)  # transformers refuses .to(dtype) on a (formerly) bnb model


class QLoRA(LoRA):
    """LoRA on a 4-bit base; the base stays where bitsandbytes loaded it."""

    name = QLORA
    quantizes_base = True
    needs_input_grads = False  # prepare_model_for_kbit_training sets up checkpointing and the grad path

    def prepare_base(self, model: nn.Module, cfg: Config) -> tuple[nn.Module, bool]:
        """PEFT's k-bit preparation, which also turns gradient checkpointing on when the run asks for it."""
        from peft import prepare_model_for_kbit_training

        gc = cfg.train.gradient_checkpointing is True  # `auto` is resolved before training (run_start); export: off
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        return model, True

    def place(self, model: nn.Module, device: Any) -> nn.Module:
        """4-bit weights are loaded onto the device (device_map) and cannot be moved by .to()."""
        return model

    def merge(self, cfg: Config, base: nn.Module, directory: Path) -> nn.Module:
        """Dequantise the 4-bit base in the compute dtype, then fold the adapter in."""
        import torch

        return super().merge(cfg, dequantize_4bit(base, getattr(torch, cfg.method.qlora.compute_dtype)), directory)

    def weight_bytes(self, cfg: Config, linear: int, other: int) -> float:
        """Linear weights in 4 bits + one fp32 absmax per 64 (a byte with double quantisation); the rest in
        the compute dtype."""
        q = cfg.method.qlora
        per = 0.5 + (1 / 64 if q.double_quant else 4 / 64)
        return linear * per + other * DTYPE_BYTES[q.compute_dtype]

    def block_bytes(self, cfg: Config, block: int) -> float:
        """Half a byte per element."""
        return block * 0.5

    def lighter(self, cuda: bool) -> list[str]:
        """Nothing lighter."""
        return []
