"""`model.adapter`: a LoRA/QLoRA run that starts from an adapter trained earlier (an SFT run's final/).

The adapter's weights become the trained adapter's starting point, and a second, frozen copy of them is kept
under its own adapter name (a few MB, no second model): the network the run started from, which a preference
objective compares with (`reference_view`). The adapter's shape comes from the run's config (method.lora),
which must match the directory's; its weights must fit the base model key for key and shape for shape.
Only the trained adapter is checkpointed and written to final/; the frozen copy is reloaded from model.adapter.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config import Config
from launcher.errors import ConfigError
from launcher.run_dir import FINAL_DIR

if TYPE_CHECKING:  # torch-free at import: `ftl validate` checks the directory
    from torch import nn

TRAINED = "default"  # PEFT's name of the adapter get_peft_model attaches: the one that trains
REFERENCE = "reference"  # the frozen copy of model.adapter: the network the run started from
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
BASE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")  # what tells two bases apart
UNBUILT = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save")  # ftl's LoRA has none


def start_problems(cfg: Config) -> list[str]:
    """What is wrong with model.adapter as a LoRA starting point, read from its directory (torch-free)."""
    value = cfg.model.adapter or ""
    path = Path(value).expanduser()
    where = "a LoRA/QLoRA run's OUTPUT_DIR/final or an `ftl export` of it"
    if not path.is_dir():
        return [f"model.adapter: no such directory: {value} (give {where})"]
    if not (path / ADAPTER_CONFIG).is_file():
        hint = f"give {where}"
        if (path / FINAL_DIR / ADAPTER_CONFIG).is_file():
            hint = f"the run's adapter is {path / FINAL_DIR}"
        elif (path / "config.json").is_file():
            hint = "it holds a whole model (full fine-tuning or a merged export): give it as model.path instead"
        return [f"model.adapter: {value} has no {ADAPTER_CONFIG}, it is not a PEFT adapter directory ({hint})"]
    try:
        saved = json.loads((path / ADAPTER_CONFIG).read_text())
    except ValueError as err:
        return [f"model.adapter: {path / ADAPTER_CONFIG} is not valid JSON ({err})"]
    if saved.get("peft_type") != "LORA":
        return [
            f"model.adapter: {value} holds a {saved.get('peft_type')} adapter, not LoRA (method.kind {cfg.method.kind})"
        ]
    p = [] if (path / ADAPTER_WEIGHTS).is_file() else [f"model.adapter: {value} has no {ADAPTER_WEIGHTS}"]
    task = "SEQ_CLS" if cfg.model.task == "sequence_classification" else "CAUSAL_LM"
    if saved.get("task_type") not in (None, task):
        p.append(f"model.adapter: {value} adapts a {saved['task_type']} model, not model.task {cfg.model.task}")
    lora = cfg.method.lora
    for field, key, ours in (("r", "r", lora.r), ("alpha", "lora_alpha", lora.alpha)):
        if key in saved and float(saved[key]) != float(ours):
            p.append(
                f"method.lora.{field}: {ours:g}, but model.adapter {value} was trained with {saved[key]:g}; set "
                f"method.lora.{field}: {saved[key]:g} (a trained adapter keeps its shape and scale)"
            )
    unbuilt = [k for k in UNBUILT if saved.get(k)] + (["bias"] if saved.get("bias", "none") != "none" else [])
    if unbuilt:
        p.append(f"model.adapter: {value} uses {', '.join(unbuilt)}, which ftl's LoRA does not build")
    return p + base_problems(cfg, saved.get("base_model_name_or_path"))


def base_problems(cfg: Config, base: str | None) -> list[str]:
    """The adapter's recorded base model against model.path, when both are local directories."""
    ours, theirs = Path(cfg.model.path).expanduser() / "config.json", Path(base or "").expanduser() / "config.json"
    if not base or not ours.is_file() or not theirs.is_file():
        return []  # a hub id, or a moved base: loading checks every tensor's shape
    a, b = (json.loads(f.read_text()) for f in (ours, theirs))
    differ = [f"{k} {b.get(k)} vs {a.get(k)}" for k in BASE_KEYS if a.get(k) != b.get(k)]
    if not differ:
        return []
    return [
        f"model.adapter: {cfg.model.adapter} was trained on {base}, which is not model.path {cfg.model.path} "
        f"({', '.join(differ)}); start from an adapter of this base model"
    ]


def start_from_adapter(model: nn.Module, cfg: Config) -> nn.Module:
    """Load model.adapter into the trained adapter, and attach a frozen copy of it as REFERENCE (no weights
    are read on the meta device: a sharding strategy's other ranks receive rank 0's)."""
    import copy

    import torch

    settings = copy.deepcopy(model.peft_config[TRAINED])
    settings.inference_mode, settings.lora_dropout = True, 0.0  # the reference computes deterministically
    model.add_adapter(REFERENCE, settings)
    for name, p in model.named_parameters():
        if f".{REFERENCE}." in name:
            p.requires_grad_(False)
            p.data = p.data.float()
    if any(p.device.type == "meta" for p in model.parameters()):
        return model
    weights = read_weights(model, cfg)
    with torch.no_grad():
        for adapter in (TRAINED, REFERENCE):
            set_weights(model, weights, adapter)
    return model


def read_weights(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """model.adapter's tensors, refused (exit 2) unless they are exactly the adapter this run built."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    weights = load_peft_weights(str(Path(cfg.model.adapter).expanduser()), device="cpu")
    expected = get_peft_model_state_dict(model, adapter_name=TRAINED)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [
        f"{k} {tuple(weights[k].shape)}, built {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {len(keys)}, e.g. {keys[0]}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if keys
        )
        raise ConfigError(
            [
                f"model.adapter: {cfg.model.adapter} does not fit model.path {cfg.model.path} with "
                f"method.lora.target_modules {cfg.method.lora.target_modules!r} ({detail}); start from an "
                "adapter trained on this base model with these settings"
            ]
        )
    return weights


def set_weights(model: nn.Module, weights: dict[str, Any], adapter: str) -> None:
    """Copy the tensors into `adapter` (PEFT's renaming), every one of them."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
    if result.unexpected_keys:
        raise RuntimeError(f"model.adapter: {len(result.unexpected_keys)} tensors not loaded into {adapter}")


@contextlib.contextmanager
def reference_adapter_active(model: nn.Module) -> Iterator[None]:
    """The frozen REFERENCE adapter computes in place of the trained one; every requires_grad flag (which
    PEFT's set_adapter rewrites) is restored on exit."""
    trained = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(trained)
        for p, flag in flags:
            p.requires_grad_(flag)


def has_reference_adapter(model: nn.Module) -> bool:
    """Whether `model` holds the frozen copy of the adapter it started from."""
    return REFERENCE in getattr(model, "peft_config", {})
