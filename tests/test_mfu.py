"""MFU: the FLOPs-per-token formula on a model whose shape is known, the peak it is divided by, and a
multi-rank run's mfu per device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base_config, ftl, read_metrics, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher import mfu
from launcher.data.tokenized import tokenize_rows


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


@pytest.mark.slow
def test_a_two_rank_runs_mfu_is_per_device(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """2 ranks: the logged mfu is the global tokens/s × FLOPs per token ÷ (2 × one device's peak), each
    device's share; divided by one device's peak it would claim twice the true utilisation."""
    peak_tflops = 0.5
    cfg = base_config(tmp_path, models["llama"], toy_data["completion"], distributed={"strategy": "ddp"})
    path = write_config(tmp_path / "cfg.yaml", cfg)
    res = ftl("train", str(path), "--nproc", "2", env={"FTL_PEAK_TFLOPS": str(peak_tflops)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in read_metrics(Path(cfg["output_dir"])) if "mfu" in r]
    assert len(rows) == cfg["train"]["max_steps"] and all(r["world_size"] == 2 for r in rows)
    # the training split as the run sees it (whole file, unpacked): its mean length and label share
    tok = AutoTokenizer.from_pretrained(models["llama"])
    raw = [json.loads(x) for x in toy_data["completion"].read_text().splitlines()]
    train = tokenize_rows(raw, "completion", tok, cfg["data"]["max_seq_len"], mask_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    per_token = mfu.flops_per_token(model, train.mean_length, train.label_fraction)
    for r in rows:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / (2 * peak_tflops * 1e12), rel=1e-9), r


def test_measuring_the_cpu_peak_leaves_the_training_rng_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The peak is measured (rank 0, cache miss: a new machine or thread count) during a run; drawing from the
    global generator would change dropout, so a resumed run (or a rerun on a cold cache) would differ from the
    straight one."""
    monkeypatch.setenv("FTL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FTL_PEAK_TFLOPS", raising=False)
    torch.manual_seed(3)
    expected = torch.rand(8)
    torch.manual_seed(3)
    mfu.peak_flops(torch.device("cpu"))  # measured: the cache is empty
    assert torch.equal(torch.rand(8), expected)
