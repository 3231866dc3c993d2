"""Where ftl keeps what it can rebuild: one definition of the cache directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """ftl's cache ($FTL_CACHE_DIR, else ~/.cache/ftl): tokenised splits, the measured CPU peak, converted models."""
    return Path(os.environ.get("FTL_CACHE_DIR") or Path.home() / ".cache" / "ftl")
