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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from launcher import loss_models
from launcher.data.formats import IGNORE

_LABELS: ContextVar[torch.Tensor | None] = ContextVar("ftl_labels", default=None)
_TASKS: ContextVar[tuple[torch.Tensor, TaskLosses] | None] = ContextVar("ftl_tasks", default=None)
_SEGMENTS: ContextVar[tuple[torch.Tensor, int] | None] = ContextVar("ftl_segments", default=None)


@dataclass
class TaskLosses:
    """Per-task loss sums and label counts over the batches of a step (multi-task logging; no gradient)."""

    sums: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, num_tasks: int) -> TaskLosses:
        return cls(torch.zeros(num_tasks, dtype=torch.float64), torch.zeros(num_tasks, dtype=torch.float64))

    def add(self, losses: torch.Tensor, tasks: torch.Tensor) -> None:
        """Add per-position `losses` to the sums of their `tasks` (-1: none)."""
        keep = tasks >= 0
        index = tasks[keep].cpu()
        self.sums.index_add_(0, index, losses.detach()[keep].double().cpu())
        self.counts.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))

    def flat(self) -> list[float]:
        """Sums then counts, to all-reduce together with other numbers."""
        return [*self.sums.tolist(), *self.counts.tolist()]

    @staticmethod
    def means(reduced: list[float]) -> list[float | None]:
        """Each task's mean loss from all-reduced `flat()` values (None: none of its labels this time)."""
        half = len(reduced) // 2
        return [s / n if n else None for s, n in zip(reduced[:half], reduced[half:], strict=True)]


def causal_lm_loss_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], task_losses: TaskLosses | None = None
) -> torch.Tensor:
    """Summed next-token loss over the batch's label tokens. With `task_losses` and a multi-task batch
    (`task_ids`), each task's share of the sum is added to it."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    tasks = batch.get("task_ids") if task_losses is not None else None
    with labels_for_head(batch["labels"], None if tasks is None else (tasks, task_losses)):
        out = model(**inputs).logits
    if out.ndim == 0:  # the output layer computed the label-only loss
        return out
    logits = out.float()
    labels = aligned_labels(batch["labels"], logits.size(1))[:, 1:].reshape(-1)
    shifted = logits[:, :-1].reshape(-1, logits.size(-1))
    if tasks is None:
        return F.cross_entropy(shifted, labels, ignore_index=IGNORE, reduction="sum")
    losses = F.cross_entropy(shifted, labels, ignore_index=IGNORE, reduction="none")
    owners = aligned_labels(tasks, logits.size(1), fill=-1)[:, 1:].reshape(-1)
    task_losses.add(losses, torch.where(labels != IGNORE, owners, -1))
    return losses.sum()


def causal_lm_loss_by_segment(
    model: nn.Module, batch: dict[str, torch.Tensor], segments: torch.Tensor, count: int
) -> torch.Tensor:
    """Each sequence's summed next-token loss over its label tokens (fp32), shape (count,). `segments` gives each
    position's sequence (0..count-1; -1: none): a row of a padded batch, or a sample of a padding-free or packed
    row, whose label tokens are summed together. The label-only output layer returns the sums itself; a model
    without it goes through its full logits."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with labels_for_head(batch["labels"], segments=(segments, count)):
        out = model(**inputs).logits
    if out.ndim == 1:
        return out
    targets = aligned_labels(batch["labels"], out.size(1))[:, 1:]  # prompt tuning prepends virtual tokens
    owners = aligned_labels(segments, out.size(1), fill=-1)[:, 1:]  # a label's sequence is its token's
    flat = out[:, :-1].float().reshape(-1, out.size(-1))
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none").view(targets.shape)
    keep = targets != IGNORE
    return nll.new_zeros(count).index_add(0, owners[keep], nll[keep])


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
def labels_for_head(
    labels: torch.Tensor,
    tasks: tuple[torch.Tensor, TaskLosses] | None = None,
    segments: tuple[torch.Tensor, int] | None = None,
) -> Iterator[None]:
    """While active, a switched output layer returns the summed loss over `labels` (shifted by one), and adds
    each task's share to `tasks` = (per-token task ids, sums) when given. With `segments` = (each position's
    sequence, their number), one sum per sequence (a 1-dim tensor: what preference objectives compare)."""
    token, task_token, segment_token = _LABELS.set(labels), _TASKS.set(tasks), _SEGMENTS.set(segments)
    try:
        yield
    finally:
        _LABELS.reset(token)
        _TASKS.reset(task_token)
        _SEGMENTS.reset(segment_token)


def _head_forward(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    labels = _LABELS.get()
    if labels is None or hidden.shape[0] != labels.shape[0] or hidden.shape[1] < labels.shape[1]:
        return F.linear(hidden, head.weight, head.bias)
    segments = _SEGMENTS.get()
    if segments is not None:
        owners = aligned_labels(segments[0], hidden.shape[1], fill=-1)
        labels = aligned_labels(labels, hidden.shape[1])
        return label_loss_by_segment(hidden, head.weight, head.bias, labels, owners, segments[1])
    tasks = _TASKS.get()
    if tasks is not None:
        tasks = (aligned_labels(tasks[0], hidden.shape[1], fill=-1), tasks[1])
    return label_loss_sum(hidden, head.weight, head.bias, aligned_labels(labels, hidden.shape[1]), tasks)


def aligned_labels(labels: torch.Tensor, length: int, fill: int = IGNORE) -> torch.Tensor:
    """Labels (or task ids) for `length` positions: prompt tuning prepends virtual tokens, which carry none."""
    extra = length - labels.shape[1]
    if extra == 0:
        return labels
    return torch.cat([labels.new_full((labels.shape[0], extra), fill), labels], dim=1)


def label_loss_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    tasks: tuple[torch.Tensor, TaskLosses] | None = None,
) -> torch.Tensor:
    """Σ cross-entropy of position t predicting labels[t+1], over label positions only, in fp32."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    if rows.shape[0] == 0:
        return hidden.float().sum() * 0.0  # no labels: zero, still connected to the graph
    owners = tasks[0][:, 1:][keep] if tasks is not None else None
    step = max(1, loss_models.CHUNK_ELEMENTS // weight.shape[0])
    total = None
    for i in range(0, rows.shape[0], step):
        chunk = (rows[i : i + step], weight, bias, wanted[i : i + step], owners is not None)
        part = checkpoint(_chunk_loss, *chunk, use_reentrant=False)
        if owners is not None:
            tasks[1].add(part, owners[i : i + step])
            part = part.sum()
        total = part if total is None else total + part
    return total


def label_loss_by_segment(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    segments: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """Each sequence's Σ cross-entropy over its label positions (as label_loss_sum, in chunks, fp32): shape
    (count,). Position t predicts labels[t+1] and counts for that token's sequence, segments[t+1]."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    owners = segments[:, 1:][keep]
    rows, wanted = hidden[:, :-1][keep], targets[keep]
    total = hidden.float().sum() * 0.0 + torch.zeros(count, device=hidden.device)  # in the graph
    step = max(1, loss_models.CHUNK_ELEMENTS // weight.shape[0])
    for i in range(0, rows.shape[0], step):
        part = checkpoint(
            _chunk_loss, rows[i : i + step], weight, bias, wanted[i : i + step], True, use_reentrant=False
        )
        total = total.index_add(0, owners[i : i + step], part)
    return total


def _chunk_loss(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wanted: torch.Tensor, per_row: bool
) -> torch.Tensor:
    logits = F.linear(rows, weight, bias).float()
    return F.cross_entropy(logits, wanted, reduction="none" if per_row else "sum")
