"""End-to-end runs of `ftl train` on tiny real models: learning, artifacts, reload, QLoRA, DDP, W&B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base_config, ftl, read_metrics, write_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from launcher.config_loading import load_config
from launcher.data import collate
from launcher.data.tokenized import tokenize_rows
from launcher.launch.allocator import find_tcmalloc
from launcher.loss import causal_lm_loss_sum


def _train(tmp_path: Path, cfg: dict, *overrides: str, nproc: int = 0) -> Path:
    path = write_config(tmp_path / "cfg.yaml", cfg)
    args = ["train", str(path), *overrides] + (["--nproc", str(nproc)] if nproc else [])
    res = ftl(*args)
    assert res.returncode == 0, res.stderr[-4000:]
    return Path(load_config(path, list(overrides)).output_dir)


def _eval_loss_of(model: torch.nn.Module, tok_dir: Path, eval_file: Path) -> float:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [json.loads(x) for x in eval_file.read_text().splitlines()]
    s = tokenize_rows(rows, "completion", tok, 64, mask_prompt=True)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(s), 4):
            total += float(causal_lm_loss_sum(model.eval(), collate(s, range(i, min(i + 4, len(s))), tok.pad_token_id)))
    return total / s.num_label_tokens


@pytest.mark.parametrize(("arch", "kind"), [("llama", "full"), ("qwen2", "lora"), ("gpt_neox", "lora")])
def test_loss_falls_and_run_dir_is_complete(tmp_path: Path, models: dict, toy_data: dict, arch: str, kind: str) -> None:
    cfg = base_config(
        tmp_path,
        models[arch],
        toy_data["completion"],
        method={"kind": kind},
        train={"max_steps": 30, "lr": 3e-3 if kind == "full" else 1e-2, "warmup_steps": 2},
    )
    run = _train(tmp_path, cfg)
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= set(rows[0])
    assert rows[-1]["tokens"] > rows[0]["tokens"] > 0
    assert all(0 < r["mfu"] < 1 for r in rows)  # a tiny model uses a sliver of the measured CPU peak
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.85 * first, (first, last)
    assert (run / "loss.png").stat().st_size > 1000 and (run / "config.yaml").is_file()
    final = run / "final"
    assert (final / ("adapter_config.json" if kind == "lora" else "config.json")).is_file()
    assert (final / "tokenizer_config.json").is_file()


def test_lora_adapter_reloads_and_reproduces_the_trained_model(tmp_path: Path, models: dict, toy_data: dict) -> None:
    from peft import PeftModel

    cfg = base_config(
        tmp_path, models["llama"], toy_data["completion"], method={"kind": "lora"}, train={"max_steps": 6, "lr": 1e-2}
    )
    cfg["data"]["eval"] = str(toy_data["completion"])
    run = _train(tmp_path, cfg)
    eval_rows = [r for r in read_metrics(run) if "eval_loss" in r]
    base = AutoModelForCausalLM.from_pretrained(models["llama"], attn_implementation="sdpa")
    before = _eval_loss_of(base, models["llama"], toy_data["completion"])
    reloaded = PeftModel.from_pretrained(base, run / "final")
    after = _eval_loss_of(reloaded, run / "final", toy_data["completion"])
    assert after == pytest.approx(eval_rows[-1]["eval_loss"], rel=1e-5)  # the trained model's own eval loss
    assert after < before - 1e-3  # and the adapter really changed the model

    out = tmp_path / "merged"
    res = ftl("export", str(run), "--merge", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    assert _eval_loss_of(merged, out, toy_data["completion"]) == pytest.approx(after, rel=1e-5)


def _file_mappings(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files named *suffix (Linux)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(suffix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def test_qlora_trains_4bit_and_merges(tmp_path: Path, models: dict, toy_data: dict) -> None:
    import bitsandbytes as bnb
    from helpers import build_model as build_tiny
    from peft import PeftModel

    from launcher.export import merged_model
    from launcher.model import build_model

    # in_features a multiple of the 4-bit block size (64): on CPUs with AVX512-BF16, bitsandbytes repacks
    # 4-bit weights for inference and fails on narrower layers (hidden 32), which no real model has
    base = build_tiny(tmp_path / "model64", hidden_size=64, intermediate_size=128)
    cfg = base_config(
        tmp_path,
        base,
        toy_data["completion"],
        method={"kind": "qlora", "qlora": {"compute_dtype": "float32"}},
        train={"max_steps": 12, "lr": 1e-2},
    )
    cfg["data"]["eval"] = str(toy_data["completion"])
    run = _train(tmp_path, cfg)
    conf = load_config(run / "config.yaml")
    model = build_model(conf, torch.device("cpu"))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # every linear of both blocks is 4-bit (the head stays dense)
    mapped = _file_mappings(".safetensors")  # no weight is left a view of the checkpoint file (it pins it all)
    assert not any(a <= p.untyped_storage().data_ptr() < b for p in model.parameters() for a, b in mapped)
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    reloaded = PeftModel.from_pretrained(model.base_model.model, run / "final")
    trained_eval = [r for r in read_metrics(run) if "eval_loss" in r][-1]["eval_loss"]
    assert _eval_loss_of(reloaded, run / "final", toy_data["completion"]) == pytest.approx(trained_eval, rel=1e-4)
    merged = merged_model(conf, run / "final")
    assert _eval_loss_of(merged, run / "final", toy_data["completion"]) == pytest.approx(trained_eval, rel=1e-3)


def test_sequence_classification_reports_accuracy(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = base_config(
        tmp_path,
        models["bert"],
        toy_data["classification"],
        model={"path": str(models["bert"]), "task": "sequence_classification"},
        data={"format": "classification", "eval_fraction": 0.25},
        method={"kind": "full"},
        train={"max_steps": 8},
    )
    run = _train(tmp_path, cfg)
    evals = [r for r in read_metrics(run) if "eval_loss" in r]
    assert evals and 0.0 <= evals[-1]["eval_accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.num_labels == 2


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_ddp_two_ranks_equal_one_rank_with_accumulation(
    tmp_path: Path, models: dict, toy_data: dict, kind: str
) -> None:
    def run(sub: str, nproc: int, accum: int) -> Path:
        cfg = base_config(
            tmp_path / sub,
            models["llama"],
            toy_data["completion"],
            method={"kind": kind, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            train={"max_steps": 5, "micro_batch_size": 2, "grad_accum": accum, "lr": 1e-2},
        )
        (tmp_path / sub).mkdir()
        return _train(tmp_path / sub, cfg, "distributed.strategy=" + ("ddp" if nproc else "single"), nproc=nproc)

    ref, ddp = run("one", 0, 2), run("two", 2, 1)
    ref_loss = [r["loss"] for r in read_metrics(ref)]
    ddp_loss = [r["loss"] for r in read_metrics(ddp)]
    assert ddp_loss == pytest.approx(ref_loss, rel=1e-4)
    norms = lambda run: [r["grad_norm"] for r in read_metrics(run)]  # noqa: E731
    assert norms(ddp) == pytest.approx(norms(ref), rel=1e-4)  # gradients are summed, not averaged, over ranks
    from resume_utils import final_weights, max_weight_diff

    assert max_weight_diff(final_weights(ref), final_weights(ddp)) < 1e-5


def test_gradient_checkpointing_and_bf16_run(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = base_config(
        tmp_path, models["llama"], toy_data["completion"], method={"kind": "lora"}, train={"max_steps": 3}
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    res = ftl("train", str(path), "output_dir=" + str(tmp_path / "plain"))  # auto: a tiny model needs none
    assert "gradient checkpointing auto -> off" in res.stderr, res.stderr[-3000:]
    assert "gradient_checkpointing=off" in res.stderr  # read from the model, not from the config
    plain = tmp_path / "plain"
    res = ftl("train", str(path), "output_dir=" + str(tmp_path / "gc"), "train.gradient_checkpointing=true")
    assert "gradient_checkpointing=on" in res.stderr, res.stderr[-3000:]
    ckpt = tmp_path / "gc"
    assert [r["loss"] for r in read_metrics(ckpt)] == pytest.approx([r["loss"] for r in read_metrics(plain)], rel=1e-5)
    bf16 = _train(
        tmp_path,
        cfg,
        "output_dir=" + str(tmp_path / "bf16"),
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
    )
    losses = [r["loss"] for r in read_metrics(bf16)]
    assert all(0 < x < 10 for x in losses)
    assert losses != [r["loss"] for r in read_metrics(plain)]  # autocast really changed the arithmetic


def test_output_dir_of_another_config_is_never_reused(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = base_config(tmp_path, models["llama"], toy_data["completion"], train={"max_steps": 2})
    run = _train(tmp_path, cfg)
    before = (run / "metrics.jsonl").read_text()
    res = ftl("train", str(tmp_path / "cfg.yaml"), "train.lr=0.5")
    assert res.returncode == 2 and "output_dir" in res.stderr and "train.lr" in res.stderr
    assert (run / "metrics.jsonl").read_text() == before


def test_wandb_offline_logs_the_run(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        train={"max_steps": 2},
        logging={"wandb": {"enabled": True, "mode": "offline", "project": "t"}},
    )
    run = _train(tmp_path, cfg)
    run_id = (run / "wandb_id.txt").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_loss_is_the_token_weighted_mean_of_the_global_batch(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """4 rows in one micro-batch == the same 4 rows as 2 micro-batches of 2 (rows of different lengths: a mean of
    micro-batch means would differ)."""

    def run(sub: str, micro: int, accum: int) -> Path:
        train = {"max_steps": 4, "micro_batch_size": micro, "grad_accum": accum, "lr": 1e-2}
        cfg = base_config(tmp_path / sub, models["llama"], toy_data["completion"], train=train)
        (tmp_path / sub).mkdir()
        return _train(tmp_path / sub, cfg)

    whole, split = run("whole", 4, 1), run("split", 2, 2)
    loss = lambda r: [x["loss"] for x in read_metrics(r)]  # noqa: E731
    assert loss(split) == pytest.approx(loss(whole), rel=1e-5)
    from resume_utils import final_weights, max_weight_diff

    assert max_weight_diff(final_weights(whole), final_weights(split)) < 1e-5


def test_lr_follows_warmup_then_cosine(tmp_path: Path, models: dict, toy_data: dict) -> None:
    train = {"max_steps": 8, "lr": 1e-3, "warmup_steps": 3, "schedule": "cosine"}
    run = _train(tmp_path, base_config(tmp_path, models["llama"], toy_data["completion"], train=train))
    lrs = [r["lr"] for r in read_metrics(run)]
    import math

    warm = [1e-3 * (k + 1) / 4 for k in range(3)]  # linear warmup to the peak
    decay = [1e-3 * 0.5 * (1 + math.cos(math.pi * (k - 3) / 5)) for k in range(3, 8)]
    assert lrs == pytest.approx(warm + decay, rel=1e-9)


@pytest.mark.parametrize("nproc", [0, 2], ids=["single", "ddp"])
def test_gradient_clipping_bounds_the_update(tmp_path: Path, models: dict, toy_data: dict, nproc: int) -> None:
    """One SGD step of lr 1 with max_grad_norm 1e-4: the whole update has norm 1e-4 (unclipped it is ~1)."""
    from safetensors.torch import load_file

    train = {"max_steps": 1, "optimizer": "sgd", "lr": 1.0, "max_grad_norm": 1e-4, "warmup_steps": 0}
    cfg = base_config(tmp_path, models["llama"], toy_data["completion"], train=train)
    strategy = "distributed.strategy=" + ("ddp" if nproc else "single")
    run = _train(tmp_path, cfg, strategy, nproc=nproc)
    before, after = load_file(models["llama"] / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    update = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    assert 0.5e-4 < float(update) <= 1.001e-4
    assert read_metrics(run)[0]["grad_norm"] > 1e-2  # the norm before clipping was far larger


@pytest.mark.skipif(find_tcmalloc() is None, reason="libtcmalloc-minimal4 is not installed (CI installs it)")
def test_training_runs_under_tcmalloc_unless_opted_out(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """The allocator named in the log is read from the process's memory map: it is the one really loaded."""
    cfg = base_config(tmp_path, models["llama"], toy_data["completion"], train={"max_steps": 1})
    path = write_config(tmp_path / "cfg.yaml", cfg)
    res = ftl("train", str(path))
    assert res.returncode == 0 and "host_allocator=tcmalloc" in res.stderr, res.stderr[-3000:]
    res = ftl("train", str(path), "output_dir=" + str(tmp_path / "glibc"), env={"FTL_ALLOCATOR": "system"})
    assert res.returncode == 0 and "host_allocator=glibc malloc" in res.stderr, res.stderr[-3000:]
    res = ftl("train", str(path), "output_dir=" + str(tmp_path / "ranks"), "--nproc", "2")  # each rank too
    assert res.returncode == 0 and "host_allocator=tcmalloc" in res.stderr, res.stderr[-3000:]


def test_a_lora_run_prints_no_library_noise(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """A plain LoRA run in fp32 prints ftl's lines and progress, not warnings from libraries about paths it does
    not take (bitsandbytes' hub kernel, DeepSpeed's accelerator, deprecations peft triggers)."""
    cfg = base_config(tmp_path, models["llama"], toy_data["chat"], method={"kind": "lora"}, data={"format": "chat"})
    res = ftl("train", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert res.returncode == 0, res.stderr[-4000:]
    noise = [
        line
        for line in (res.stdout + res.stderr).splitlines()
        if any(word in line for word in ("Warning", "WARNING", "Failed", "warnings.warn"))
    ]
    assert not noise, noise
