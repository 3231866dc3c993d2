"""Rows that come through Arrow: Parquet files (pyarrow), `.arrow` files, `save_to_disk` directories and hub
datasets (`datasets`, through the Hugging Face cache).

`datasets` is imported only here and only when such a source is read: importing it takes seconds, and
`ftl validate` on a JSONL file should not pay for it.

Arrow gives all rows of a table one schema. Where a list column holds message dicts and only some messages
carry a key (`tool_calls` on assistant turns only), every other message gets that key with the value None; a
chat template asks `message.tool_calls is defined`, so that None would change what it renders. The None-valued
keys are dropped from every dict inside a list column (at any depth: a tool call's `function` too), giving back
the messages as they were written. `content` stays even when None: Arrow cannot tell a null from a missing
value, and OpenAI-style tool-call turns write `"content": null`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launcher.errors import ConfigError

Row = dict[str, Any]
OFFLINE_VALUES = ("1", "true", "yes", "on")
KEPT_WHEN_NONE = ("content",)


def is_saved_dataset(p: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def as_written(rows: list[Row]) -> list[Row]:
    """Drop the None-valued keys Arrow added to the dicts inside list columns (messages); in place."""
    for row in rows:
        for key, value in row.items():
            if isinstance(value, list):
                row[key] = _without_none(value)
    return rows


def _without_none(value: Any) -> Any:
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None or k in KEPT_WHEN_NONE}
    return value


def read_parquet(p: Path, field: str) -> list[Row]:
    """All rows of one Parquet file."""
    import pyarrow.parquet as pq

    try:
        return as_written(pq.read_table(p).to_pylist())
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ConfigError([f"{field}: {p}: not a readable Parquet file ({exc})"]) from None


def read_arrow(p: Path, field: str) -> list[Row]:
    """All rows of one Arrow file (as `datasets` writes them: its cache files, a save_to_disk shard)."""
    from datasets import Dataset

    try:
        return as_written(Dataset.from_file(str(p)).to_list())
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ConfigError([f"{field}: {p}: not a readable Arrow file ({exc})"]) from None


def read_saved(p: Path, split: str | None, default_split: str | None, field: str) -> tuple[str, list[Row]]:
    """(name for messages, rows) of a save_to_disk directory; a DatasetDict needs a split."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(p))
    except Exception as exc:  # a damaged directory: missing state, unreadable Arrow shards
        raise ConfigError([f"{field}: {p}: not a readable save_to_disk directory ({exc})"]) from None
    if not isinstance(data, DatasetDict):
        if split is not None:
            raise ConfigError([f"{field}: {p} holds one Dataset, not splits: drop `split: {split}`"])
        return str(p), as_written(data.to_list())
    name = split or default_split
    if name not in data:
        how = f"`split: {name}` is not one of them" if name else f"name one: {{path: {p}, split: ...}}"
        raise ConfigError([f"{field}: {p} is a DatasetDict with splits {', '.join(data)}; {how}"])
    return f"{p} split {name}", as_written(data[name].to_list())


def hub_name(path: str, subset: str | None, split: str | None) -> str:
    """How a hub dataset's split is named in messages: `owner/name [subset s] split x`."""
    return path + (f" subset {subset}" if subset else "") + (f" split {split}" if split else "")


def datasets_cache() -> str:
    """Where `datasets` keeps prepared sets: $HF_DATASETS_CACHE, else $HF_HOME/datasets, else ~/.cache/..."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.path.expanduser(os.environ["HF_DATASETS_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "datasets")


def offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids reaching the hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in OFFLINE_VALUES


def read_hub(
    path: str, split: str | None, subset: str | None, revision: str | None, field: str
) -> tuple[str, list[Row]]:
    """(name for messages, rows) of a hub dataset's split, or of a dataset directory laid out as a hub repo,
    through `datasets.load_dataset` and the Hugging Face cache."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = hub_name(path, subset, split)
    cache = datasets_cache()
    try:
        data = datasets.load_dataset(path, name=subset, split=split, revision=revision, cache_dir=cache)
    except ConnectionError as exc:
        raise ConfigError([_unreachable(path, where, field, cache, exc)]) from None
    except DatasetNotFoundError as exc:
        local = "" if Path(path).expanduser().exists() else "no such local path, and "
        raise ConfigError([f"{field}: {where}: {local}not found on the hub ({_first_line(exc)})"]) from None
    except (ValueError, FileNotFoundError) as exc:  # unknown split or subset, several cached subsets, no data files
        raise ConfigError([f"{field}: {where}: {_first_line(exc)}"]) from None
    return where, as_written(data.to_list())


def hub_splits(path: str, subset: str | None, revision: str | None) -> list[str]:
    """The split names of a hub dataset, where they can be learnt without downloading it (else [])."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(path, subset, revision=revision, cache_dir=datasets_cache()))
    except Exception:  # offline, unreachable, not found: the caller's message stands without the list
        return []


def _unreachable(path: str, where: str, field: str, cache: str, exc: Exception) -> str:
    if offline():
        local = "" if Path(path).expanduser().exists() else "no such local path, and "
        return (
            f"{field}: {where}: {local}not in the Hugging Face cache ({cache}); HF_HUB_OFFLINE=1 forbids "
            "downloading it: load it once with the hub reachable (unset HF_HUB_OFFLINE), or set HF_DATASETS_CACHE "
            "to a cache that holds it"
        )
    return f"{field}: {where}: the hub could not be reached ({_first_line(exc)}); cache: {cache}"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
