"""Split reading, checking, tokenising and packing (the cheap, torch-free part of the data pipeline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from launcher.config import Config, ConfigError
from launcher.data.formats import require_chat_template
from launcher.data.rows import load_split
from launcher.data.tokenized import Samples, cache_dir, cache_key, load_samples, pack, save_samples, tokenize_rows
from launcher.launch.world import env_world


@dataclass
class RawSplits:
    """Checked rows of train and (optional) eval."""

    train: list[dict]
    eval: list[dict] | None
    reference: list[dict] | None = None


@dataclass
class DataSplits:
    """Tokenised (and possibly packed) train and eval samples."""

    train: Samples
    eval: Samples | None
    reference: Samples | None = None  # data.reference: every token carries loss (forgetting)


def read_splits(cfg: Config) -> RawSplits:
    """Read and check all data files; raise ConfigError naming file and line. No tokenizer needed."""
    d = cfg.data
    problems: list[str] = []
    train = evals = None
    try:
        train = load_split(d.train, d.format, "data.train", cfg.model.num_labels)
    except ConfigError as err:
        problems += err.problems
    if d.eval:
        try:
            evals = load_split(d.eval, d.format, "data.eval", cfg.model.num_labels)
        except ConfigError as err:
            problems += err.problems
    reference = None
    if d.reference:
        try:
            reference = load_split(d.reference, d.reference_format, "data.reference")
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    if d.eval_fraction > 0:
        order = np.random.default_rng(cfg.train.seed).permutation(len(train))
        n_eval = max(1, int(round(len(train) * d.eval_fraction)))
        evals = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in sorted(order[n_eval:])]
    return RawSplits(train=train, eval=evals, reference=reference)


def tokenize_split(rows: list[dict], cfg: Config, tokenizer: Any, field: str, build: bool) -> Samples | None:
    """Tokenise via the on-disk cache. With build=False, only read an existing cache (None if absent).
    data.reference rows are in their own format, and every token of them carries loss."""
    d = cfg.data
    fmt, mask_prompt = (d.reference_format, False) if field == "data.reference" else (d.format, d.mask_prompt)
    settings = {"format": fmt, "max_len": d.max_seq_len, "mask_prompt": mask_prompt}
    path = cache_dir() / f"{cache_key(rows, tokenizer, settings)}.npz"
    if path.exists():
        return check_dropped(load_samples(path), len(rows), cfg, field)
    if not build:
        return None
    if fmt == "chat":
        require_chat_template(tokenizer, cfg.model.tokenizer or cfg.model.path)
    samples = tokenize_rows(rows, fmt, tokenizer, d.max_seq_len, mask_prompt)
    if len(samples) > 0:
        save_samples(samples, path)
    return check_dropped(samples, len(rows), cfg, field)


def check_dropped(samples: Samples, total: int, cfg: Config, field: str) -> Samples:
    """Rows that lost every answer token to truncation are dropped: say how many, and refuse too many."""
    if not samples.dropped:
        return samples
    d = cfg.data
    share = samples.dropped / max(total, 1)
    what = (
        f"{field}: {samples.dropped} of {total} rows ({share:.0%}) lost every answer token to truncation at "
        f"data.max_seq_len={d.max_seq_len}"
    )
    if share > d.max_dropped_fraction or len(samples) == 0:
        raise ConfigError(
            [
                f"{what}: more than data.max_dropped_fraction={d.max_dropped_fraction:g} (raise max_seq_len, or "
                "shorten the prompts)"
            ]
        )
    if env_world()[0] == 0:
        from launcher.metrics import log

        log(f"{what}; they are left out")
    return samples


def finish_split(samples: Samples, cfg: Config, training: bool) -> Samples:
    """Pack the training split when asked (eval stays unpacked: its loss is per sample)."""
    if training and cfg.data.packing:
        return pack(samples, cfg.data.max_seq_len, cfg.train.seed)
    return samples
