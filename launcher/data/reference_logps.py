"""Precomputed reference log-probs of preference pairs, stored beside the tokenised splits in the ftl cache.

A file holds one split's (pairs, 2) float32 array (chosen, rejected), keyed by the pairs' tokens themselves (so
the rows, tokenizer, chat template and max_seq_len are all in the key), the model's files and the settings
that change a forward pass. It is written to a temporary name and renamed, like the token cache, so a crash
never leaves a half-written file that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data.tokenized import Samples, token_cache_dir

VERSION = "1"


def tokens_fingerprint(samples: Samples) -> str:
    """A hash of every pair's tokens and labels, both sides, in sample order."""
    h = hashlib.sha256()
    sides = (samples, samples.rejected) if samples.rejected is not None else (samples,)
    for side in sides:
        for ids, labels in zip(side.input_ids, side.labels, strict=True):
            h.update(np.int64(len(ids)).tobytes())
            h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def logps_path(samples: Samples, settings: dict[str, Any]) -> Path:
    """Where the reference log-probs of `samples` under `settings` (model, weights, dtype, ...) are stored."""
    h = hashlib.sha256(VERSION.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokens_fingerprint(samples).encode())
    return token_cache_dir() / f"reference-logps-{h.hexdigest()[:24]}.npy"


def load_logps(path: Path, pairs: int) -> np.ndarray | None:
    """The stored (pairs, 2) array, or None when there is none (or it does not fit these pairs)."""
    if not path.is_file():
        return None
    try:
        found = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return found if found.shape == (pairs, 2) and found.dtype == np.float32 else None


def save_logps(path: Path, logps: np.ndarray) -> None:
    """Write atomically: temp file, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, np.ascontiguousarray(logps, dtype=np.float32))
    os.replace(tmp, path)
