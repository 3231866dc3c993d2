"""MFU: the FLOPs-per-token formula on a model whose shape is known, and the peak it is divided by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher import mfu


def _matmul_elements(layers: int = 2, d: int = 32, kv: int = 16, inter: int = 64) -> int:
    """The tiny Llama's projection weights by hand: q, o (d×d), k, v (d×kv), gate, up, down (d×inter)."""
    return layers * (2 * d * d + 2 * d * kv + 3 * d * inter)


def test_flops_per_token_full_and_lora(models: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    head, attention = 80 * 32, 12 * 2 * 32 * 10.0  # vocab × hidden; 12 · layers · hidden · context
    got = mfu.flops_per_token(model, context=10.0, label_fraction=0.25)
    assert got == pytest.approx(6 * _matmul_elements() + 6 * head * 0.25 + attention, rel=1e-12)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)  # A and B of 7 projections × 2 layers
    assert adapters == 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))
    got = mfu.flops_per_token(lora, context=10.0, label_fraction=0.25)
    # frozen weights: forward + input gradient only (4N); adapters: 6N
    assert got == pytest.approx(4 * _matmul_elements() + 6 * adapters + 4 * head * 0.25 + attention, rel=1e-12)


def test_cpu_peak_is_measured_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FTL_PEAK_TFLOPS", raising=False)
    first = mfu.peak_flops(torch.device("cpu"))
    assert 1e8 < first < 1e13  # a real measurement: 0.1 GFLOP/s .. 10 TFLOP/s
    cache = tmp_path / "peak_flops.json"
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [first]
    cache.write_text(json.dumps(dict.fromkeys(entries, 123.0)))
    assert mfu.peak_flops(torch.device("cpu")) == 123.0  # read back, not measured again
    monkeypatch.setenv("FTL_PEAK_TFLOPS", "2.5")
    assert mfu.peak_flops(torch.device("cpu")) == 2.5e12
