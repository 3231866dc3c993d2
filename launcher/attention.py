"""Attention over packed and padding-free rows at the cost of their samples, not of the row.

A packed or concatenated row holds several samples one after another, each restarting its positions at 0,
and may attend only within a sample. Given that as a dense block-diagonal mask, SDPA still computes every
(query, key) pair of the row: T² for a row of T tokens, most of them masked out (SmolLM2-135M, 8 chat rows
concatenated: attention was 41% of a training step). `ftl_segments` cuts the row into its samples (where
position_ids do not continue by one), gathers samples of similar length into a padded batch, and runs causal
SDPA without a mask on each: Σ len² pairs. Right padding inside a bucket is harmless under a causal mask (a
real query never sees a later key) and the padded outputs are dropped. Everything else (ordinary padded
batches, generation with a cache) goes to SDPA unchanged, with the mask transformers builds for SDPA.
"""

from __future__ import annotations

import itertools
import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "ftl_segments"


def segment_lengths(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Each row's sample lengths (a sample starts where positions do not continue by one); None when every
    row is one sample."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    width = position_ids.size(1)
    lengths = []
    for row in starts.cpu():
        edges = [*row.nonzero().flatten().tolist(), width]
        lengths.append([b - a for a, b in itertools.pairwise(edges)])
    return lengths


class SegmentPlan:
    """Flat indices of every sample, bucketed by length (powers of two) so each bucket is one padded batch."""

    _last: tuple[torch.Tensor, SegmentPlan | None] | None = None  # every layer of a forward sees the same ids

    def __init__(self, lengths: list[list[int]], width: int, device: torch.device):
        buckets: dict[int, list[tuple[int, int]]] = {}
        for row, row_lengths in enumerate(lengths):
            start = row * width
            for n in row_lengths:
                buckets.setdefault(math.ceil(math.log2(n)) if n > 1 else 0, []).append((start, n))
                start += n
        self.longest = max(n for row in lengths for n in row)
        self.groups = []  # (gather index [N, L], valid [N, L], flat positions of the valid entries)
        for spans in buckets.values():
            longest = max(n for _, n in spans)
            offsets = torch.arange(longest)
            index = torch.stack([s + offsets.clamp(max=n - 1) for s, n in spans])
            valid = torch.stack([offsets < n for _, n in spans])
            self.groups.append((index.to(device), valid.to(device), index[valid].to(device)))

    @classmethod
    def of(cls, position_ids: torch.Tensor, batch: int) -> SegmentPlan | None:
        """The plan for these position ids (cached for the forward's every layer)."""
        if cls._last is not None and cls._last[0] is position_ids:
            return cls._last[1]
        lengths = segment_lengths(position_ids.expand(batch, -1))
        plan = None if lengths is None else cls(lengths, position_ids.size(-1), position_ids.device)
        cls._last = (position_ids, plan)
        return plan


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, H, T, D], key/value [B, Hkv, T, D] -> [B, T, H, D]."""
    position_ids = kwargs.get("position_ids")
    same_length = position_ids is not None and query.size(2) == key.size(2) == position_ids.size(-1)
    plan = SegmentPlan.of(position_ids, query.size(0)) if same_length else None
    window = kwargs.get("sliding_window")
    if plan is None or (window is not None and plan.longest > window):  # a window inside a sample: SDPA's mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, width, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * width, t.size(1), dim) for t in (query, key, value)]
    out = None
    for index, valid, positions in plan.groups:
        q, k, v = (t[index].transpose(1, 2) for t in flat)  # [N, heads, L, D]
        got, _ = sdpa_attention_forward(module, q, k, v, None, dropout, scaling, is_causal=True)
        if out is None:  # SDPA's dtype: under autocast it may differ from the query's
            out = got.new_empty(batch * width, heads, dim)
        out = out.index_put((positions,), got[valid])
    return out.view(batch, width, heads, dim), None


AttentionInterface.register(NAME, segment_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # batches that are not segmented keep SDPA's mask
