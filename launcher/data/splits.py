"""Split reading, checking, tokenising and packing (the cheap, torch-free part of the data pipeline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from launcher.config import Config
from launcher.data.columns import RowShape, rendered_as
from launcher.data.formats import require_chat_template, require_tool_calls
from launcher.data.preference import pack_pairs, tokenize_pairs, uses_messages
from launcher.data.readers import Source, origin
from launcher.data.rows import load_split
from launcher.data.tokenized import (
    Samples,
    cache_key,
    load_samples,
    merged,
    pack,
    save_samples,
    subset,
    token_cache_dir,
    tokenize_rows,
)
from launcher.errors import ConfigError
from launcher.metrics import log
from launcher.world import env_world


@dataclass
class RawSplits:
    """Checked rows of train and (optional) eval. A multi-task run's rows are its tasks' rows in order,
    `train_parts` (and `eval_parts` for an eval_fraction split) holding how many each task has."""

    train: list[dict]
    eval: list[dict] | None
    reference: list[dict] | None = None
    train_parts: list[int] | None = None
    eval_parts: list[int] | None = None
    origins: dict[str, tuple[str, int]] | None = None  # per split: where its rows came from, how many were read


@dataclass
class DataSplits:
    """Tokenised (and possibly packed) train and eval samples."""

    train: Samples
    eval: Samples | None
    reference: Samples | None = None  # data.reference: every token carries loss (forgetting)
    task_names: list[str] | None = None  # multi-task: Samples.tasks index these
    origins: dict[str, tuple[str, int]] | None = None  # per split: where its rows came from, how many were read
    fingerprints: dict[str, str] | None = None  # per split: its token cache key (checked on resume)


def read_splits(cfg: Config) -> RawSplits:
    """Read and check all data files; raise ConfigError naming file and line. No tokenizer needed."""
    d = cfg.data
    problems: list[str] = []

    def load(sources: Source | list[str], fmt: str, field: str, columns: dict[str, str] | None = None) -> list[dict]:
        shape = RowShape(fmt, d.columns if columns is None else columns, d.system_prompt)
        try:
            return load_split(sources, shape, field, cfg.model.num_labels)
        except ConfigError as err:
            problems.extend(err.problems)
            return []

    tasks = d.tasks()
    if tasks is None:
        parts = [load(d.train, d.format, "data.train")]
    else:
        parts = [load(t, t.format or d.format, f"data.train[{i}]", t.columns) for i, t in enumerate(tasks)]
    evals = load(d.eval, d.format, "data.eval") if d.eval else None
    reference = load(d.reference, d.reference_format, "data.reference", {}) if d.reference else None
    if problems:
        raise ConfigError(problems)
    origins = _origins(cfg, parts, evals, reference)
    eval_parts = None
    if d.eval_fraction > 0:
        cut = [_split_off(rows, d.eval_fraction, cfg.train.seed) for rows in parts]
        parts, held = [kept for kept, _ in cut], [out for _, out in cut]
        evals, eval_parts = [r for rows in held for r in rows], [len(rows) for rows in held]
        origins["data.eval"] = (f"data.eval_fraction={d.eval_fraction:g} of data.train", len(evals))
    return RawSplits(
        train=[r for rows in parts for r in rows],
        eval=evals,
        reference=reference,
        train_parts=None if tasks is None else [len(rows) for rows in parts],
        eval_parts=None if tasks is None else eval_parts,
        origins=origins,
    )


def _origins(cfg: Config, parts: list[list[dict]], evals: list[dict] | None, reference: list[dict] | None) -> dict:
    """{split: (where its rows came from, rows read)}; a multi-task train names each task's source."""
    d, tasks = cfg.data, cfg.data.tasks()
    if tasks is None:
        found = {"data.train": (origin(d.train, "data.train"), len(parts[0]))}
    else:
        where = [f"[{i}] {origin(t, f'data.train[{i}]')}: {len(rows)}" for i, (t, rows) in enumerate(zip(tasks, parts))]
        found = {"data.train": ("; ".join(where), sum(len(rows) for rows in parts))}
    if evals is not None:
        found["data.eval"] = (origin(d.eval, "data.eval"), len(evals))
    if reference is not None:
        found["data.reference"] = (origin(d.reference, "data.reference"), len(reference))
    return found


def _split_off(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept, held out): a seeded `fraction` of the rows held out for eval."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, int(round(len(rows) * fraction)))
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in order[:n_eval]]


def tokenize_split(
    rows: list[dict], cfg: Config, tokenizer: Any, field: str, build: bool, fmt: str | None = None
) -> Samples | None:
    """Tokenise via the on-disk cache. With build=False, only read an existing cache (None if absent).
    data.reference rows are in their own format, and every token of them carries loss."""
    d = cfg.data
    fmt, mask_prompt = (d.reference_format, False) if field == "data.reference" else (fmt or d.format, d.mask_prompt)
    fmt = rendered_as(fmt)
    settings = {"format": fmt, "max_len": d.max_seq_len, "mask_prompt": mask_prompt}
    key = cache_key(rows, tokenizer, settings)
    path = token_cache_dir() / f"{key}.npz"
    if path.exists():
        samples = load_samples(path)
        samples.fingerprint = key
        return check_dropped(samples, len(rows), cfg, field)
    if not build:
        return None
    if fmt == "chat" or (fmt == "preference" and uses_messages(rows)):
        require_chat_template(tokenizer, cfg.model.tokenizer or cfg.model.path)
        require_tool_calls(rows, tokenizer, field)
    if fmt == "preference":
        samples = tokenize_pairs(rows, tokenizer, d.max_seq_len)
    else:
        samples = tokenize_rows(rows, fmt, tokenizer, d.max_seq_len, mask_prompt)
    if len(samples) > 0:
        save_samples(samples, path)
    samples.fingerprint = key
    return check_dropped(samples, len(rows), cfg, field)


def tokenize_tasks(rows: list[dict], parts: list[int], cfg: Config, tokenizer: Any, field: str) -> Samples:
    """Tokenise a multi-task split task by task (each in its own format); the merged samples know their task."""
    tasks = cfg.data.tasks()
    bounds = np.cumsum([0, *parts])
    pieces = [
        tokenize_split(rows[bounds[i] : bounds[i + 1]], cfg, tokenizer, f"{field}[{i}]", True, t.format)
        for i, t in enumerate(tasks)
    ]
    return merged(pieces)


def check_dropped(samples: Samples, total: int, cfg: Config, field: str) -> Samples:
    """Rows that lost every answer token to truncation are dropped: say how many, and refuse too many."""
    if not samples.dropped:
        return samples
    d = cfg.data
    share = samples.dropped / max(total, 1)
    unit, lost = ("pairs", "a completion") if samples.rejected is not None else ("rows", "every answer token")
    what = (
        f"{field}: {samples.dropped} of {total} {unit} ({share:.0%}) lost {lost} to truncation at "
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
        log(f"{what}; they are left out")
    return samples


def finish_split(samples: Samples, cfg: Config, training: bool) -> Samples:
    """Pack the training split when asked (eval stays unpacked: its loss is per sample). A multi-task split is
    packed task by task, so that each packed row belongs to one task; a preference split pair by pair."""
    if not (training and cfg.data.packing):
        return samples
    if samples.rejected is not None:  # preference pairs: a packed row holds whole pairs
        return pack_pairs(samples, cfg.data.max_seq_len, cfg.train.seed)
    if samples.tasks is None:
        return pack(samples, cfg.data.max_seq_len, cfg.train.seed)
    ids = [np.flatnonzero(samples.tasks == t) for t in range(int(samples.tasks.max()) + 1)]
    return merged([pack(subset(samples, i), cfg.data.max_seq_len, cfg.train.seed) for i in ids])
