"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), written for ftl: PEFT has none, and the
`adapters` library pins an older transformers.

Each adapter is down-projection → nonlinearity → up-projection plus a residual, applied to the output of a
sub-layer: after attention and after the feed-forward block (houlsby), or after the feed-forward block only
(pfeiffer). The up-projection starts at zero, so at step 0 the model computes exactly what the base does;
the down-projection is drawn from N(0, init_scale²). Adapters are child modules of their transformer block,
so FSDP shards them with it, ZeRO-3 partitions them, and gradient checkpointing recomputes them.

Reload onto the base model with one call:

    model = load_adapter(AutoModelForCausalLM.from_pretrained(BASE), "runs/my-run/final")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from launcher.config import AdapterSettings
from launcher.errors import ConfigError
from launcher.params import is_new_head

CONFIG_FILE, WEIGHTS_FILE = "ftl_adapter.json", "adapter_model.safetensors"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
# (attention output, feed-forward output) relative to a transformer block, by model family
SITES = {
    "llama-like": ("self_attn", "mlp"),  # Llama, Mistral, Qwen2/3, Phi-3, OLMo
    "gpt_neox": ("attention", "mlp"),
    "bert": ("attention.output.dense", "output.dense"),  # before the residual + LayerNorm, as in Houlsby
}


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))); exactly h at initialisation."""

    def __init__(self, width: int, size: int, activation: str, init_scale: float):
        super().__init__()
        self.down = nn.Linear(width, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, width)
        nn.init.normal_(self.down.weight, std=init_scale)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _sites(model_type: str) -> tuple[str, str]:
    if model_type in SITES:
        return SITES[model_type]
    if model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma", "gemma2"):
        return SITES["llama-like"]
    raise ConfigError([f"method.kind: adapter does not know where to insert into a {model_type!r} model yet"])


def _blocks(model: nn.Module) -> list[nn.Module]:
    for path in ("model.layers", "gpt_neox.layers", "bert.encoder.layer", "layers", "encoder.layer"):
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                break
        if isinstance(found, nn.ModuleList):
            return list(found)
    raise ConfigError(["method.kind: adapter found no transformer blocks in this model"])


def _output_hook(adapter_name: str):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        adapter = module._ftl_adapter_owner.get_submodule(adapter_name)
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def attach_adapters(model: nn.Module, s: AdapterSettings) -> nn.Module:
    """Freeze the base, insert adapters into every block (trainable), unfreeze configured norms/new head."""
    config = model.config
    attn_site, ffn_site = _sites(config.model_type)
    width = config.hidden_size
    for p in model.parameters():
        p.requires_grad_(False)
    placements = [("attn_adapter", attn_site), ("ffn_adapter", ffn_site)]
    if s.placement == "pfeiffer":
        placements = placements[1:]
    for block in _blocks(model):
        for adapter_name, site in placements:
            block.add_module(adapter_name, BottleneckAdapter(width, s.size, s.activation, s.init_scale))
            target = block.get_submodule(site)
            object.__setattr__(target, "_ftl_adapter_owner", block)  # not a submodule: no cycle in the tree
            target.register_forward_hook(_output_hook(adapter_name))
    for name, p in model.named_parameters():
        if "_adapter." in name or (s.train_layer_norms and _is_norm(name)) or is_new_head(name):
            p.requires_grad_(True)
    return model


def _is_norm(name: str) -> bool:
    return any(key in name for key in ("norm", "LayerNorm", "layernorm", "ln_"))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter run trains (adapters, configured norms, a new head), as saved."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, directory: Path, s: AdapterSettings, state: dict[str, torch.Tensor]) -> None:
    """Write the trained tensors and the settings that rebuild the adapters onto the base model."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE))
    info = {"adapter": s.model_dump(), "model_type": model.config.model_type, "tensors": sorted(state)}
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=1))
    model.config.save_pretrained(directory)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach the adapters saved in `directory` to a freshly loaded base model and load their weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    info = json.loads((directory / CONFIG_FILE).read_text())
    attach_adapters(model, AdapterSettings.model_validate(info["adapter"]))
    weights = load_file(str(directory / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise ValueError(f"{directory}: tensors the model does not have, e.g. {missing[0]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model
