"""The causal-LM loss without full-vocabulary logits.

A plain forward materialises logits of shape (batch, length, vocab) and, for the loss, an fp32 copy of
them: for a 49k vocabulary that is most of a fine-tune's activation memory, though with `mask_prompt` and
padding most positions carry no label. Here the output layer (`lm_head`) computes the loss itself, inside
the model's forward (so DDP, FSDP2 and ZeRO-3 see an ordinary forward and gather its weight as usual): it
takes the hidden states of label positions only, in chunks, each chunk's logits recomputed in backward
instead of kept. The model then returns the summed loss (a 0-dim tensor) in place of its logits.

Only architectures whose forward returns the output layer's result unchanged are switched (no logit
scaling or soft-capping after it); any other model, or an output layer that is not a plain Linear (e.g.
LoRA on lm_head), keeps the plain path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from launcher import loss_models
from launcher.data.formats import IGNORE

_LABELS: ContextVar[torch.Tensor | None] = ContextVar("ftl_labels", default=None)


def install_label_only_head(model: nn.Module) -> bool:
    """Make the model's output layer compute the label-only loss while `labels_for_head` is active (its plain
    Linear forward otherwise, e.g. for generation). Returns whether the model was switched."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in loss_models.PLAIN_HEAD_MODELS or type(head) is not nn.Linear:
        return False
    head.forward = functools.partial(_head_forward, head)  # this instance only; names and hooks unchanged
    return True


@contextlib.contextmanager
def labels_for_head(labels: torch.Tensor) -> Iterator[None]:
    """While active, a switched output layer returns the summed loss over `labels` (shifted by one)."""
    token = _LABELS.set(labels)
    try:
        yield
    finally:
        _LABELS.reset(token)


def _head_forward(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    labels = _LABELS.get()
    if labels is None or hidden.shape[0] != labels.shape[0] or hidden.shape[1] < labels.shape[1]:
        return F.linear(hidden, head.weight, head.bias)
    return label_loss_sum(hidden, head.weight, head.bias, aligned_labels(labels, hidden.shape[1]))


def aligned_labels(labels: torch.Tensor, length: int) -> torch.Tensor:
    """Labels for `length` positions: prompt tuning prepends virtual tokens, which carry no label."""
    extra = length - labels.shape[1]
    if extra == 0:
        return labels
    return torch.cat([labels.new_full((labels.shape[0], extra), IGNORE), labels], dim=1)


def label_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Σ cross-entropy of position t predicting labels[t+1], over label positions only, in fp32."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    if rows.shape[0] == 0:
        return hidden.float().sum() * 0.0  # no labels: zero, still connected to the graph
    step = max(1, loss_models.CHUNK_ELEMENTS // weight.shape[0])
    total = None
    for i in range(0, rows.shape[0], step):
        part = checkpoint(_chunk_loss, rows[i : i + step], weight, bias, wanted[i : i + step], use_reentrant=False)
        total = part if total is None else total + part
    return total


def _chunk_loss(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wanted: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(F.linear(rows, weight, bias).float(), wanted, reduction="sum")
