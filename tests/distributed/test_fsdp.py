"""`distributed.strategy: fsdp` on real 2-rank CPU/gloo process groups: sharding, numerics, QLoRA, mixed
precision, DCP checkpoints across world sizes, gathered Hugging Face export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, base_config, ftl, read_metrics, reverse_rows, write_config, write_jsonl
from safetensors.torch import load_file

from launcher.world import free_port

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).with_name("fsdp_ckpt_driver.py")


def _train(tmp: Path, cfg: dict, *overrides: str, nproc: int = 0) -> Path:
    """Run `ftl train` (2 ranks when nproc=2) and return its output_dir."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "output_dir": str(tmp / "run")}
    path = write_config(tmp / "cfg.yaml", cfg)
    res = ftl("train", str(path), *overrides, *(["--nproc", str(nproc)] if nproc else []))
    assert res.returncode == 0, res.stderr[-4000:]
    return tmp / "run"


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def _numel(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def _assert_sharded(run: Path, total: int, trainable: int) -> None:
    """Each of 2 ranks holds about half the parameters and half the AdamW state (2 tensors per param)."""
    ranks = json.loads((run / "sharding.json").read_text())["ranks"]
    assert len(ranks) == 2
    for r in ranks:
        assert r["params"] == pytest.approx(total / 2, rel=0.03), (r, total)
        assert r["optimizer_state"] == pytest.approx(trainable, rel=0.03), (r, trainable)
    assert sum(r["params"] for r in ranks) == pytest.approx(total, rel=0.01)
    # every transformer block is its own FSDP unit (sharding only the root would also halve the counts above)
    units = json.loads((run / "sharding.json").read_text())["fsdp_units"]
    assert "" in units and all(any(u.endswith(f"layers.{i}") for u in units) for i in range(2)), units


def test_full_fsdp_is_sharded_and_matches_single_with_accumulation(
    tmp_path: Path, models: dict, toy_data: dict
) -> None:
    from transformers import AutoModelForCausalLM

    cfg = base_config(
        tmp_path, models["llama"], toy_data["completion"], train={"max_steps": 5, "micro_batch_size": 2, "lr": 1e-2}
    )
    ref = _train(tmp_path / "one", cfg, "distributed.strategy=single", "train.grad_accum=4")
    run = _train(tmp_path / "two", cfg, "distributed.strategy=fsdp", "train.grad_accum=2", nproc=2)
    assert _losses(run) == pytest.approx(_losses(ref), rel=1e-4)
    norms = [[r["grad_norm"] for r in read_metrics(d) if "loss" in r] for d in (ref, run)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)  # gradients are summed, not averaged
    a = AutoModelForCausalLM.from_pretrained(ref / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert json.loads((run / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    _assert_sharded(run, total=_numel(a), trainable=_numel(a))


def _eval_loss(model: torch.nn.Module, tok_dir: Path, eval_file: Path) -> float:
    """Mean per-token loss of `model` on the eval file, tokenised the way the trainer does."""
    from transformers import AutoTokenizer

    from launcher.data import collate
    from launcher.data.tokenized import tokenize_rows
    from launcher.loss import causal_lm_loss_sum

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [json.loads(x) for x in eval_file.read_text().splitlines()]
    samples = tokenize_rows(rows, "completion", tok, 64, mask_prompt=True)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(samples), 4):
            batch = collate(samples, range(i, min(i + 4, len(samples))), tok.pad_token_id)
            total += float(causal_lm_loss_sum(model.eval(), batch))
    return total / samples.num_label_tokens


def test_lora_fsdp_matches_single_and_the_adapter_reloads(tmp_path: Path, models: dict, toy_data: dict) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    eval_file = write_jsonl(tmp_path / "eval.jsonl", reverse_rows(8, seed=7))
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "lora"},
        data={"eval": str(eval_file)},
        # no clipping here: Adam turns the last-bit difference of two clip factors into ~1e-5 on a few
        # near-zero-gradient adapter weights; the full-model test covers clipping by the global norm
        train={"max_steps": 5, "micro_batch_size": 2, "lr": 1e-2, "max_grad_norm": None},
    )
    ref = _train(tmp_path / "one", cfg, "distributed.strategy=single", "train.grad_accum=2")
    run = _train(tmp_path / "two", cfg, "distributed.strategy=fsdp", nproc=2)
    assert _losses(run) == pytest.approx(_losses(ref), rel=1e-4)
    a = load_file(ref / "final" / "adapter_model.safetensors")
    b = load_file(run / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all("lora_" in k for k in b)
    assert all(t.dtype == torch.float32 for t in b.values())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    base = AutoModelForCausalLM.from_pretrained(models["llama"])
    total = _numel(base.state_dict()) + _numel(b)
    reloaded = PeftModel.from_pretrained(base, run / "final")
    trained_eval = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r][-1]
    assert _eval_loss(reloaded, models["llama"], eval_file) == pytest.approx(trained_eval, rel=1e-5)
    _assert_sharded(run, total=total, trainable=_numel(b))


def test_qlora_fsdp_bf16_with_checkpointing_trains(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "qlora"},
        train={
            "max_steps": 8,
            "micro_batch_size": 2,
            "lr": 2e-2,
            "schedule": "constant",
            "precision": "bf16",
            "gradient_checkpointing": True,
        },
    )
    run = _train(tmp_path, cfg, "distributed.strategy=fsdp", nproc=2)
    losses = _losses(run)
    assert len(losses) == 8 and all(math.isfinite(x) and x > 0.1 for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert max(float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k) > 0  # B starts at zero
    report = json.loads((run / "sharding.json").read_text())
    ranks = report["ranks"]
    assert ranks[0]["optimizer_state"] == ranks[1]["optimizer_state"] == _numel(adapter)
    assert report["linear4bit"] == 2 * 7  # the frozen base really is 4-bit: q,k,v,o,gate,up,down per block


def test_full_fsdp_bf16_mixed_precision_with_checkpointing(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = base_config(
        tmp_path,
        models["qwen2"],
        toy_data["completion"],
        train={"max_steps": 4, "micro_batch_size": 2, "lr": 1e-2, "precision": "bf16", "gradient_checkpointing": True},
    )
    run = _train(tmp_path, cfg, "distributed.strategy=fsdp", nproc=2)
    losses = _losses(run)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    weights = load_file(run / "final" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # sharded master weights stay fp32
    # bf16 really computes: step 1 (same initial weights, same batch) differs from fp32 by bf16 rounding only
    fp32 = _train(
        tmp_path / "fp32", cfg, "distributed.strategy=fsdp", "train.precision=fp32", "train.max_steps=1", nproc=2
    )
    first = _losses(fp32)[0]
    assert 1e-5 < abs(losses[0] - first) / first < 2e-2, (losses[0], first)


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in a saved model directory."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {directory}"
    return out


def _drive(nproc: int, config: Path, phase: str, work: Path, kinds: str, *overrides: str) -> None:
    """Run the checkpoint driver on nproc ranks (a plain process when 1)."""
    port, procs = str(free_port()), []
    logs = [work / f"{phase}-rank{rank}.log" for rank in range(nproc)]  # files: an undrained pipe can block a rank
    for rank in range(nproc):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if nproc > 1:
            env.update(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            )
        args = [sys.executable, str(DRIVER), str(config), phase, str(work), kinds, *overrides]
        with logs[rank].open("w") as f:
            procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True))
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0] * nproc, "\n".join(log.read_text()[-3000:] for log in logs)


def test_dcp_checkpoint_saved_by_2_ranks_resumes_on_1(tmp_path: Path, models: dict, toy_data: dict) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        train={"micro_batch_size": 2, "lr": 1e-2, "schedule": "constant"},
        distributed={"strategy": "fsdp"},
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    _drive(2, path, "save", tmp_path, "full,lora", "train.grad_accum=1")
    _drive(1, path, "load", tmp_path, "full,lora", "train.grad_accum=2")
    for kind in ("full", "lora"):
        work = tmp_path / kind
        saved, loaded = (json.loads((work / f"{p}.json").read_text()) for p in ("save", "load"))
        assert len(saved) == 4 and loaded == pytest.approx(saved[2:], rel=1e-5), kind
        a, b = (_safetensors(work / f"{p}-final") for p in ("save", "load"))
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, kind
        keys = FileSystemReader(str(work / "ckpt")).read_metadata().state_dict_metadata
        model_keys = [k for k in keys if k.startswith("model.")]
        assert any(k.startswith("optimizer.state.") for k in keys)
        if kind == "lora":  # trainable parameters only
            assert model_keys and all("lora_" in k for k in model_keys)
        else:
            assert len(model_keys) == len(a)


KINDS = (
    "full",
    "full+method.freeze.bottom_layers=1",
    "lora",
    "qlora+method.qlora.compute_dtype=float32",
    "adapter",
    "prompt_tuning",
    "prefix_tuning",
)


@pytest.mark.parametrize("strategy", ["single", "fsdp", "deepspeed"])
def test_checkpoints_and_final_hold_exactly_what_each_method_declares(
    tmp_path: Path, toy_data: dict, strategy: str
) -> None:
    """Whatever the strategy, a checkpoint's model state holds the trained tensors (a frozen tensor is the base
    model's) and final/ what the method declares: the whole model for full, only the added tensors otherwise.
    (FSDP once decided its checkpoint by one rule and its final/ by another.)"""
    from helpers import build_model as build_tiny

    from launcher.config_loading import load_config
    from launcher.methods import method_for
    from launcher.model import build_model
    from launcher.strategies.traits import traits

    # hidden 64: bitsandbytes' CPU 4-bit kernels want in_features a multiple of their block size (test_train.py)
    base = build_tiny(tmp_path / "model64", hidden_size=64, intermediate_size=128)
    cfg = base_config(
        tmp_path,
        base,
        toy_data["completion"],
        train={"micro_batch_size": 2},
        distributed={"strategy": strategy, **({"zero_stage": 3} if strategy == "deepspeed" else {})},
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    # ZeRO-3's float storage meets bitsandbytes' CPU repacking of 64-wide layers (QLoRA + ZeRO-3: test_deepspeed.py)
    kinds = [k for k in KINDS if strategy != "deepspeed" or not k.startswith("qlora")]
    _drive(1, path, "save", tmp_path, ",".join(kinds))
    for item in kinds:
        kind, *own = item.split("+")
        run = load_config(path, [*own, f"method.kind={kind}"])
        method, model = method_for(run), build_model(run, torch.device("cpu"))
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        everything = {n for n, _ in model.named_parameters()}
        assert trained and (trained < everything if "freeze" in item or method.adapters else trained == everything)
        checkpoint = traits(strategy).read_weights(tmp_path / item / "ckpt")
        assert set(checkpoint) == {n for n, _ in method.checkpoint_parameters(model)} == trained, item
        final = _safetensors(tmp_path / item / "save-final")
        declared = method.final_parameters(model)
        assert {n for n, _ in declared} == (trained if method.adapters else everything), item
        assert _numel(final) == sum(p.numel() for _, p in declared), item
