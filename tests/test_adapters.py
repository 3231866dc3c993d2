"""Bottleneck adapters (method.kind: adapter): identity at step 0, the parameter formula, only adapters train,
the saved adapter reloads onto the base with one call, export, and FSDP / ZeRO-3 equal a single process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import base_config, ftl, read_metrics, write_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from launcher.config import AdapterSettings
from launcher.methods.bottleneck import attach_adapters, load_adapter


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "bert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapters_start_as_the_base_model_with_the_formula_count(models: dict, arch: str, placement: str) -> None:
    cls = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    base = cls.from_pretrained(models[arch]).eval()
    adapted = cls.from_pretrained(models[arch]).eval()
    settings = AdapterSettings(size=8, placement=placement)
    attach_adapters(adapted, settings)
    ids = torch.randint(3, 60, (2, 12))
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=0)
    d, layers, sites = base.config.hidden_size, base.config.num_hidden_layers, 2 if placement == "houlsby" else 1
    expected = layers * sites * (2 * d * 8 + 8 + d)
    if arch == "bert":
        expected += sum(p.numel() for n, p in base.named_parameters() if n.startswith("classifier."))  # new head
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == expected
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert all("_adapter." in n or n.startswith("classifier.") for n in trainable)


def _adapter_run(tmp: Path, models: dict, toy_data: dict, dist: dict, nproc: int = 0) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = base_config(
        tmp,
        models["llama"],
        toy_data["completion"],
        method={"kind": "adapter", "adapter": {"size": 8}},
        data={"eval": str(toy_data["completion"])},
        train={"max_steps": 4, "lr": 1e-2, "micro_batch_size": 2, "grad_accum": 1 if nproc else 2},
        distributed=dist,
    )
    path = write_config(tmp / "cfg.yaml", cfg)
    res = ftl("train", str(path), *(["--nproc", str(nproc)] if nproc else []))
    assert res.returncode == 0, res.stderr[-4000:]
    return Path(cfg["output_dir"])


def test_only_adapters_train_and_the_saved_adapter_reloads(tmp_path: Path, models: dict, toy_data: dict) -> None:
    from test_train import _eval_loss_of

    run = _adapter_run(tmp_path, models, toy_data, {})
    saved = load_file(run / "final" / "adapter_model.safetensors")
    assert saved and all("_adapter." in n for n in saved)
    assert any(v.any() for n, v in saved.items() if ".up.weight" in n)  # the zero-initialised up-projections moved
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(models["llama"]), run / "final")
    trained_eval = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r][-1]
    assert _eval_loss_of(reloaded, run / "final", toy_data["completion"]) == pytest.approx(trained_eval, rel=1e-4)

    refused = ftl("export", str(run), "--out", str(tmp_path / "merged"), "--merge")
    assert refused.returncode == 2 and "cannot be folded" in refused.stderr, refused.stderr[-2000:]
    exported = ftl("export", str(run), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    base = load_file(models["llama"] / "model.safetensors")
    written = load_file(tmp_path / "export" / "model.safetensors")
    assert all(written[n].equal(base[n]) for n in base)  # the base weights are bitwise the pre-trained ones
    again = load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "export"), tmp_path / "export")
    assert _eval_loss_of(again, run / "final", toy_data["completion"]) == pytest.approx(trained_eval, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dist", [{"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}])
def test_adapters_under_sharding_equal_a_single_process(
    tmp_path: Path, models: dict, toy_data: dict, dist: dict
) -> None:
    single = _adapter_run(tmp_path / "single", models, toy_data, {})
    sharded = _adapter_run(tmp_path / "sharded", models, toy_data, dist, nproc=2)
    losses = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-4)
    a = load_file(single / "final" / "adapter_model.safetensors")
    b = load_file(sharded / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


# Where each adapter belongs, written out here from the papers (not read from launcher.methods.bottleneck.SITES):
# blocks of the model, then (the attention sub-layer, the feed-forward sub-layer) inside a block.
EXPECTED_SITES = {
    "llama": ("model.layers", "self_attn", "mlp"),
    "qwen2": ("model.layers", "self_attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "bert": ("bert.encoder.layer", "attention.output.dense", "output.dense"),  # before residual + LayerNorm
}


def _apply_adapter_at(site: torch.nn.Module, adapter: torch.nn.Module) -> None:
    """Hook `site` of an untouched model so its output h becomes h + up(gelu(down(h))), `adapter`'s weights."""
    down, up = adapter.get_submodule("down"), adapter.get_submodule("up")

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        h = output[0] if isinstance(output, tuple) else output
        h = h + torch.nn.functional.linear(
            torch.nn.functional.gelu(torch.nn.functional.linear(h, down.weight, down.bias)), up.weight, up.bias
        )
        return (h, *output[1:]) if isinstance(output, tuple) else h

    site.register_forward_hook(hook)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "bert"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_each_adapter_sits_after_its_sub_layer(models: dict, arch: str, placement: str) -> None:
    """Houlsby adapts the attention and the feed-forward outputs, Pfeiffer the feed-forward output only: with
    random (non-identity) adapters, the adapted model equals an untouched model whose sub-layer outputs are
    passed through those adapters' formula at exactly those places."""
    cls = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    adapted = attach_adapters(cls.from_pretrained(models[arch]).eval(), AdapterSettings(size=8, placement=placement))
    reference = cls.from_pretrained(models[arch]).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "_adapter." in name:
                p.normal_(std=0.2)  # up starts at zero: make each adapter change what it sees
    blocks_path, attn_site, ffn_site = EXPECTED_SITES[arch]
    sites = {"attn_adapter": attn_site, "ffn_adapter": ffn_site}
    if placement == "pfeiffer":
        sites.pop("attn_adapter")
    for adapted_block, block in zip(adapted.get_submodule(blocks_path), reference.get_submodule(blocks_path)):
        adapters = {n for n, _ in adapted_block.named_children() if n.endswith("_adapter")}
        assert adapters == set(sites), adapters
        for adapter_name, site in sites.items():
            _apply_adapter_at(block.get_submodule(site), adapted_block.get_submodule(adapter_name))
    ids = torch.randint(3, 60, (2, 12))
    base = cls.from_pretrained(models[arch]).eval()
    with torch.no_grad():
        got, want = adapted(input_ids=ids).logits, reference(input_ids=ids).logits
        base = base(input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-3), "the random adapters must change the output"
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())
