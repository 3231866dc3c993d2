"""Tokenise a split once, cache it on disk (keyed by content), and pack rows when asked.

The cache is a plain .npz (flat token arrays + offsets, loaded with allow_pickle=False), written to a
temporary name and renamed, so a crash never leaves a half-written cache that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.formats import IGNORE, encode_causal, encode_classification, leading_special_ids
from launcher.paths import cache_dir

CACHE_VERSION = "1"


@dataclass
class Samples:
    """Tokenised samples of one split: ragged token lists, labels, and (packed) position/sequence ids."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray] | None = None  # causal: per-token labels
    class_labels: np.ndarray | None = None  # classification: one label per row
    position_ids: list[np.ndarray] | None = None  # packed rows only
    seq_ids: list[np.ndarray] | None = None  # packed rows only: which sample each token belongs to
    dropped: int = 0
    tasks: np.ndarray | None = None  # multi-task: each sample's task index
    # preference pairs: the rejected completions (sample i is pair i: the arrays above hold its chosen side)
    rejected: Samples | None = None
    margins: np.ndarray | None = None  # preference pairs with a `margin` column: each pair's (float64)
    # preference pairs under objective.reference precomputed: pair i's reference log-probs (chosen, rejected)
    reference_logps: np.ndarray | None = None
    fingerprint: str | None = None  # the token cache key (rows, tokenizer, settings): a resume compares it

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self) -> list[np.ndarray]:
        """The token rows of every sample (both sides of a pair)."""
        return self.input_ids + (self.rejected.input_ids if self.rejected is not None else [])

    def tokens(self, ids: Iterable[int]) -> int:
        """Tokens of the samples `ids` (both rows of a pair)."""
        other = self.rejected
        return sum(len(self.input_ids[i]) + (len(other.input_ids[i]) if other is not None else 0) for i in ids)

    @property
    def mean_length(self) -> float:
        rows = self.rows()
        return sum(len(x) for x in rows) / max(len(rows), 1)

    @property
    def label_fraction(self) -> float:
        """Label-carrying tokens per token (causal rows; 0 for classification)."""
        return self.num_label_tokens / max(sum(len(x) for x in self.rows()), 1) if self.labels is not None else 0.0

    @property
    def num_label_tokens(self) -> int:
        if self.labels is None:
            return len(self)
        labels = self.labels + (self.rejected.labels if self.rejected is not None else [])
        return int(sum((lab[1:] != IGNORE).sum() for lab in labels))


def token_cache_dir() -> Path:
    """Where tokenised splits are cached (the ftl cache's tokenized/)."""
    return cache_dir() / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(f"{tokenizer.eos_token}|{tokenizer.bos_token}".encode())
    return h.hexdigest()


def cache_key(rows: list[dict], tokenizer: Any, settings: dict[str, Any]) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for row in rows:
        h.update(json.dumps({k: v for k, v in row.items() if k != "_line"}, sort_keys=True).encode())
    return h.hexdigest()[:24]


def tokenize_rows(rows: list[dict], fmt: str, tokenizer: Any, max_len: int, mask_prompt: bool) -> Samples:
    """Tokenise every row; causal rows with nothing trainable left are dropped (and counted)."""
    if fmt == "classification":
        enc = [encode_classification(r, tokenizer, max_len) for r in rows]
        return Samples(
            input_ids=[np.asarray(e["input_ids"], dtype=np.int64) for e in enc],
            class_labels=np.asarray([e["label"] for e in enc], dtype=np.int64),
        )
    prefix = leading_special_ids(tokenizer)
    ids, labels, dropped = [], [], 0
    for row in rows:
        e = encode_causal(row, fmt, tokenizer, max_len, mask_prompt, prefix)
        if e is None:
            dropped += 1
            continue
        ids.append(np.asarray(e["input_ids"], dtype=np.int64))
        labels.append(np.asarray(e["labels"], dtype=np.int64))
    return Samples(input_ids=ids, labels=labels, dropped=dropped)


def _flat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return flat, offsets


def _split(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def save_samples(samples: Samples, path: Path) -> None:
    """Write atomically: temp file, then rename."""
    arrays: dict[str, np.ndarray] = {"dropped": np.asarray(samples.dropped)}
    arrays["ids"], arrays["offsets"] = _flat(samples.input_ids)
    if samples.labels is not None:
        arrays["labels"], _ = _flat(samples.labels)
    if samples.class_labels is not None:
        arrays["class_labels"] = samples.class_labels
    if samples.rejected is not None:
        arrays["rejected_ids"], arrays["rejected_offsets"] = _flat(samples.rejected.input_ids)
        arrays["rejected_labels"], _ = _flat(samples.rejected.labels)
    if samples.margins is not None:
        arrays["margins"] = samples.margins
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_samples(path: Path) -> Samples:
    with np.load(path, allow_pickle=False) as z:
        offsets = z["offsets"]
        rejected = None
        if "rejected_ids" in z:
            sides = z["rejected_offsets"]
            rejected = Samples(_split(z["rejected_ids"], sides), labels=_split(z["rejected_labels"], sides))
        return Samples(
            input_ids=_split(z["ids"], offsets),
            labels=_split(z["labels"], offsets) if "labels" in z else None,
            class_labels=z["class_labels"] if "class_labels" in z else None,
            dropped=int(z["dropped"]),
            rejected=rejected,
            margins=z["margins"] if "margins" in z else None,
        )


def pack(samples: Samples, max_len: int, seed: int) -> Samples:
    """Greedy-pack shuffled samples into rows of at most max_len tokens.

    Each sample keeps its own positions (reset to 0) and a sequence id; the collator turns sequence ids
    into a block-diagonal causal mask, so no token attends across samples. The first label of every
    sample is masked: in the unpacked row nothing predicts a sample's first token either.
    """
    rows = pack_groups([len(x) for x in samples.input_ids], max_len, seed)
    return packed_rows([concatenated(samples, members) for members in rows], samples.dropped)


def packed_rows(joined: list[Samples], dropped: int) -> Samples:
    """One split of packed rows from single-row joins (`concatenated`): each keeps its positions and segments."""
    return Samples(
        input_ids=[j.input_ids[0] for j in joined],
        labels=[j.labels[0] for j in joined],
        position_ids=[j.position_ids[0] for j in joined],
        seq_ids=[j.seq_ids[0] for j in joined],
        dropped=dropped,
    )


def pack_groups(lengths: list[int], max_len: int, seed: int) -> list[list[int]]:
    """Which samples each packed row holds: a seeded shuffle, filled greedily up to `max_len` tokens (a sample
    longer than that alone in its row)."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows: list[list[int]] = [[]]
    filled = 0
    for i in order:
        if filled + lengths[i] > max_len and rows[-1]:
            rows.append([])
            filled = 0
        rows[-1].append(int(i))
        filled += lengths[i]
    return rows


def concatenated(samples: Samples, ids: list[int]) -> Samples:
    """The chosen samples as one packed row (first label of each masked, as in `pack`)."""
    labels = [samples.labels[i].copy() for i in ids]
    for lab in labels:
        lab[0] = IGNORE
    return Samples(
        input_ids=[np.concatenate([samples.input_ids[i] for i in ids])],
        labels=[np.concatenate(labels)],
        position_ids=[np.concatenate([np.arange(len(samples.input_ids[i])) for i in ids])],
        seq_ids=[np.concatenate([np.full(len(samples.input_ids[i]), k) for k, i in enumerate(ids)])],
    )


def merged(parts: list[Samples]) -> Samples:
    """Samples of several tasks (all causal, or all classification) as one split, each tagged with its task."""

    def joined(field: str) -> list[np.ndarray] | None:
        lists = [getattr(p, field) for p in parts]
        return None if any(x is None for x in lists) else [a for x in lists for a in x]

    classes = [p.class_labels for p in parts]
    return Samples(
        input_ids=joined("input_ids"),
        labels=joined("labels"),
        class_labels=None if any(c is None for c in classes) else np.concatenate(classes),
        position_ids=joined("position_ids"),
        seq_ids=joined("seq_ids"),
        dropped=sum(p.dropped for p in parts),
        tasks=np.concatenate([np.full(len(p), t, dtype=np.int64) for t, p in enumerate(parts)]),
        fingerprint=joined_fingerprint([p.fingerprint for p in parts]),
    )


def joined_fingerprint(parts: list[str | None]) -> str | None:
    """One fingerprint for several tasks' splits (None when one of them has none)."""
    if any(p is None for p in parts):
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def subset(samples: Samples, ids: np.ndarray) -> Samples:
    """The chosen causal samples (unpacked) as a split of their own."""
    return Samples(
        input_ids=[samples.input_ids[i] for i in ids],
        labels=[samples.labels[i] for i in ids],
        dropped=0,
    )
