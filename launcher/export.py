"""`ftl export`: a run's final model as a Hugging Face directory, adapters optionally merged.

QLoRA merges fold the adapter into the *dequantised* 4-bit base (the weights the adapter was trained
against), in the QLoRA compute dtype, so the merged model reproduces the trained one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from launcher.config import Config, ConfigError, load_config
from launcher.metrics import log
from launcher.model import DTYPES, load_base_model, load_tokenizer


def dequantize_4bit(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every bitsandbytes Linear4bit by a plain nn.Linear holding its dequantised weight."""
    import bitsandbytes as bnb

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
    return model.to(dtype)


def merged_model(cfg: Config, adapter_dir: Path) -> nn.Module:
    """Base model with the adapter folded in (QLoRA: dequantised base in the compute dtype)."""
    from peft import PeftModel

    qlora = cfg.method.kind == "qlora"
    base = load_base_model(cfg, quantize=qlora, device=torch.device("cpu"))
    if qlora:
        base = dequantize_4bit(base, DTYPES[cfg.method.qlora.compute_dtype])
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def export_run(run_dir: str, out: str, merge: bool = False, source: Path | None = None) -> Path:
    """Write the run's final model (or `source`, a consolidated checkpoint directory) to `out`."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError([f"run_dir: {run} has no config.yaml (is it an ftl output_dir?)"])
    cfg = load_config(run / "config.yaml")
    src = source or run / "final"
    if not src.is_dir():
        raise ConfigError([f"run_dir: {src} does not exist (the run has not finished; export a checkpoint)"])
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError([f"--out: {dest} exists and is not empty; choose a new directory"])
    adapters = cfg.method.kind in ("lora", "qlora")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapters and merge:
        merged_model(cfg, src).save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(cfg).save_pretrained(tmp)
    else:
        if merge:
            log("--merge: this run trained all weights (method.kind=full); nothing to merge")
        shutil.copytree(src, tmp)
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)
    log(f"exported {'merged model' if adapters and merge else src.name} to {dest}")
    return dest
