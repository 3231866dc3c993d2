"""Data: read + check rows (before any model loads), tokenise once (cached), pack, sample, collate.

Names are imported lazily so that `ftl validate` (which only reads and checks rows) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GlobalBatchSampler": "launcher.data.batches",
    "MixtureSampler": "launcher.data.batches",
    "Collator": "launcher.data.batches",
    "collate": "launcher.data.batches",
    "label_token_count": "launcher.data.batches",
    "PairCollator": "launcher.data.pair_batches",
    "Samples": "launcher.data.tokenized",
    "DataSplits": "launcher.data.splits",
    "RawSplits": "launcher.data.splits",
    "read_splits": "launcher.data.splits",
    "tokenize_split": "launcher.data.splits",
    "finish_split": "launcher.data.splits",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(importlib.import_module(_EXPORTS[name]), name)
