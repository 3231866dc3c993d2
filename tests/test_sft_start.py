"""SFT then DPO (issue 18): `model.adapter` starts a LoRA run from an SFT run's final/, and DPO's reference is
then that SFT model (a frozen copy of the adapter), never the bare base."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import base_config, ftl, read_metrics, reverse_rows, write_config, write_jsonl
from safetensors.torch import load_file
from test_dpo import preference_rows

from launcher.checkpoint import TrainState
from launcher.cli import main
from launcher.config_loading import load_config
from launcher.data.pair_batches import PairCollator
from launcher.data.preference import tokenize_pairs
from launcher.dist import init_distributed
from launcher.errors import ConfigError
from launcher.estimate import parameter_bytes, read_shape
from launcher.export import checkpoint_weights, export_run
from launcher.methods.lora_start import REFERENCE, TRAINED
from launcher.model import build_meta_model, build_model, load_tokenizer
from launcher.objectives import objective_for
from launcher.objectives.dpo import sequence_logps
from launcher.optim import optimizer_factory
from launcher.prepare import prepare_data
from launcher.run_start import make_collator
from launcher.trainer import optimizer_step, plan_run

LN2 = math.log(2)
LORA = {"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


@pytest.fixture(scope="module")
def sft_final(tmp_path_factory: pytest.TempPathFactory, models: dict) -> Path:
    """A real `ftl train` SFT LoRA run (3 steps, a high LR so the adapter moves far from zero): its final/."""
    tmp = tmp_path_factory.mktemp("sft")
    data = write_jsonl(tmp / "sft.jsonl", reverse_rows(32, seed=2))
    cfg = base_config(tmp, models["llama"], data, method=LORA, train={"max_steps": 3, "lr": 3e-2})
    res = ftl("train", str(write_config(tmp / "cfg.yaml", cfg)))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run" / "final"


def dpo_config(tmp: Path, base: Path, rows: list[dict], adapter: Path | None, **sections: dict) -> Path:
    """A DPO LoRA run on `rows` starting from `adapter` (None: a new adapter)."""
    tmp.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp / "pairs.jsonl", rows)
    model = {"adapter": str(adapter)} if adapter else {}
    cfg = base_config(tmp, base, data, method=LORA, data={"format": "preference"}, objective={"kind": "dpo"})
    for name, values in {"model": model, **sections}.items():
        cfg[name].update(values)
    return write_config(tmp / "cfg.yaml", cfg)


def adapter_state(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under the names PEFT saves them with (copies)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def start_run(path: Path):
    """A run built in this process, as `ftl train` builds it (before any step)."""
    cfg = load_config(path)
    tokenizer = load_tokenizer(cfg)
    run = plan_run(cfg, init_distributed(1), Path(cfg.output_dir), prepare_data(cfg, tokenizer))
    model = run.strategy.build_model()
    run.strategy.setup(model, optimizer_factory(cfg.train, model))
    run.collate = make_collator(run, tokenizer)
    return run, model, tokenizer


def test_dpo_from_sft_adapter_compares_with_the_sft_model(tmp_path: Path, models: dict, sft_final: Path) -> None:
    """The policy starts from the SFT adapter bitwise; the reference is the SFT model (PEFT's own load of final/
    gives the same log-probs), not the base; step 1 is ln 2; training moves the policy, never the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = preference_rows(32)
    train = {"max_steps": 3, "lr": 1e-2, "schedule": "constant"}
    path = dpo_config(tmp_path, models["llama"], rows, sft_final, train=train)
    run, model, tokenizer = start_run(path)
    saved = load_file(sft_final / "adapter_model.safetensors")
    policy, reference = adapter_state(model, TRAINED), adapter_state(model, REFERENCE)
    assert set(policy) == set(reference) == set(saved)
    assert all(torch.equal(policy[k], saved[k]) and torch.equal(reference[k], saved[k]) for k in saved)
    fresh = adapter_state(build_model(load_config(path, ["model.adapter=null"]), torch.device("cpu")), TRAINED)
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved if "lora_B" in k)  # not a new adapter
    assert all(not p.requires_grad for n, p in model.named_parameters() if f".{REFERENCE}." in n)

    batch = PairCollator(tokenizer.pad_token_id)(tokenize_pairs([dict(r) for r in rows[:6]], tokenizer, 64), range(6))
    ours = objective_for(run.cfg).reference_logps(model, batch)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(models["llama"])
        base_logps = sequence_logps(base, batch)[0]
        sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]), sft_final).eval()
        sft_logps = sequence_logps(sft, batch)[0]
    assert torch.allclose(ours, sft_logps, atol=1e-5, rtol=0)
    assert (ours - base_logps).abs().max() > 1e-2  # the SFT adapter really changed the model

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state, rows_out = TrainState(), []
    for _ in range(3):
        rows_out.append(optimizer_step(run, state))
    first = rows_out[0]
    assert abs(first["loss"] - LN2) < 1e-6
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert abs(rows_out[-1]["loss"] - LN2) > 1e-4
    after = adapter_state(model, REFERENCE)
    assert all(torch.equal(after[k], reference[k]) for k in reference)  # the reference stays the SFT model
    assert any(not torch.equal(adapter_state(model, TRAINED)[k], saved[k]) for k in saved)  # the policy moved
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # the view restores flags


def test_dpo_from_sft_adapter_final_and_resume(tmp_path: Path, models: dict, sft_final: Path) -> None:
    """`ftl train`: step 1 is ln 2; checkpoints and final/ hold only the trained adapter (final/ loads with PEFT
    and differs from the SFT adapter); a resumed run (the frozen copy reloaded from model.adapter) continues
    exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train = {"max_steps": 4, "lr": 1e-2, "schedule": "constant"}
    whole = dpo_config(tmp_path / "whole", models["llama"], preference_rows(32), sft_final, train=train)
    res = ftl("train", str(whole))
    assert res.returncode == 0, res.stderr[-3000:]
    expected = [r for r in read_metrics(tmp_path / "whole" / "run") if "loss" in r]
    assert abs(expected[0]["loss"] - LN2) < 1e-6

    final = tmp_path / "whole" / "run" / "final"
    assert not (final / REFERENCE).exists() and not any(p.is_dir() for p in final.iterdir())
    trained = load_file(final / "adapter_model.safetensors")
    sft = load_file(sft_final / "adapter_model.safetensors")
    assert set(trained) == set(sft) and any(not torch.equal(trained[k], sft[k]) for k in sft)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]), final)
    assert list(loaded.peft_config) == ["default"]

    parts = dpo_config(tmp_path / "parts", models["llama"], preference_rows(32), sft_final, train=train)
    first = ftl("train", str(parts), "train.max_steps=3", "checkpoint.every_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    (ckpt,) = (tmp_path / "parts" / "run" / "checkpoints").iterdir()
    assert not [k for k in checkpoint_weights(ckpt) if f".{REFERENCE}." in k]  # the frozen copy is not saved
    second = ftl("train", str(parts), "checkpoint.every_steps=2")
    assert second.returncode == 0 and "at step 2 " in second.stderr, second.stderr[-3000:]
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "parts" / "run") if "loss" in r}
    for row in expected[2:]:
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert resumed[row["step"]][key] == pytest.approx(row[key], abs=1e-6), (row["step"], key)


def test_first_step_from_an_adapter_is_ln2_under_ddp(tmp_path: Path, models: dict, sft_final: Path) -> None:
    """Two processes: the reference adapter is switched in on the module inside DDP's wrapper, and the trained
    adapter's gradient hooks still fire afterwards (two steps)."""
    path = dpo_config(tmp_path, models["llama"], preference_rows(32), sft_final, train={"max_steps": 2})
    res = ftl("train", "--nproc", "2", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    first, second = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert first["world_size"] == 2 and abs(first["loss"] - LN2) < 1e-6
    assert second["loss"] != first["loss"]


def test_sft_continues_from_an_adapter(tmp_path: Path, models: dict, toy_data: dict, sft_final: Path) -> None:
    """objective sft with model.adapter (a run's final/ or its export): training continues from the adapter's
    weights (bitwise); a sharding strategy's meta model has the same parameters; `ftl estimate` counts the
    frozen copy."""
    cfg = base_config(tmp_path, models["llama"], toy_data["completion"], method=LORA, model={"adapter": str(sft_final)})
    model = build_model(load_config(write_config(tmp_path / "cfg.yaml", cfg)), torch.device("cpu"))
    saved, policy = load_file(sft_final / "adapter_model.safetensors"), adapter_state(model, TRAINED)
    assert all(torch.equal(policy[k], saved[k]) for k in saved)
    exported = export_run(str(sft_final.parent), str(tmp_path / "exported"))  # `ftl export` without --merge
    from_export = build_model(load_config(tmp_path / "cfg.yaml", [f"model.adapter={exported}"]), torch.device("cpu"))
    assert all(torch.equal(adapter_state(from_export, TRAINED)[k], saved[k]) for k in saved)
    meta = build_meta_model(load_config(tmp_path / "cfg.yaml"))  # FSDP's other ranks: the same names, no reads
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in model.named_parameters()]
    conf, shape = load_config(tmp_path / "cfg.yaml"), read_shape(str(models["llama"]))
    copy = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{REFERENCE}." in n)
    without = parameter_bytes(conf.model_copy(update={"model": conf.model.model_copy(update={"adapter": None})}), shape)
    assert parameter_bytes(conf, shape)["weights"] - without["weights"] == copy > 0  # `ftl estimate` counts it


def _another_base(d: Path, models: dict, sft_final: Path) -> list[str]:
    """An adapter whose recorded base model has another width."""
    (d / "wide").mkdir()
    config = json.loads((models["llama"] / "config.json").read_text())
    (d / "wide" / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    shutil.copytree(sft_final, d / "adapter")
    saved = json.loads((d / "adapter" / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = str(d / "wide")
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    return [f"model.adapter={d / 'adapter'}"]


BAD = {
    "missing": (lambda d, m, s: [f"model.adapter={d / 'nope'}"], "model.adapter: no such directory"),
    "a-model-not-an-adapter": (lambda d, m, s: [f"model.adapter={m['llama']}"], "give it as model.path instead"),
    "the-run-not-its-final": (lambda d, m, s: [f"model.adapter={s.parent}"], "the run's adapter is "),
    "another-rank": (lambda d, m, s: [f"model.adapter={s}", "method.lora.r=4"], "method.lora.r: 4, but"),
    "another-base": (_another_base, "hidden_size 48 vs 32"),
    "full": (lambda d, m, s: [f"model.adapter={s}", "method.kind=full"], "method.kind full cannot start"),
    "bare-base-reference": (
        lambda d, m, s: [f"model.adapter={s}", "objective.reference=adapter_disabled"],
        "objective.reference: adapter_disabled would compare with the bare base",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused(
    tmp_path: Path, models: dict, sft_final: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ftl validate` (in process): exit 2 with a message naming the field."""
    setup, expected = BAD[case]
    path = dpo_config(tmp_path, models["llama"], preference_rows(4), None)
    code = main(["validate", str(path), *setup(tmp_path, models, sft_final)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err[-2000:]


def test_adapter_of_other_modules_is_refused_before_training(tmp_path: Path, models: dict, sft_final: Path) -> None:
    """The SFT adapter adapts every linear layer; a run that builds q_proj only cannot load it: a ConfigError
    (exit 2) while the model is built, before any step."""
    path = dpo_config(tmp_path, models["llama"], preference_rows(8), sft_final)
    with pytest.raises(ConfigError, match=r"model.adapter: .* does not fit .*unexpected: 24, e.g. "):
        build_model(load_config(path, ["method.lora.target_modules=[q_proj]"]), torch.device("cpu"))


def test_qlora_dpo_from_an_adapter_starts_at_ln2(tmp_path: Path) -> None:
    """QLoRA: the policy and the reference share the 4-bit base; from an adapter, step 1 is still ln 2."""
    from helpers import build_model as build_tiny

    from launcher.methods import method_for

    base = build_tiny(tmp_path / "model64", hidden_size=64, intermediate_size=128)  # 4-bit blocks of 64
    lora_cfg = load_config(dpo_config(tmp_path / "sft", base, preference_rows(4), None))
    sft = build_model(lora_cfg, torch.device("cpu"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    method_for(lora_cfg).save_final(lora_cfg, sft, tmp_path / "adapter")
    qlora = {"kind": "qlora", "qlora": {"compute_dtype": "float32"}}
    path = dpo_config(tmp_path / "dpo", base, preference_rows(16), tmp_path / "adapter", method=qlora)
    run, model, _ = start_run(path)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(adapter_state(model, REFERENCE)[k], saved[k]) for k in saved)
    row = optimizer_step(run, TrainState())
    assert abs(row["loss"] - LN2) < 1e-6 and row["rewards/margins"] == 0.0
