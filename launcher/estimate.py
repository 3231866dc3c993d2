"""`ftl estimate`: per-rank peak memory of a run before it starts, from the config and the model's
config.json alone (no weights, no deepspeed import), and which settings would make it fit.

Bytes are counted per rank:
- weights: the model dtype; QLoRA stores linear weights in 4 bits (+ one fp32 absmax per 64, a byte with
  double quantisation); adapters train in fp32;
- gradients (trainable only) and optimizer state (AdamW 8 bytes per trainable element, 8-bit AdamW 2, SGD 0);
- sharding: FSDP shards weights, gradients and state and gathers one block at a time; ZeRO-1 shards the
  state, ZeRO-2 also gradients, ZeRO-3 also weights; DeepSpeed's optimizer steps its own fp32 copy of the
  trained weights, partitioned like the state; offloaded parts leave the device;
- gradients and activations peak apart where gradients are freed every step (torch strategies but DDP,
  grad_accum 1): backward frees a layer's activations as it creates that layer's gradients;
- activations of one micro-batch at max_seq_len (the worst case): the tensors each layer keeps for
  backward, or with gradient checkpointing only each layer's input plus one layer recomputed;
- the loss: ftl's label-only loss works in chunks (launcher/loss.py), other models get full logits;
- the objective (launcher/objectives/traits.py memory_needs): a preference pair is two sequences, which
  doubles activations and the loss's tokens; a reference's no-grad forward runs before the policy's and adds
  only its excess; a resident reference copy adds its weights;
- framework overhead: the CUDA context, or on CPU the interpreter and libraries, and the allocator's slack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from launcher.config import Config
from launcher.errors import ConfigError
from launcher.loss_models import CHUNK_ELEMENTS, PLAIN_HEAD_MODELS
from launcher.methods import method_for
from launcher.methods.base import DTYPE_BYTES
from launcher.objectives.traits import memory_needs, objective_name, objective_traits
from launcher.strategies import resolve_strategy_name, sharding_alternatives
from launcher.strategies.ds_config import stage_and_offload
from launcher.strategies.traits import traits

GIB = 2**30
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "sgd": 0}
CUDA_OVERHEAD, CPU_OVERHEAD, SLACK = 0.75 * GIB, 0.45 * GIB, 0.10
AUTO_CHECKPOINTING_SHARE = 0.5  # the estimate errs by up to ~half on CPU-only costs: keep that much margin
GPU_MEMORY_GIB = {  # usable memory per device, by name substring
    "H200": 141,
    "H100": 80,
    "A100-40": 40,
    "A100": 80,
    "L40S": 48,
    "L4": 24,
    "A10G": 24,
    "A10": 24,
    "RTX 4090": 24,
    "RTX 3090": 24,
    "V100": 32,
    "T4": 16,
}


@dataclass
class Shape:
    """What the estimate needs from a model's config.json."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block, by module name."""
        d, kv = self.hidden, self.hidden * self.kv_heads // self.heads
        if self.model_type == "gpt_neox":
            i = self.intermediate
            return {"query_key_value": (d, 3 * d), "dense": (d, d), "dense_h_to_4h": (d, i), "dense_4h_to_h": (i, d)}
        i = self.intermediate
        attn = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
        return attn | {"gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def read_shape(model_path: str) -> Shape:
    """The model's shape from its config.json."""
    c = json.loads((Path(model_path) / "config.json").read_text())
    heads = c.get("num_attention_heads", 1)
    return Shape(
        model_type=c.get("model_type", ""),
        vocab=c["vocab_size"],
        hidden=c["hidden_size"],
        layers=c["num_hidden_layers"],
        intermediate=c.get("intermediate_size", 4 * c["hidden_size"]),
        heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        tied=bool(c.get("tie_word_embeddings", c.get("model_type") != "gpt_neox")),
    )


def parameter_bytes(cfg: Config, shape: Shape) -> dict[str, float]:
    """Unsharded weights, trainable elements and their gradient/optimizer bytes."""
    method, dtype = method_for(cfg), DTYPE_BYTES[cfg.model.dtype]
    block = sum(i * o for i, o in shape.linears.values())
    linear = shape.layers * block
    other = shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden
    adapters = method.added_elements(cfg, shape)
    weights = method.weight_bytes(cfg, linear, other)
    adapted = method.adapters
    trainable = adapters if adapted else linear + other - frozen_by_config(cfg, shape, block)
    grad_bytes = 4 if adapted else dtype
    weights += adapters * 4 if adapted else 0
    weights += method.frozen_added_elements(cfg, shape) * 4  # a frozen adapter copy (model.adapter): fp32
    return {
        "weights": weights,
        "trainable": trainable,
        "gradients": trainable * grad_bytes,
        "optimizer": trainable * OPTIMIZER_BYTES[cfg.train.optimizer],
        "block": method.block_bytes(cfg, block),
        "params": linear + other,
    }


def frozen_by_config(cfg: Config, shape: Shape, block: int) -> int:
    """Pre-trained elements `method.freeze` keeps frozen under full fine-tuning: the bottom blocks' linear
    layers and norms, and the input embeddings (tied: the output layer with them). Patterns are regexes
    over parameter names, which config.json does not list: not counted."""
    f = cfg.method.freeze
    bottom = min(f.bottom_layers, shape.layers) * (block + 2 * shape.hidden)
    return bottom + (shape.vocab * shape.hidden if f.embeddings else 0)


def layer_bytes(cfg: Config, shape: Shape, tokens: int) -> float:
    """The tensors one layer keeps for backward over `tokens` tokens."""
    act = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    d, i, kv = shape.hidden, shape.intermediate, shape.hidden * shape.kv_heads // shape.heads
    per_layer = 9 * d + 3 * kv + 4 * i  # norms, q/k/v (+rotary), attention out, MLP gate/up/act/product
    per_layer += method_for(cfg).activation_elements(cfg, shape)  # e.g. LoRA's rank-r intermediates
    return tokens * per_layer * act


def activation_bytes(cfg: Config, shape: Shape, sequences: int = 1) -> dict[str, float]:
    """Activations of one micro-batch at max_seq_len, and the loss's working set; `sequences` per sample
    (a preference pair is two)."""
    tokens = cfg.train.micro_batch_size * sequences * cfg.data.max_seq_len
    act = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    full = layer_bytes(cfg, shape, tokens)
    if cfg.train.gradient_checkpointing:
        layers = tokens * shape.hidden * act * shape.layers + full  # every layer's input, one layer recomputed
    else:
        layers = full * shape.layers
    if cfg.data.packing:
        layers += cfg.train.micro_batch_size * cfg.data.max_seq_len**2 * 4  # the block-diagonal mask
    if shape.model_type in PLAIN_HEAD_MODELS:
        loss = min(tokens * shape.vocab, CHUNK_ELEMENTS) * (4 + 4 + act)  # logits, their gradient, a cast
    else:
        loss = tokens * shape.vocab * (act + 4 + 4)
    return {"activations": layers, "loss": loss}


def reference_forward_bytes(cfg: Config, shape: Shape, sequences: int) -> float:
    """The peak of one no-grad reference forward: one layer's tensors at a time (nothing is kept for
    backward) and the loss's working set. It runs before the policy's forward, so only its excess over the
    policy's working set adds."""
    tokens = cfg.train.micro_batch_size * sequences * cfg.data.max_seq_len
    return layer_bytes(cfg, shape, tokens) + activation_bytes(cfg, shape, sequences)["loss"]


def _strategy(cfg: Config, world: int) -> tuple[str, int, str]:
    """(strategy, ZeRO stage, offload) the run will use, resolved by the same code as training's (`auto`, and
    a DeepSpeed JSON's stage and offload)."""
    name = resolve_strategy_name(cfg, world)
    if len(traits(name).sharded) <= 1:
        return name, 0, "none"
    return (name, *stage_and_offload(cfg))


def breakdown(cfg: Config, shape: Shape, world: int, cuda: bool) -> dict[str, float]:
    """Peak bytes per rank by component (offloaded parts count on CPU, where host memory is the memory)."""
    p = parameter_bytes(cfg, shape)
    needs = memory_needs(cfg, p["weights"])  # the objective's share: sequences per sample, its reference
    a = activation_bytes(cfg, shape, needs.sequences)
    name, stage, offload = _strategy(cfg, world)
    declared = traits(name)
    split = declared.sharded_state(stage)
    weights = p["weights"] + needs.reference_weight_bytes
    state = {"weights": weights, "gradients": p["gradients"] * declared.gradient_copies}
    state["optimizer"] = p["optimizer"]
    # DeepSpeed's ZeRO optimizer steps its own flat fp32 copy of the trained weights (even when they are fp32
    # already), partitioned like the optimizer state
    master = p["trainable"] * 4 / (world if "optimizer" in split else 1) if declared.fp32_master_copy else 0.0
    for part in split:
        state[part] /= world
    if "weights" in split:
        state["weights"] += 2 * p["block"]  # the block being computed and the one prefetched, gathered
        if declared.whole_model_on_rank0 and not cuda:
            state["weights"] = max(state["weights"], p["weights"])
    optimizer_offloaded = cuda and (cfg.distributed.fsdp_cpu_offload or offload in ("optimizer", "all"))
    if optimizer_offloaded:
        state["optimizer"] = master = 0.0
    if cuda and cfg.distributed.fsdp_cpu_offload:
        state["gradients"] = 0.0
    if cuda and (cfg.distributed.fsdp_cpu_offload or offload in ("params", "all")):
        state["weights"] = 2 * p["block"]
    parts = {"weights": state["weights"], "gradients": state["gradients"], "optimizer state": state["optimizer"]}
    parts |= ({"fp32 master copy": master} if master else {}) | a
    if holds_reference_copy(cfg):
        parts["reference model"] = p["weights"]  # an unsharded frozen copy (objective.reference: model)
    if declared.frees_gradients and cfg.train.grad_accum == 1:
        # backward frees each layer's activations as it creates that layer's gradients, and no gradient
        # outlives the step: the two peak apart (all activations at the start of backward, all gradients at
        # its end), not together
        parts["backward overlap"] = -min(parts["gradients"], parts["activations"])
    shards = world if "optimizer" in split else 1
    step = 0.0 if optimizer_offloaded else optimizer_step_bytes(cfg, shape, p, shards, declared.flat_optimizer_step)
    working = parts["activations"] + parts["loss"] + parts.get("backward overlap", 0.0)
    if step > working:  # the step runs after backward freed the activations: only its excess adds
        parts["optimizer step"] = step - working
    reference = needs.reference_forwards and reference_forward_bytes(cfg, shape, needs.sequences)
    if reference > working:
        parts["reference forward"] = reference - working
    parts["framework"] = CUDA_OVERHEAD if cuda else CPU_OVERHEAD
    parts["allocator slack"] = SLACK * sum(parts.values())
    return parts


def optimizer_step_bytes(cfg: Config, shape: Shape, p: dict[str, float], shards: int, flat: bool) -> float:
    """Temporaries of one optimizer step. torch's AdamW makes two per tensor (the square root of the second
    moment, then its scaled copy), so the largest trained tensor sets them; DeepSpeed steps one flat fp32
    partition per rank and first copies the gradients into a flat tensor of the same size (measured on
    SmolLM2-135M, ZeRO-3, 2 ranks: +0.75 GB in the first step = three partitions)."""
    temporaries = 2 if cfg.train.optimizer == "adamw" else 0
    if flat:
        return (1 + temporaries) * p["trainable"] * 4 / shards
    if method_for(cfg).adapters:
        return 0.0  # small tensors
    largest = max(
        [i * o for i, o in shape.linears.values()] + [shape.vocab * shape.hidden * (not cfg.method.freeze.embeddings)]
    )
    return temporaries * largest * DTYPE_BYTES[cfg.model.dtype] / shards


def checkpoint_bytes(cfg: Config, trainable: float) -> float:
    """One checkpoint: the trained weights (adapters in fp32, or the model's dtype), their optimizer state and,
    under DeepSpeed, its fp32 master copy of them. The one rule for `ftl estimate` and the disk check."""
    adapters = method_for(cfg).adapters
    weight = 4 if adapters else DTYPE_BYTES[cfg.model.dtype]
    declared = traits(cfg.distributed.strategy)  # None for `auto`, which never resolves to DeepSpeed
    master = 4 if declared and declared.fp32_master_copy else 0
    return trainable * (weight + OPTIMIZER_BYTES[cfg.train.optimizer] + master)


def final_model_bytes(cfg: Config, trainable: float, total: float) -> float:
    """final/: the adapter a method added, or the whole model in its dtype."""
    if method_for(cfg).adapters:
        return trainable * 4
    return total * DTYPE_BYTES[cfg.model.dtype]


def device_capacity(gpu: str | None, gpu_mem: float | None, world: int) -> tuple[float, str]:
    """(bytes one rank may use, what that is)."""
    if gpu_mem is not None:
        return gpu_mem * GIB, f"{gpu_mem:g} GiB per GPU"
    if gpu is not None:
        for key, gib in GPU_MEMORY_GIB.items():
            if key.lower() in gpu.lower():
                return gib * GIB, f"{gpu} ({gib} GiB)"
        raise ValueError(f"--gpu {gpu}: unknown GPU; give --gpu-mem GiB (known: {', '.join(GPU_MEMORY_GIB)})")
    import psutil

    total = psutil.virtual_memory().total
    return total / world, f"this machine's memory ({total / GIB:.1f} GiB) shared by {world} rank(s)"


def fixes(cfg: Config, shape: Shape, world: int, cuda: bool, capacity: float) -> list[tuple[str, float]]:
    """Single setting changes that make the run fit, with the total each gives."""
    t = cfg.train
    tries: list[tuple[str, dict]] = []
    if not t.gradient_checkpointing:
        tries.append(("train.gradient_checkpointing=true", {"train": {"gradient_checkpointing": True}}))
    mbs = t.micro_batch_size
    while mbs > 1:
        mbs //= 2
        accum = t.grad_accum * t.micro_batch_size // mbs
        label = f"train.micro_batch_size={mbs} train.grad_accum={accum}"
        tries.append((label, {"train": {"micro_batch_size": mbs, "grad_accum": accum}}))
    tries += sharding_alternatives(cfg, world, cuda)
    tries += method_for(cfg).lighter_changes(cuda)
    found = []
    for label, change in tries:
        if "micro_batch_size" in label and any("micro_batch_size" in f for f, _ in found):
            continue  # the largest micro batch that fits is the one to name
        trial = cfg.model_copy(deep=True)
        for section, values in change.items():
            for key, value in values.items():
                setattr(getattr(trial, section), key, value)
        total = sum(breakdown(trial, shape, world, cuda).values())
        if total <= capacity:
            found.append((label, total))
    return found


def resolve_checkpointing(cfg: Config, world: int, cuda: bool, capacity: float) -> tuple[Config, str]:
    """`gradient_checkpointing: auto` made a bool: off when the estimated per-rank peak without it is at most
    AUTO_CHECKPOINTING_SHARE of the device's memory (recomputing costs 25–40% of the time), else on.
    Returns the config to run and a line saying what was chosen and why ("" when it was not `auto`)."""
    if cfg.train.gradient_checkpointing != "auto":
        return cfg, ""
    out = cfg.model_copy(deep=True)
    out.train.gradient_checkpointing = False
    try:
        need = sum(breakdown(out, read_shape(cfg.model.path), world, cuda).values())
    except (OSError, KeyError, ValueError):  # no readable config.json: be safe
        out.train.gradient_checkpointing = True
        return out, "gradient checkpointing auto -> on (the model's size is unknown)"
    out.train.gradient_checkpointing = need > AUTO_CHECKPOINTING_SHARE * capacity
    return out, (
        f"gradient checkpointing auto -> {'on' if out.train.gradient_checkpointing else 'off'} (estimated peak "
        f"without it {need / GIB:.2f} GiB per rank; {capacity / GIB:.1f} GiB of memory per rank)"
    )


def holds_reference_copy(cfg: Config) -> bool:
    """Whether the run holds a frozen reference model beside the policy."""
    return cfg.objective is not None and cfg.objective.reference == "model" and compares_with_reference(cfg)


def compares_with_reference(cfg: Config) -> bool:
    """Whether the run's objective compares the policy with a reference (objective.reference applies)."""
    return objective_traits(objective_name(cfg)).reference


def resolve_reference(cfg: Config, world: int, cuda: bool, capacity: float) -> tuple[Config, str]:
    """`objective.reference: auto` made concrete: adapter_disabled for a method that switches its adapter off;
    else model (a frozen copy) when the strategy holds whole models and the estimated peak with the copy is at
    most AUTO_CHECKPOINTING_SHARE of the memory (the same margin for the same estimate), else precomputed.
    Returns the config to run and a line saying what was chosen and why ("" when it was not `auto`)."""
    if cfg.objective is None or cfg.objective.reference != "auto" or not compares_with_reference(cfg):
        return cfg, ""
    out = cfg.model_copy(deep=True)
    method = method_for(cfg)
    if method.switches_off:
        out.objective.reference = "adapter_disabled"
        return out, f"objective.reference auto -> adapter_disabled (method {method.name} switches its adapter off)"
    name = resolve_strategy_name(cfg, world)
    if cfg.data.packing:  # precomputed log-probs are stored per pair; a packed row mixes pairs
        if not traits(name).replicated:
            raise ConfigError(
                [
                    f"data.packing: full fine-tuning DPO under {name} compares with precomputed reference log-probs, "
                    "which are stored per pair; leave data.packing off (padding-free pairs join a micro-batch anyway)"
                ]
            )
        out.objective.reference = "model"
        return out, "objective.reference auto -> model (data.packing: precomputed log-probs are stored per pair)"
    if not traits(name).replicated:
        out.objective.reference = "precomputed"
        return out, f"objective.reference auto -> precomputed (a reference copy is not sharded under {name})"
    out.objective.reference = "model"
    try:
        need = sum(breakdown(out, read_shape(cfg.model.path), world, cuda).values())
    except (OSError, KeyError, ValueError):  # no readable config.json: no second model
        out.objective.reference = "precomputed"
        return out, "objective.reference auto -> precomputed (the model's size is unknown)"
    fits = need <= AUTO_CHECKPOINTING_SHARE * capacity
    out.objective.reference = "model" if fits else "precomputed"
    return out, (
        f"objective.reference auto -> {out.objective.reference} (estimated peak with a frozen reference copy "
        f"{need / GIB:.2f} GiB per rank of {capacity / GIB:.1f} GiB; the copy is held when that is at most "
        f"{AUTO_CHECKPOINTING_SHARE:.0%})"
    )


def report(cfg: Config, world: int, cuda: bool, gpu: str | None, gpu_mem: float | None) -> tuple[bool, str]:
    """(fits, the text `ftl estimate` prints)."""
    capacity, where = device_capacity(gpu, gpu_mem, world)
    cfg, auto_note = resolve_checkpointing(cfg, world, cuda, capacity)
    cfg, reference_note = resolve_reference(cfg, world, cuda, capacity)
    shape = read_shape(cfg.model.path)
    parts = breakdown(cfg, shape, world, cuda)
    total = sum(parts.values())
    family, stage, _ = _strategy(cfg, world)
    p = parameter_bytes(cfg, shape)
    sequences = memory_needs(cfg, p["weights"]).sequences
    per_sample = f" samples of {sequences} sequences" if sequences > 1 else ""
    lines = [
        f"model: {shape.model_type}, {p['params'] / 1e6:.1f}M parameters, {p['trainable'] / 1e6:.2f}M trainable "
        f"({method_for(cfg).name}); {family}{f' ZeRO-{stage}' if stage else ''} on {world} rank(s), "
        f"{'CUDA' if cuda else 'CPU'}; micro batch {cfg.train.micro_batch_size}{per_sample} × {cfg.data.max_seq_len} "
        f"tokens, "
        f"gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}",
        *([auto_note] if auto_note else []),
        *([reference_note] if reference_note else []),
        "",
        "| per rank | GiB |",
        "| --- | --- |",
        *[f"| {name} | {value / GIB:.2f} |" for name, value in parts.items()],
        f"| **peak** | **{total / GIB:.2f}** |",
        "",
        f"checkpoint: {checkpoint_bytes(cfg, p['trainable']) / GIB:.2f} GiB each "
        f"(× keep_last {cfg.checkpoint.keep_last} + 1)",
    ]
    fits = total <= capacity
    if fits:
        lines.append(f"fits: {total / GIB:.2f} of {capacity / GIB:.1f} GiB ({where})")
        return True, "\n".join(lines)
    lines.append(f"does NOT fit: {total / GIB:.2f} GiB needed, {capacity / GIB:.1f} GiB available ({where})")
    options = fixes(cfg, shape, world, cuda, capacity)
    lines += [f"  fits with {label}  ({value / GIB:.2f} GiB)" for label, value in options]
    if not options:
        lines.append("  no single setting makes it fit: combine them, or use more ranks")
    return False, "\n".join(lines)
