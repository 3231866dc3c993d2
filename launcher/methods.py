"""What a fine-tuning method trains, and where each parameter sits in the model's depth.

One owner for "which parameters train": the method (full / LoRA / QLoRA) sets requires_grad when it is
attached, `freeze` then freezes what `method.freeze` names, and everything after — the optimizer's param
groups, the strategies, checkpoints, export — asks `trainable_parameters` or `method_traits` instead of
re-deriving it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from launcher.config import Config
from launcher.errors import ConfigError
from launcher.params import param_numel

if TYPE_CHECKING:  # torch-free at import: `ftl estimate` asks method_traits without loading torch
    from torch import nn


@dataclass(frozen=True)
class MethodTraits:
    """What a method declares about itself."""

    name: str
    adapters: bool  # trains added tensors on a frozen base: checkpoints and final/ hold only those
    merges: bool  # `ftl export --merge` can fold the added tensors into the base weights
    concatenates: bool = True  # rows may share a sequence (packing, padding-free): it keeps 4D masks intact


METHODS = {
    "full": MethodTraits("full", adapters=False, merges=False),
    "lora": MethodTraits("lora", adapters=True, merges=True),
    "qlora": MethodTraits("qlora", adapters=True, merges=True),
    "adapter": MethodTraits("adapter", adapters=True, merges=False),
    # PEFT prepends virtual tokens / key-value prefixes and widens a 2D attention mask to match
    "prompt_tuning": MethodTraits("prompt_tuning", adapters=True, merges=False, concatenates=False),
    "prefix_tuning": MethodTraits("prefix_tuning", adapters=True, merges=False, concatenates=False),
}


def method_traits(kind: str) -> MethodTraits:
    return METHODS[kind]


BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_in|wte|wpe|embeddings)\.")


def block_of(name: str, num_layers: int) -> int:
    """Depth of a parameter: its transformer block 0..L-1, -1 for embeddings (below block 0), L for what
    sits above the last block (final norm, output layer, classification head)."""
    m = BLOCK.search(name)
    if m:
        return int(m.group(1))
    return -1 if EMBEDDING.search(name) else num_layers


def num_layers(model: nn.Module) -> int:
    """Transformer blocks of a (possibly PEFT-wrapped) Hugging Face model."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def freeze(model: nn.Module, cfg: Config) -> None:
    """Freeze what `method.freeze` names, on top of what the method already froze. Tied weights (an
    output layer sharing the embedding matrix) are one parameter: freezing embeddings freezes both."""
    f = cfg.method.freeze
    patterns = {p: re.compile(p) for p in f.patterns}
    matched: set[str] = set()
    layers = num_layers(model)
    for name, p in model.named_parameters():
        depth = block_of(name, layers)
        hits = {text for text, pattern in patterns.items() if pattern.search(name)}
        matched |= hits
        if (f.embeddings and depth == -1) or 0 <= depth < f.bottom_layers or hits:
            p.requires_grad_(False)
    problems = [
        f"method.freeze.patterns: {text!r} matches no parameter name" for text in patterns if text not in matched
    ]
    if not any(p.requires_grad for p in model.parameters()):
        problems.append("method.freeze: everything is frozen; nothing would train")
    if problems:
        raise ConfigError(problems)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains, in the model's order; names as the bare model has them."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainable_by_block(model: nn.Module) -> dict[int, int]:
    """Trainable elements per depth (-1 embeddings, 0..L-1 blocks, L head), for the start-up log."""
    layers = num_layers(model)
    counts = dict.fromkeys(range(-1, layers + 1), 0)
    for name, p in trainable_parameters(model):
        counts[block_of(name, layers)] += param_numel(p)
    return counts


def save_trained_model(cfg: Config, model: nn.Module, directory: Path, state: dict | None = None) -> None:
    """Write the final model as the method stores it: a Hugging Face directory (full), a PEFT adapter
    (LoRA/QLoRA), or ftl's bottleneck adapters. `state`: tensors gathered by a sharding strategy."""
    if cfg.method.kind == "adapter":
        from launcher.adapters import adapter_state, save_adapter  # torch: methods stay torch-free for estimate

        save_adapter(model, directory, cfg.method.adapter, state if state is not None else adapter_state(model))
        return
    if state is not None and cfg.method.kind in ("prompt_tuning", "prefix_tuning"):
        _save_virtual_tokens(model, directory, state)
        return
    extra = {} if state is None else {"state_dict": state}
    model.save_pretrained(directory, safe_serialization=True, **extra)


def _save_virtual_tokens(model: nn.Module, directory: Path, state: dict) -> None:
    """PEFT's prompt-learning adapter (`prompt_embeddings` + adapter_config.json) from gathered tensors: PEFT's
    own save runs the prompt encoder, whose weight is a shard under FSDP or ZeRO-3."""
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
