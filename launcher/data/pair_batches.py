"""Pair batches: a micro-batch of preference pairs laid out as padded rows, one padding-free row or packed rows,
with `sequence_ids` saying which sequence each token is, so the objectives sum log-probs by sequence without
knowing the layout (the chosen sides of n pairs are sequences 0..n-1, their rejected sides n..2n-1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from launcher.data.batches import collate, concat_is_cheaper
from launcher.data.tokenized import Samples, concatenated

SEQUENCES = "sequence_ids"  # the batch key PairCollator writes (see sequence_index)


def sequence_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each position's sequence in a pair batch (PairCollator's `sequence_ids`: 0..n-1 the chosen sides of its n
    pairs, n..2n-1 their rejected sides, in the same order; -1 on padding), and how many there are (2n). A batch
    without them is 2n padded rows, row k its sequence k."""
    if SEQUENCES in batch:
        seq = batch[SEQUENCES]
        return seq, int(seq.max()) + 1
    rows, length = batch["input_ids"].shape
    return torch.arange(rows, device=batch["input_ids"].device)[:, None].expand(rows, length), rows


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """The pairs in a pair batch, whatever its layout."""
    return sequence_index(batch)[1] // 2


@dataclass(frozen=True)
class PairCollator:
    """Pair ids to one batch whose `sequence_ids` say which sequence each token belongs to: the chosen sides of the
    n pairs are sequences 0..n-1 and their rejected sides n..2n-1, in the same order (as TRL lays a DPO batch out),
    whatever the layout:
    - padded: 2n rows, row k sequence k;
    - padding-free (`padding_free_width` > 0, where it computes less, as `Collator`): the 2n sequences
      concatenated into one row, each with its own positions and attention;
    - packed rows (`pack_pairs`): each row's pairs, numbered across the micro-batch's rows.
    Unpacked batches also carry what the split holds per pair, in the same order: `margin` (reward models) and
    `reference_logps` (a precomputed reference, looked up by the pairs' sample ids)."""

    pad_id: int
    padding_free_width: int = 0
    segment_attention: bool = False

    def __call__(self, samples: Samples, ids: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        ids = [int(i) for i in ids]
        if samples.seq_ids is not None:
            return self._packed(samples, ids)
        rejected = samples.rejected
        rows = Samples(
            input_ids=[samples.input_ids[i] for i in ids] + [rejected.input_ids[i] for i in ids],
            labels=[samples.labels[i] for i in ids] + [rejected.labels[i] for i in ids],
        )
        order = list(range(2 * len(ids)))
        lengths = [len(x) for x in rows.input_ids]
        if self.padding_free_width and concat_is_cheaper(lengths, self.padding_free_width, self.segment_attention):
            joined = concatenated(rows, order)
            out = collate(joined, [0], self.pad_id)
            out[SEQUENCES] = torch.from_numpy(joined.seq_ids[0])[None]
            return per_pair(out, samples, ids)
        out = collate(rows, order, self.pad_id)
        out[SEQUENCES] = torch.where(out["attention_mask"].bool(), torch.arange(len(order))[:, None], -1)
        return per_pair(out, samples, ids)

    def _packed(self, samples: Samples, ids: list[int]) -> dict[str, torch.Tensor]:
        """Packed rows: segment s of a row is pair s // 2 of that row, side s % 2."""
        out = collate(samples, ids, self.pad_id)
        segments = [samples.seq_ids[i] for i in ids]
        pairs = [(int(s.max()) + 1) // 2 for s in segments]
        first, n = np.cumsum([0, *pairs[:-1]]), sum(pairs)
        seq = torch.full(out["input_ids"].shape, -1, dtype=torch.long)
        for row, s in enumerate(segments):
            seq[row, : len(s)] = torch.from_numpy((s % 2) * n + first[row] + s // 2)
        out[SEQUENCES] = seq
        return out


def per_pair(out: dict[str, torch.Tensor], samples: Samples, ids: list[int]) -> dict[str, torch.Tensor]:
    """Add what the split holds per pair: each pair's `margin`, and the precomputed reference log-probs of its
    chosen then rejected side (the batch's sequence order), looked up by sample id."""
    if samples.margins is not None:
        out["margin"] = torch.from_numpy(samples.margins[ids]).float()
    stored = samples.reference_logps
    if stored is not None:
        out["reference_logps"] = torch.from_numpy(np.concatenate([stored[ids, 0], stored[ids, 1]]))
    return out
