"""Model FLOPs utilisation: the model's FLOPs per token × tokens/s ÷ the devices' peak.

FLOPs per token (forward + backward, recomputation under gradient checkpointing not counted):
- a trained weight matrix of N elements: 6N (forward 2N, input gradient 2N, weight gradient 2N);
- a frozen one (LoRA/QLoRA base): 4N, no weight-gradient work;
- the output layer only for positions that carry a label (ftl computes no logits elsewhere), so a run never
  claims work it did not need;
- attention scores and values: 12 · layers · hidden · context (the PaLM convention), with the context taken
  as the training rows' mean length.
Peak: on CUDA a table of dense bf16 peaks by device name; on CPU one fp32 matmul measured once per machine
and thread count, cached. `FTL_PEAK_TFLOPS` (per device, in TFLOP/s) overrides both.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch
from torch import nn

from launcher.params import param_numel
from launcher.paths import cache_dir

# dense bf16 TFLOP/s per device (vendor datasheets; SXM parts where two exist), matched by substring
CUDA_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,  # no bf16: its fp16 tensor-core peak
    "T4": 65.0,  # no bf16: its fp16 tensor-core peak
}


def flops_per_token(model: nn.Module, context: float, label_fraction: float) -> float:
    """Training FLOPs per token of this (unwrapped) model; see the module docstring."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    head_w = head.weight if head is not None else None
    skip = {id(embed.weight)} if embed is not None else set()
    skip.add(id(head_w))
    total = 0.0
    for p in model.parameters():
        if id(p) in skip or len(getattr(p, "ds_shape", p.shape)) < 2:
            continue  # embeddings are lookups; norms and biases are negligible
        total += (6 if p.requires_grad else 4) * param_numel(p)
    if head_w is not None:
        total += (6 if head_w.requires_grad else 4) * param_numel(head_w) * label_fraction
    config = model.config
    layers, hidden = getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0)
    return total + 12 * layers * hidden * context


def peak_flops(device: torch.device) -> float:
    """This device's peak FLOP/s (one GPU, or this process's CPU threads)."""
    override = os.environ.get("FTL_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in CUDA_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return float("nan")  # unknown GPU: no MFU rather than a wrong one (set FTL_PEAK_TFLOPS)
    return cpu_peak_flops()


def cpu_peak_flops() -> float:
    """fp32 matmul FLOP/s with this process's thread count, measured once per machine and cached."""
    threads = torch.get_num_threads()
    key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|{threads}"
    path = cache_dir() / "peak_flops.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = _measure_matmul()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    return float(cached[key])


def _measure_matmul(n: int = 2048, repeats: int = 10) -> float:
    # a private generator: whether this runs (a cache miss: a new host, a new cache) must not decide the
    # dropout masks the training draws from the global stream
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class MfuMeter:
    """mfu for a metrics row: global tokens/s × FLOPs per token ÷ (ranks × one device's peak)."""

    def __init__(self, model: nn.Module, context: float, label_fraction: float, device: torch.device, world: int):
        self.flops_per_token = flops_per_token(model, context, label_fraction)
        self.peak = peak_flops(device) * world

    def __call__(self, tokens_per_s: float) -> float:
        return tokens_per_s * self.flops_per_token / self.peak
