"""Preference pairs: each row {prompt, chosen, rejected} becomes ONE sample of its split, the chosen side in the
split's usual arrays and the rejected side in `Samples.rejected`. Sample ids therefore name pairs: the sampler,
resume and the per-rank split never see a half pair, and the pair collator expands pair k into its two rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from launcher.data.batches import collate
from launcher.data.formats import Segment, chat_prompt, encode_segments, leading_special_ids
from launcher.data.tokenized import Samples

SIDES = ("chosen", "rejected")


def uses_messages(rows: list[dict]) -> bool:
    """Whether any row's prompt is a message list (rendered with the chat template)."""
    return any(isinstance(r["prompt"], list) for r in rows)


def pair_segments(row: dict, side: str, tokenizer: Any) -> list[Segment]:
    """(text, trainable) pieces of the prompt followed by one completion: the prompt as the model sees it before
    it answers, and what the chat template (or the completion text and EOS) adds after it."""
    prompt, completion = row["prompt"], row[side]
    if not isinstance(prompt, list):
        return [(prompt, False), (completion + (tokenizer.eos_token or ""), True)]
    turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    asked = chat_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(prompt + turns, tokenize=False)
    if not full.startswith(asked):
        raise ValueError("chat template is not prefix-stable; cannot locate the completion")
    return [(asked, False), (full[len(asked) :], True)]


def tokenize_pairs(rows: list[dict], tokenizer: Any, max_len: int) -> Samples:
    """Both sides of every pair, labels on the completion only, and each pair's `margin` where the rows give one.
    A pair whose chosen or rejected completion is cut away entirely by `max_len` is dropped (and counted in
    `dropped`)."""
    prefix = leading_special_ids(tokenizer)
    sides: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {s: ([], []) for s in SIDES}
    margins: list[float] = []
    dropped = 0
    for row in rows:
        start = [] if isinstance(row["prompt"], list) else prefix  # a chat template writes its own leading tokens
        encoded = [encode_segments(pair_segments(row, s, tokenizer), tokenizer, max_len, True, start) for s in SIDES]
        if any(e is None for e in encoded):
            dropped += 1
            continue
        for side, e in zip(SIDES, encoded, strict=True):
            sides[side][0].append(np.asarray(e["input_ids"], dtype=np.int64))
            sides[side][1].append(np.asarray(e["labels"], dtype=np.int64))
        margins.append(float(row.get("margin") or 0.0))
    rejected = Samples(input_ids=sides["rejected"][0], labels=sides["rejected"][1])
    given = np.asarray(margins, dtype=np.float64) if any(r.get("margin") is not None for r in rows) else None
    return Samples(sides["chosen"][0], sides["chosen"][1], dropped=dropped, rejected=rejected, margins=given)


@dataclass(frozen=True)
class PairCollator:
    """Pair ids to one padded batch: the chosen rows of the pairs, then their rejected rows in the same order
    (row k and row n+k are pair k), as TRL lays a DPO batch out, with `margin` (one per pair) where the split has
    margins and the pairs' precomputed reference log-probs in the same order when the samples hold them. Rows are
    never joined: padding-free pairs come later."""

    pad_id: int

    def __call__(self, samples: Samples, ids: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        ids = [int(i) for i in ids]
        rejected = samples.rejected
        rows = Samples(
            input_ids=[samples.input_ids[i] for i in ids] + [rejected.input_ids[i] for i in ids],
            labels=[samples.labels[i] for i in ids] + [rejected.labels[i] for i in ids],
        )
        batch = collate(rows, list(range(2 * len(ids))), self.pad_id)
        if samples.margins is not None:
            batch["margin"] = torch.from_numpy(samples.margins[ids]).float()
        stored = samples.reference_logps
        if stored is not None:  # precomputed reference: each row's stored log-prob, by its pair's sample id
            batch["reference_logps"] = torch.from_numpy(np.concatenate([stored[ids, 0], stored[ids, 1]]))
        return batch
