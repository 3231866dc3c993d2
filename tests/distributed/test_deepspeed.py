"""`distributed.strategy: deepspeed` on real 2-rank CPU/gloo process groups: ZeRO-1/2/3 (+ CPU offload) numerics
against a 1-rank reference, real sharding, QLoRA under ZeRO-3, bf16 + gradient checkpointing, config
contradictions, and checkpoints (same world size, and 2 → 1 ranks through a universal checkpoint).

Starting a rank costs seconds of imports, so one launch runs several configs: this file is also the driver
(`python test_deepspeed.py train CFG...` runs `ftl train CFG` for each config in the same ranks, keeping the
process group between runs; `... ckpt save|resume CFG...` drives the checkpoint hooks directly).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # helpers, when run as the driver

from helpers import ROOT, base_config, ftl, read_metrics, write_config

from launcher.world import free_port

pytestmark = pytest.mark.slow
THIS = Path(__file__).resolve()
STEPS = 5
# name → (distributed fields, micro_batch_size, grad_accum); every run's global batch is 8 samples
MATRIX: dict[str, tuple[dict[str, Any], int, int]] = {
    "zero1": ({"zero_stage": 1}, 2, 2),
    "zero2": ({"zero_stage": 2}, 4, 1),
    "zero3": ({"zero_stage": 3}, 2, 2),
    "zero3_offload_optimizer": ({"zero_stage": 3, "offload": "optimizer"}, 4, 1),
    "zero3_offload_params": ({"zero_stage": 3, "offload": "params"}, 4, 1),
}


# ----------------------------------------------------------------------------------------- launching
def _launch(nproc: int, logs: Path, *jobs: str, timeout: int = 900, driver: Path = THIS) -> None:
    """Run this file as the driver on nproc ranks (a plain process when 1) over `jobs` (train=CFG, save=CFG,
    resume=CFG, in order; another `driver` script takes its own jobs); fail with the logs' tails."""
    logs.mkdir(parents=True, exist_ok=True)
    port, procs, files = str(free_port()), [], []
    for rank in range(nproc):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if nproc > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1")
            env["MASTER_PORT"] = port
        out = (logs / f"world{nproc}-rank{rank}.log").open("w")
        files.append(out)
        cmd = [sys.executable, str(driver), *jobs]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()
    tails = "\n".join(Path(f.name).read_text()[-3000:] for f in files)
    assert codes == [0] * nproc, tails


def _cfg(tmp: Path, name: str, models: dict, toy_data: dict, kind: str, **sections: Any) -> Path:
    """Write a 5-step fp32 config for `name` (output_dir tmp/name; `sections` update base_config's) and return
    its path."""
    cfg = base_config(
        tmp,
        models["llama"],
        toy_data["completion"],
        method={"kind": kind},
        train={"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 4, "lr": 1e-2},
        distributed={"strategy": "single", "timeout_minutes": 5},
    )
    for section, values in sections.items():
        cfg[section].update(values)
    cfg["output_dir"] = str(tmp / name)
    return write_config(tmp / f"{name}.yaml", cfg)


def _ds_cfg(tmp: Path, name: str, models: dict, toy_data: dict, kind: str) -> Path:
    fields, micro, accum = MATRIX[name.split("-")[0]]
    return _cfg(
        tmp,
        name,
        models,
        toy_data,
        kind,
        distributed={"strategy": "deepspeed", **fields},
        train={"micro_batch_size": micro, "grad_accum": accum},
    )


# ----------------------------------------------------------------------------------------- reading runs
def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def _weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    final = run / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else "model.safetensors"
    return load_file(final / name)


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _sharding(run: Path) -> dict[str, Any]:
    report = json.loads((run / "sharding.json").read_text())
    assert report["strategy"] == "deepspeed" and len(report["ranks"]) == 2
    return report


# ----------------------------------------------------------------------------------------- fixtures
def _qlora_cfg(tmp: Path, models: dict, toy_data: dict) -> Path:
    """QLoRA from a user JSON ("auto" sizes, stage 3) that partitions even the tiny 4-bit weights."""
    user = tmp / "qlora_ds.json"
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": "auto"}
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 1.0, "zero_optimization": zero}
    user.write_text(json.dumps(ds))
    return _cfg(
        tmp,
        "qlora-zero3",
        models,
        toy_data,
        "qlora",
        distributed={"strategy": "deepspeed", "deepspeed_config": str(user)},
        method={"kind": "qlora", "qlora": {"compute_dtype": "float32"}, "lora": {"r": 8, "dropout": 0.0}},
        train={"micro_batch_size": 2, "grad_accum": 1, "max_steps": 6, "lr": 2e-2, "schedule": "constant"},
    )


def _ckpt_cfgs(tmp: Path, models: dict, toy_data: dict) -> tuple[list[Path], list[Path]]:
    """ZeRO-3 LoRA (frozen base excluded) and ZeRO-2 full: 2-rank save configs and their 1-rank resume configs."""
    two, one = [], []
    for name, kind, stage in (("ckpt_z3-lora", "lora", 3), ("ckpt_z2-full", "full", 2)):
        for world, accum, out in ((2, 1, two), (1, 2, one)):
            dist = {"strategy": "deepspeed", "zero_stage": stage}
            train = {"micro_batch_size": 2, "grad_accum": accum, "max_steps": 4}
            out.append(_cfg(tmp, f"{name}-{world}", models, toy_data, kind, distributed=dist, train=train))
    return two, one


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, models: dict, toy_data: dict) -> dict[str, Path]:
    """Every 2-rank run (one launch), then the 1-rank references and checkpoint resumes (one launch):
    name → run dir. Ranks cost seconds of imports each, so each launch runs many configs."""
    tmp = tmp_path_factory.mktemp("ds")
    refs = [_cfg(tmp, f"ref-{kind}", models, toy_data, kind) for kind in ("full", "lora")]
    matrix = [_ds_cfg(tmp, f"{name}-{kind}", models, toy_data, kind) for name in MATRIX for kind in ("full", "lora")]
    qlora = _qlora_cfg(tmp, models, toy_data)
    save, resume = _ckpt_cfgs(tmp, models, toy_data)
    _launch(2, tmp / "logs", *[f"train={p}" for p in [*matrix, qlora]], *[f"save={p}" for p in save])
    _launch(1, tmp / "logs", *[f"train={p}" for p in refs], *[f"resume={p}" for p in resume])
    return {p.stem: tmp / p.stem for p in [*refs, *matrix, qlora, *save, *resume]}


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_zero_stages_match_the_single_process_reference(runs: dict[str, Path], kind: str) -> None:
    """zero1/2/3 and zero3 + offload, 2 ranks: same per-step losses, grad norms and final weights as 1 rank."""
    ref = runs[f"ref-{kind}"]
    ref_losses, ref_weights = _losses(ref), _weights(ref)
    ref_norms = [r["grad_norm"] for r in read_metrics(ref) if "loss" in r]
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]
    for name in MATRIX:
        run = runs[f"{name}-{kind}"]
        assert _losses(run) == pytest.approx(ref_losses, rel=1e-4), name
        norms = [r["grad_norm"] for r in read_metrics(run) if "loss" in r]
        assert norms == pytest.approx(ref_norms, rel=1e-4), name  # summed over ranks, clipped by DeepSpeed
        assert _max_diff(_weights(run), ref_weights) < 1e-5, name


def test_sharding_is_real(runs: dict[str, Path]) -> None:
    """ZeRO-3 ranks hold about half the parameters; every stage holds half the AdamW state (2 tensors/param)."""
    for name in MATRIX:
        for kind in ("full", "lora"):
            report = _sharding(runs[f"{name}-{kind}"])
            total, trainable = report["total_params"], report["trainable_params"]
            for r in report["ranks"]:
                assert r["optimizer_state"] == pytest.approx(trainable, rel=0.02), (name, kind, r, trainable)
                if report["zero_stage"] == 3:  # built under zero.Init: no rank ever held the whole base
                    assert r["materialised_at_load"] <= (trainable if kind == "lora" else 0), (name, kind, r)
                if report["zero_stage"] == 3 and kind == "full":
                    assert r["params"] == pytest.approx(total / 2, rel=0.02), (name, r, total)
                elif report["zero_stage"] == 3:  # the frozen base is partitioned, the tiny adapters persist
                    assert r["params"] < 0.6 * total, (name, r, total)
                else:
                    assert r["params"] == total, (name, r, total)


def test_lora_adapter_reloads_and_reproduces_the_trained_logits(runs: dict[str, Path], models: dict) -> None:
    """The ZeRO-3 adapter, gathered by rank 0, reloads with PeftModel and gives the reference model's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2, 50, 8, 9, 10, 11, 3]])
    logits = []
    for name in ("ref-lora", "zero3-lora"):
        base = AutoModelForCausalLM.from_pretrained(models["llama"])
        model = PeftModel.from_pretrained(base, runs[name] / "final").eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()(input_ids=ids).logits
    assert float((logits[0] - logits[1]).abs().max()) < 1e-4
    assert float((logits[1] - base_logits).abs().max()) > 1e-3  # the adapter really changed the model


def test_qlora_zero3_trains(runs: dict[str, Path]) -> None:
    """QLoRA under ZeRO-3 (4-bit weights in float storage, partitioned): finite, falling losses; adapter saved."""
    run = runs["qlora-zero3"]
    losses = _losses(run)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05, losses
    adapter = _weights(run)
    assert adapter and all("lora_" in k for k in adapter)
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in adapter.values())  # fp32 adapters
    report = _sharding(run)
    assert all(r["optimizer_state"] == pytest.approx(report["trainable_params"], rel=0.02) for r in report["ranks"])
    assert report["zero_stage"] == 3 and report["linear4bit"] == 2 * 7  # the partitioned base is really 4-bit
    assert all(r["params"] == pytest.approx(report["total_params"] / 2, rel=0.02) for r in report["ranks"])


def test_bf16_gradient_checkpointing_zero3_through_the_cli(
    tmp_path: Path, models: dict, toy_data: dict, runs: dict[str, Path]
) -> None:
    """`ftl train --nproc 2` with bf16 and gradient checkpointing under ZeRO-3 (tiny model): close to the fp32
    reference, and the export holds the fp32 master weights."""
    path = _cfg(
        tmp_path,
        "bf16",
        models,
        toy_data,
        "full",
        distributed={"strategy": "deepspeed", "zero_stage": 3},
        train={
            "micro_batch_size": 2,
            "grad_accum": 2,
            "max_steps": 4,
            "precision": "bf16",
            "gradient_checkpointing": True,
        },
    )
    res = ftl("train", str(path), "--nproc", "2")
    assert res.returncode == 0, res.stderr[-4000:]
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert losses[:2] == pytest.approx(_losses(runs["ref-full"])[:2], rel=0.02)  # bf16 rounding only
    assert _sharding(tmp_path / "bf16")["zero_stage"] == 3
    weights = _weights(tmp_path / "bf16")
    assert (tmp_path / "bf16" / "final" / "config.json").is_file()
    assert weights and all(str(t.dtype) == "torch.float32" for t in weights.values())


def test_contradicting_user_json_is_exit_2_naming_both(tmp_path: Path, models: dict, toy_data: dict) -> None:
    user = tmp_path / "my_ds.json"
    user.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 8,
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": 0.5,
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": 2},
            }
        )
    )
    path = _cfg(
        tmp_path, "bad", models, toy_data, "lora", distributed={"strategy": "deepspeed", "deepspeed_config": str(user)}
    )
    res = ftl("train", str(path))
    assert res.returncode == 2, res.stderr[-3000:]
    for words in (
        ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
        ("gradient_clipping", "train.max_grad_norm"),
        ('"bf16.enabled"', "train.precision"),
    ):
        line = next((x for x in res.stderr.splitlines() if words[0] in x), "")
        assert str(user) in line and words[1] in line, res.stderr[-3000:]
    assert not (tmp_path / "bad" / "final").exists()


def test_config_checks_without_a_process(tmp_path: Path) -> None:
    """The cheap check (no torch, no ranks): presets fill "auto", contradictions and bad combinations are named."""
    from launcher.config import Config
    from launcher.errors import ConfigError
    from launcher.strategies.ds_config import build_ds_config, config_problems

    cfg = Config.model_validate(
        {
            "distributed": {"strategy": "deepspeed", "zero_stage": 3, "offload": "params"},
            "train": {"micro_batch_size": 3, "grad_accum": 2, "max_grad_norm": None},
        }
    )
    ds = build_ds_config(cfg, world_size=4, hidden_size=32)
    sizes = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]
    assert sizes == (3, 2, 24)
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and "offload_param" in zero and "offload_optimizer" not in zero
    assert zero["stage3_param_persistence_threshold"] == 320
    assert "auto" not in json.dumps(ds)
    bad = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"zero_stage": 2})})
    assert any("distributed.offload" in p and "ZeRO-3" in p for p in config_problems(bad))
    user = tmp_path / "u.json"
    user.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 1}, "optimizer": {}}))
    mine = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"deepspeed_config": str(user)})})
    problems = config_problems(mine, world_size=4)
    assert any('"train_batch_size" is 16' in p and "24" in p for p in problems), problems
    assert any('"zero_optimization.stage" is 1' in p and "distributed.zero_stage" in p for p in problems)
    assert any('"optimizer"' in p and "train.optimizer" in p for p in problems)
    with pytest.raises(ConfigError):
        build_ds_config(mine, world_size=4)


def test_checkpoints_resume_on_the_same_and_a_smaller_world(runs: dict[str, Path]) -> None:
    """save at step 2 on 2 ranks → steps 3-4; reload on those ranks → same losses; 1 rank loads it through a
    universal checkpoint (ftl converts) and reproduces them too. ZeRO-3 LoRA (frozen base excluded) and ZeRO-2."""
    for name in ("ckpt_z3-lora", "ckpt_z2-full"):
        two, one = runs[f"{name}-2"], runs[f"{name}-1"]
        saved = json.loads((two / "ckpt.json").read_text())
        resumed = json.loads((one / "ckpt.json").read_text())
        assert len(saved["after"]) == 2 and saved["after"] != saved["before"]
        assert saved["reloaded"] == pytest.approx(saved["after"], rel=1e-5), name
        assert resumed["resumed"] == pytest.approx(saved["after"], rel=1e-5), name
        assert json.loads((two / "ckpt" / "ftl_deepspeed.json").read_text())["world_size"] == 2
        assert (two / ".ckpt.universal" / "ftl_converted").is_file()
        if "lora" in name:  # the frozen base is not in the checkpoint (our own file: a pickle is fine here)
            import torch

            states = torch.load(next((two / "ckpt").rglob("*model_states.pt")), weights_only=False)
            assert states["module"] and all("lora_" in k for k in states["module"]), list(states["module"])[:5]


# ----------------------------------------------------------------------------------------- the driver
def _steps(run: Any, start: int, stop: int) -> list[float]:
    """Losses of optimizer steps start+1..stop (of a 4-step schedule)."""
    from launcher.checkpoint import TrainState
    from launcher.trainer import optimizer_step

    state = TrainState(step=start)
    return [optimizer_step(run, state)["loss"] for _ in range(start, stop)]


def _checkpoint_job(phase: str, config: str) -> None:
    """save: steps 1-2, save, steps 3-4 (after), load, steps 3-4 again (reloaded).
    resume: load the matching 2-rank run's checkpoint, steps 3-4 (resumed). Rank 0 writes OUTPUT_DIR/ckpt.json."""
    import dataclasses
    import functools

    from launcher.config_loading import load_config
    from launcher.dist import init_distributed
    from launcher.model import load_tokenizer
    from launcher.optim import optimizer_factory
    from launcher.prepare import prepare_data
    from launcher.run_start import make_collator
    from launcher.trainer import plan_run

    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    env = init_distributed(cfg.distributed.timeout_minutes)
    context = dataclasses.replace(plan_run(cfg, env, Path(cfg.output_dir), data), steps=4)
    strategy = context.strategy
    model = strategy.build_model()
    strategy.setup(model, optimizer_factory(cfg.train, model))
    strategy.model.train()
    context.collate = make_collator(context, tokenizer)
    steps = functools.partial(_steps, context)
    run = Path(cfg.output_dir)
    out: dict[str, list[float]] = {}
    if phase == "save":
        out["before"] = steps(0, 2)
        strategy.save_checkpoint(run / "ckpt")
        out["after"] = steps(2, 4)
        strategy.load_checkpoint(run / "ckpt")
        out["reloaded"] = steps(2, 4)
    else:
        strategy.load_checkpoint(run.with_name(run.name[: -len("-1")] + "-2") / "ckpt")
        out["resumed"] = steps(2, 4)
    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "ckpt.json").write_text(json.dumps(out))


def _drive(jobs: list[str]) -> int:
    """Run train=CFG (`ftl train CFG` in these ranks), save=CFG and resume=CFG jobs in order, keeping the
    process group between them."""
    import launcher.trainer as trainer
    from launcher.cli import main
    from launcher.dist import DistEnv, shutdown

    trainer.shutdown = lambda env: None
    code = 0
    for job in jobs:
        kind, _, config = job.partition("=")
        if kind == "train":
            code = max(code, main(["train", config]))
        else:
            _checkpoint_job(kind, config)
    shutdown(DistEnv(world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    return code


if __name__ == "__main__":
    sys.exit(_drive(sys.argv[1:]))
