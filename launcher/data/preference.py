"""Preference pairs: each row {prompt, chosen, rejected} (or {chosen, rejected} sharing the prompt as their prefix)
becomes ONE sample of its split, the chosen side in the split's usual arrays and the rejected side in
`Samples.rejected`. Sample ids therefore name pairs: the sampler, resume and the per-rank split never see a half
pair. Packing keeps that: a packed row holds whole pairs. The pair collator (launcher/data/pair_batches.py) lays a
micro-batch's pairs out as padded rows, one padding-free row or packed rows. This module is torch-free: `ftl
validate` reads and checks pairs without torch."""

from __future__ import annotations

from typing import Any

import numpy as np

from launcher.data.formats import Segment, chat_prompt, encode_segments, leading_special_ids
from launcher.data.rows import with_prompt
from launcher.data.tokenized import Samples, concatenated, pack_groups, packed_rows

SIDES = ("chosen", "rejected")


def uses_messages(rows: list[dict]) -> bool:
    """Whether any row's prompt is a message list (rendered with the chat template)."""
    return any(isinstance(with_prompt(r)["prompt"], list) for r in rows)


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
    for row in map(with_prompt, rows):
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


def pack_pairs(samples: Samples, max_len: int, seed: int) -> Samples:
    """Whole pairs packed into rows of at most `max_len` tokens (seeded, greedy, as `pack`; a pair longer than that
    alone in its row). In each row, pair j is segment 2j (its chosen side) and 2j+1 (its rejected side): each
    restarts its positions and attends only within itself. A sample of the result is a packed row."""
    rejected = samples.rejected
    sides = Samples(
        input_ids=[x for i in range(len(samples)) for x in (samples.input_ids[i], rejected.input_ids[i])],
        labels=[x for i in range(len(samples)) for x in (samples.labels[i], rejected.labels[i])],
    )
    lengths = [len(samples.input_ids[i]) + len(rejected.input_ids[i]) for i in range(len(samples))]
    joined = [concatenated(sides, [2 * i + s for i in g for s in (0, 1)]) for g in pack_groups(lengths, max_len, seed)]
    return packed_rows(joined, samples.dropped)


def pairs_in(samples: Samples) -> int:
    """How many pairs a preference split holds: one per sample, or two segments each in packed rows."""
    if samples.seq_ids is None:
        return len(samples)
    return sum((int(s.max()) + 1) // 2 for s in samples.seq_ids)
