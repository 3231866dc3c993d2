"""`ftl export`: a run's final model as a Hugging Face directory, adapters optionally merged (each method
says how: launcher/methods/)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from launcher.config import Config
from launcher.config_loading import load_config
from launcher.errors import ConfigError
from launcher.methods import method_for, trainable_parameters
from launcher.metrics import log
from launcher.model import build_model, load_base_model, load_tokenizer
from launcher.run_dir import CHECKPOINT_MODEL_DIR, CONFIG_FILE, MARKER, RunDir, is_complete, read_train_state
from launcher.strategies.traits import traits


def merged_model(cfg: Config, adapter_dir: Path) -> nn.Module:
    """Base model with the adapter folded in (QLoRA: dequantised base in the compute dtype)."""
    method = method_for(cfg)
    base = load_base_model(cfg, quantize=method.quantizes_base, device=torch.device("cpu"))
    return method.merge(cfg, base, adapter_dir)


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a complete checkpoint of any strategy, consolidated on CPU."""
    strategy = read_train_state(ckpt)["strategy"]
    return traits(strategy).read_weights(ckpt / CHECKPOINT_MODEL_DIR)


def checkpoint_to_hf(cfg: Config, ckpt: Path, out: Path) -> Path:
    """Rebuild the model, load a checkpoint's trained tensors into it, and save it like `final/`."""
    if not is_complete(ckpt):
        raise ConfigError([f"--checkpoint: {ckpt} is not a complete checkpoint (no {MARKER} marker)"])
    weights = checkpoint_weights(ckpt)
    model = build_model(cfg, torch.device("cpu"))
    trainable = dict(trainable_parameters(model))
    missing = [n for n in trainable if n not in weights]
    if missing:
        raise ConfigError([f"--checkpoint: {ckpt} lacks {len(missing)} trained tensors, e.g. {missing[0]}"])
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name].to(p.dtype))
    method_for(cfg).save_final(cfg, model, out)
    load_tokenizer(cfg).save_pretrained(out)
    return out


def export_run(run_dir: str, out: str, merge: bool = False, checkpoint: str | None = None) -> Path:
    """Write the run's final model (or a checkpoint, consolidated offline) to `out`."""
    saved = RunDir(Path(run_dir)).config_file
    if not saved.is_file():
        raise ConfigError([f"run_dir: {run_dir} has no {CONFIG_FILE} (is it an ftl output_dir?)"])
    cfg = load_config(saved)
    run = RunDir.of(run_dir, cfg.checkpoint.dir)  # the directory as given, wherever the run was started from
    if checkpoint:
        ckpt = Path(checkpoint) if Path(checkpoint).is_dir() else run.checkpoint_root / checkpoint
        with tempfile.TemporaryDirectory() as tmp:
            source = checkpoint_to_hf(cfg, ckpt, Path(tmp) / "model")
            return _write_export(cfg, source, Path(out), merge)
    return _write_export(cfg, run.final_dir, Path(out), merge)


def _write_export(cfg: Config, src: Path, dest: Path, merge: bool) -> Path:
    if not src.is_dir():
        raise ConfigError([f"run_dir: {src} does not exist (the run has not finished; export a checkpoint)"])
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError([f"--out: {dest} exists and is not empty; choose a new directory"])
    method = method_for(cfg)
    refusal = method.merge_refusal() if merge else None
    if refusal:
        raise ConfigError([refusal])
    adapters = method.merges
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if method.exports_with_base:
        load_base_model(cfg, quantize=False, device=torch.device("cpu")).save_pretrained(tmp, safe_serialization=True)
        for f in src.iterdir():  # the adapters, their settings and the tokenizer beside the base weights
            if f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
    elif adapters and merge:
        merged_model(cfg, src).save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(cfg).save_pretrained(tmp)
    else:
        if merge:
            log(f"--merge: this run trained all weights (method {method.name}); nothing to merge")
        shutil.copytree(src, tmp)
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)
    log(f"exported {'merged model' if adapters and merge else src.name} to {dest}")
    return dest
