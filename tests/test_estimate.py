"""`ftl estimate`: parameter arithmetic equal to the real models, sharding divides, suggestions that fit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import ROOT, base_config, ftl, write_config
from transformers import AutoModelForCausalLM

from launcher.config import Config
from launcher.estimate import breakdown, parameter_bytes, read_shape


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_parameter_counts_equal_the_real_model(models: dict, toy_data: dict, tmp_path: Path, arch: str) -> None:
    from peft import LoraConfig, get_peft_model

    cfg = Config.model_validate(base_config(tmp_path, models[arch], toy_data["completion"], method={"kind": "lora"}))
    counted = parameter_bytes(cfg, read_shape(str(models[arch])))
    model = AutoModelForCausalLM.from_pretrained(models[arch])
    real = sum(p.numel() for p in model.parameters())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert counted["params"] == real - biases  # biases (GPT-NeoX) are left out: a few hundred elements
    lora = get_peft_model(model, LoraConfig(r=cfg.method.lora.r, target_modules="all-linear"))
    assert counted["trainable"] == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_zero3_and_fsdp_divide_the_model_state_by_the_ranks(models: dict, toy_data: dict, tmp_path: Path) -> None:
    raw = base_config(tmp_path, models["llama"], toy_data["completion"], method={"kind": "full"})
    shape = replace(read_shape(str(models["llama"])), layers=32)  # deep enough that one gathered block is small
    single = breakdown(Config.model_validate(raw), shape, 1, cuda=True)
    for dist in ({"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}):
        sharded = breakdown(Config.model_validate({**raw, "distributed": dist}), shape, 4, cuda=True)
        for part in ("gradients", "optimizer state"):
            assert sharded[part] == pytest.approx(single[part] / 4), (dist, part)
        assert single["weights"] / 4 < sharded["weights"] < single["weights"]  # a quarter + the gathered blocks


def test_a_run_that_does_not_fit_gets_fixes_that_do(models: dict, toy_data: dict, tmp_path: Path) -> None:
    deep = tmp_path / "deep"  # the tiny model said to have 32 layers: estimate reads config.json, no weights
    shutil.copytree(models["llama"], deep)
    config = json.loads((deep / "config.json").read_text())
    (deep / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 32}))
    cfg = base_config(
        tmp_path,
        deep,
        toy_data["completion"],
        method={"kind": "full"},
        data={"max_seq_len": 256},
        train={"micro_batch_size": 256, "gradient_checkpointing": False},
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    res = ftl("estimate", str(path), "--gpu-mem", "1.6")
    assert res.returncode == 1 and "does NOT fit" in res.stdout, res.stdout + res.stderr
    fixes = [line.split("fits with ")[1].split("  (")[0] for line in res.stdout.splitlines() if "fits with" in line]
    assert "train.gradient_checkpointing=true" in fixes, res.stdout
    for fix in fixes:  # each suggestion, applied, really fits
        again = ftl("estimate", str(path), *fix.split(), "--gpu-mem", "1.6")
        assert again.returncode == 0 and "fits:" in again.stdout, (fix, again.stdout + again.stderr)


def test_auto_checkpointing_is_on_only_when_memory_is_short(models: dict, toy_data: dict, tmp_path: Path) -> None:
    raw = base_config(
        tmp_path, models["llama"], toy_data["completion"], data={"max_seq_len": 256}, train={"micro_batch_size": 64}
    )
    path = write_config(tmp_path / "cfg.yaml", raw)
    roomy = ftl("estimate", str(path), "--gpu-mem", "100")
    assert "gradient checkpointing auto -> off" in roomy.stdout, roomy.stdout + roomy.stderr
    peak_without = float(roomy.stdout.split("| **peak** | **")[1].split("**")[0])
    short = ftl("estimate", str(path), "--gpu-mem", f"{1.5 * peak_without:.2f}")  # fits, but not twice over
    assert "gradient checkpointing auto -> on" in short.stdout, short.stdout + short.stderr
    assert float(short.stdout.split("| **peak** | **")[1].split("**")[0]) < peak_without


def test_estimate_reads_no_weights_and_imports_no_torch(models: dict, toy_data: dict, tmp_path: Path) -> None:
    path = write_config(tmp_path / "cfg.yaml", base_config(tmp_path, models["llama"], toy_data["completion"]))
    code = (
        "import sys; from launcher.cli import main; code = main(['estimate', sys.argv[1], '--gpu', 'H100']); "
        "heavy = [m for m in ('torch', 'deepspeed', 'safetensors') if m in sys.modules]; "
        "assert code == 0 and not heavy, (code, heavy)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| **peak** |" in res.stdout and "fits:" in res.stdout and "H100 (80 GiB)" in res.stdout


def test_frozen_layers_leave_the_trainable_count(models: dict, toy_data: dict, tmp_path: Path) -> None:
    """method.freeze: the estimate's trainable elements (hence gradients and optimizer state) equal what the
    real model leaves trainable."""
    from launcher.methods import freeze

    raw = base_config(tmp_path, models["llama"], toy_data["completion"], method={"kind": "full"})
    raw["method"]["freeze"] = {"embeddings": True, "bottom_layers": 1}
    cfg = Config.model_validate(raw)
    counted = parameter_bytes(cfg, read_shape(str(models["llama"])))
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    freeze(model, cfg)
    assert counted["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    plain = parameter_bytes(
        Config.model_validate({**raw, "method": {"kind": "full"}}), read_shape(str(models["llama"]))
    )
    assert counted["optimizer"] < plain["optimizer"]


def test_deepspeed_counts_its_flat_optimizer_step(models: dict, toy_data: dict, tmp_path: Path) -> None:
    """DeepSpeed steps one flat fp32 partition (a flat gradient copy + AdamW's two temporaries of that size);
    the step comes after backward freed the activations, so only its excess over them adds. Offloaded, the
    step leaves the GPU. torch strategies step tensor by tensor: LoRA's are too small to count."""
    raw = base_config(tmp_path, models["llama"], toy_data["completion"], method={"kind": "full"})
    shape = replace(read_shape(str(models["llama"])), vocab=50_000, hidden=1024, intermediate=4096, layers=8)
    zero3 = {**raw, "distributed": {"strategy": "deepspeed", "zero_stage": 3}}
    for world in (2, 4):
        cfg = Config.model_validate(zero3)
        parts, trainable = breakdown(cfg, shape, world, cuda=True), parameter_bytes(cfg, shape)["trainable"]
        working = parts["activations"] + parts["loss"]
        assert parts["optimizer step"] == pytest.approx(3 * trainable * 4 / world - working)
    offloaded = {**zero3, "distributed": {**zero3["distributed"], "offload": "optimizer"}}
    assert "optimizer step" not in breakdown(Config.model_validate(offloaded), shape, 2, cuda=True)
    lora = Config.model_validate({**raw, "method": {"kind": "lora"}})
    assert "optimizer step" not in breakdown(lora, shape, 1, cuda=True)


@pytest.mark.parametrize(("strategy", "world"), [("single", 1), ("fsdp", 2)])
def test_gradients_and_activations_peak_together_under_grad_accum(
    models: dict, toy_data: dict, tmp_path: Path, strategy: str, world: int
) -> None:
    """With grad_accum 1 the step's gradients are freed with it, so backward trades activations for gradients
    and only the larger counts; with grad_accum 2 the first micro-batch's gradients are still held while the
    second one's activations are made, so the peak holds both."""
    raw = base_config(
        tmp_path, models["llama"], toy_data["completion"], method={"kind": "full"}, distributed={"strategy": strategy}
    )
    shape = read_shape(str(models["llama"]))
    for accum, together in ((1, False), (2, True)):
        parts = breakdown(
            Config.model_validate({**raw, "train": {**raw["train"], "grad_accum": accum}}), shape, world, True
        )
        assert "optimizer step" not in parts  # the tiny model's step temporaries fit in the freed activations
        grads, acts = parts["gradients"], parts["activations"]
        assert grads > 0 and acts > 0
        state = parts["weights"] + parts["optimizer state"] + parts["loss"] + parts["framework"]
        held = sum(parts.values()) - parts["allocator slack"]
        expected = state + grads + acts if together else state + max(grads, acts)
        assert held == pytest.approx(expected, rel=1e-12), (accum, parts)


@pytest.mark.parametrize("offload", [None, "cpu"])
def test_a_deepspeed_json_decides_the_stage_and_offload_as_in_training(
    models: dict, toy_data: dict, tmp_path: Path, offload: str | None
) -> None:
    """A DeepSpeed JSON whose zero_optimization says stage 3 (and an optimizer offload) is estimated exactly as
    distributed.zero_stage=3 (and offload: optimizer), and `gradient_checkpointing: auto` decides the same way,
    because the estimate asks the strategy's own resolution rather than defaulting to ZeRO-2."""
    from launcher.estimate import resolve_checkpointing
    from launcher.strategies.ds_config import build_ds_config

    zero = {"stage": 3, **({"offload_optimizer": {"device": offload}} if offload else {})}
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": zero}))
    raw = base_config(tmp_path, models["llama"], toy_data["completion"], method={"kind": "full"})
    raw["train"]["gradient_checkpointing"] = "auto"
    fields = {"zero_stage": 3, **({"offload": "optimizer"} if offload else {})}
    by_json = Config.model_validate({**raw, "distributed": {"strategy": "deepspeed", "deepspeed_config": str(ds_json)}})
    by_fields = Config.model_validate({**raw, "distributed": {"strategy": "deepspeed", **fields}})
    assert build_ds_config(by_json, 4)["zero_optimization"]["stage"] == 3  # what training runs
    shape = read_shape(str(models["llama"]))
    assert breakdown(by_json, shape, 4, cuda=True) == breakdown(by_fields, shape, 4, cuda=True)
    for capacity in (1e6, 1e12):  # short of memory, and plenty: the same decision either way
        (json_cfg, json_note), (field_cfg, field_note) = (
            resolve_checkpointing(c, 4, True, capacity) for c in (by_json, by_fields)
        )
        assert json_cfg.train.gradient_checkpointing == field_cfg.train.gradient_checkpointing
        assert json_note == field_note
    out = ftl("estimate", str(write_config(tmp_path / "c.yaml", by_json.model_dump(mode="json"))), "--nproc", "4")
    assert "deepspeed ZeRO-3 on 4 rank(s)" in out.stdout, out.stdout + out.stderr


def test_a_pair_objective_doubles_the_activations(models: dict, toy_data: dict, tmp_path: Path) -> None:
    """DPO's micro batch of n pairs runs 2n sequences: its activations and loss working set are SFT's at twice
    the micro batch, exactly; the reference (the adapter switched off) adds no weights, and its no-grad forward,
    run before the policy's, peaks below the policy's working set, so it adds nothing either."""
    from launcher.estimate import reference_forward_bytes

    shape = read_shape(str(models["llama"]))
    lora = {"method": {"kind": "lora"}, "train": {"micro_batch_size": 4, "gradient_checkpointing": False}}
    raw = base_config(tmp_path, models["llama"], toy_data["completion"], **lora)
    sft = breakdown(Config.model_validate(raw), shape, 1, cuda=False)
    pairs = {"objective": {"kind": "dpo"}, "data": {**raw["data"], "format": "preference"}}
    dpo_cfg = Config.model_validate({**raw, **pairs})
    dpo = breakdown(dpo_cfg, shape, 1, cuda=False)
    twice = breakdown(Config.model_validate({**raw, "train": {**raw["train"], "micro_batch_size": 8}}), shape, 1, False)
    assert dpo["activations"] == pytest.approx(2 * sft["activations"], rel=1e-12)
    assert (dpo["activations"], dpo["loss"]) == (twice["activations"], twice["loss"])
    assert dpo["weights"] == sft["weights"]
    assert "reference forward" not in dpo
    assert 0 < reference_forward_bytes(dpo_cfg, shape, 2) < dpo["activations"] + dpo["loss"]
