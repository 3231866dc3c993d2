"""The label-only chunked loss (launcher/loss.py) equals the full-logits loss, value and gradients."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import reverse_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher import loss as label_loss
from launcher import loss_models
from launcher.data import collate
from launcher.data.formats import IGNORE
from launcher.data.tokenized import pack, tokenize_rows
from launcher.loss import causal_lm_loss_sum


def _batch(model_dir: Path, packed: bool = False) -> dict[str, torch.Tensor]:
    """Rows of different lengths, prompts masked: padding and prompt positions carry no label."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = tokenize_rows(reverse_rows(6, seed=4), "completion", tok, 64, mask_prompt=True)
    if packed:
        samples = pack(samples, 64, seed=0)
    return collate(samples, range(len(samples)), tok.pad_token_id)


def _full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs).logits.float()
    flat = logits[:, :-1].reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


def _loss_and_grads(model: torch.nn.Module, fn, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    value = fn(model, batch)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(model_dir: Path, lora: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        plain = get_peft_model(
            plain, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
    switched = copy.deepcopy(plain)
    assert label_loss.install_label_only_head(switched)
    return plain, switched


@pytest.mark.parametrize(
    ("arch", "lora", "packed"),
    [("llama", False, False), ("qwen2", True, False), ("gpt_neox", False, True), ("llama", True, True)],
)
def test_label_only_loss_equals_full_logits_loss(
    models: dict, arch: str, lora: bool, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss_models, "CHUNK_ELEMENTS", 80 * 7)  # vocab 80: chunks of 7 positions
    plain, switched = _pair(models[arch], lora)
    batch = _batch(models[arch], packed)
    assert (batch["labels"][:, 1:] == IGNORE).float().mean() > 0.3  # many positions carry no label
    shapes = []
    head = switched.get_output_embeddings()
    head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    want, want_grads = _loss_and_grads(plain, _full_logits_loss, batch)
    got, got_grads = _loss_and_grads(switched, causal_lm_loss_sum, batch)
    assert shapes == [()]  # the output layer returned the loss: no (batch, length, vocab) logits were made
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(want_grads) and got_grads
    for name, grad in want_grads.items():
        scale = float(grad.abs().max())  # fp32: summation order differs, so allow 1e-5 of the tensor's scale
        torch.testing.assert_close(
            got_grads[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_without_labels_the_output_layer_gives_logits(models: dict) -> None:
    plain, switched = _pair(models["llama"], lora=False)
    ids = torch.tensor([[2, 5, 6, 7]])
    torch.testing.assert_close(switched(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_batch_without_labels_gives_zero_and_still_backpropagates(models: dict) -> None:
    _, switched = _pair(models["llama"], lora=False)
    batch = _batch(models["llama"])
    batch["labels"][:] = IGNORE
    value = causal_lm_loss_sum(switched, batch)
    value.backward()
    assert float(value.detach()) == 0.0
