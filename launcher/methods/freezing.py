"""Which parameters train, and where each parameter sits in the model's depth.

One owner for "which parameters train": the method sets requires_grad when it is attached, `freeze` then
freezes what `method.freeze` names, and everything after — the optimizer's param groups, the strategies,
checkpoints, export — asks `trainable_parameters` or the method instead of re-deriving it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from launcher.config import Config
from launcher.errors import ConfigError
from launcher.params import param_numel

if TYPE_CHECKING:  # torch-free at import: `ftl estimate` and `ftl validate` import this package
    from torch import nn


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
