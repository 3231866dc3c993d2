"""Forgetting for sequence classifiers: the reference loss through the pre-trained model's own LM head.

A classifier has no LM head, so `data.reference` cannot be scored by the model being trained. What the
classifier's body still knows of its pre-training is: the checkpoint's LM head (masked-LM for encoders,
next-token for decoders), loaded once, frozen and outside training (never checkpointed), scores the body's
last hidden states. Before training that is the pre-trained model's own loss on the reference rows; as the
body drifts toward the task, it rises. Encoders are scored on a fixed 15% of each row's tokens, chosen by a
hash of (token, position) so every eval, rank and resumed run masks the same ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from launcher.config import Config
from launcher.data.formats import IGNORE
from launcher.errors import ConfigError
from launcher.model import DTYPES

MASK_SHARE = 0.15
_HASH_MOD = 10_007


class PretrainedLMHead:
    """The frozen pre-trained LM head of a classifier's checkpoint, and the loss it gives the body's states."""

    def __init__(self, head: nn.Module, body_class: type, causal: bool, mask_id: int | None, special: list[int]):
        self.head, self.body_class, self.causal = head, body_class, causal
        self.mask_id, self.special = mask_id, torch.tensor(special, dtype=torch.long)

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoders: the fixed share of tokens masked in the input, labels there only. Decoders: unchanged."""
        if self.causal:
            return batch
        ids, attended = batch["input_ids"], batch["attention_mask"].bool()
        positions = torch.arange(ids.size(1))[None]
        draw = (ids * 1_000_003 + positions * 7_919 + 12_345) % _HASH_MOD
        chosen = (draw < MASK_SHARE * _HASH_MOD) & attended & ~torch.isin(ids, self.special)
        chosen[:, 0] = False  # label_token_count skips the first column, as the causal shift does
        masked = torch.where(chosen, self.mask_id, ids)
        return {**batch, "input_ids": masked, "labels": torch.where(chosen, ids, IGNORE)}

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed LM loss of the reference batch through the classifier's body and this head."""
        body = next(m for m in model.modules() if isinstance(m, self.body_class))
        states: list[torch.Tensor] = []
        hook = body.register_forward_hook(lambda _m, _i, out: states.append(out[0]))
        try:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            hook.remove()
        width = batch["input_ids"].size(1)
        hidden = states[-1][:, -width:]  # prompt tuning prepends its virtual tokens
        weight = next(self.head.parameters())
        logits = self.head(hidden.to(weight.dtype)).float()
        labels = batch["labels"]
        if self.causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )


def load_reference_head(cfg: Config, tokenizer: Any, device: torch.device) -> PretrainedLMHead:
    """The checkpoint's pre-trained LM head; ConfigError (exit 2) when the checkpoint has none."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    m = cfg.model
    causal = AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code).model_type not in (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    if not causal and tokenizer.mask_token_id is None:
        raise ConfigError([f"data.reference: the tokenizer of {m.path} has no mask token for masked-LM scoring"])
    cls = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    lm, info = cls.from_pretrained(
        m.path, dtype=DTYPES[m.dtype], trust_remote_code=m.trust_remote_code, output_loading_info=True
    )
    prefix = lm.base_model_prefix
    heads = [module for name, module in lm.named_children() if name != prefix]
    untrained = [k for k in info["missing_keys"] if not k.startswith(f"{prefix}.")]
    if len(heads) != 1 or untrained:
        raise ConfigError(
            [
                f"data.reference: {m.path} holds no pre-trained {'causal' if causal else 'masked'}-LM head "
                f"({', '.join(untrained[:3]) or 'no single head module'}), so forgetting cannot be measured "
                "through it; drop data.reference or use a checkpoint saved with its LM head"
            ]
        )
    head = heads[0].to(device).eval().requires_grad_(False)
    body_class = type(getattr(lm, prefix))
    return PretrainedLMHead(head, body_class, causal, tokenizer.mask_token_id, list(tokenizer.all_special_ids))
