"""Read raw rows from where a split comes from: a file, a glob or directory of shard files, a `save_to_disk`
directory or a hub dataset.

JSONL and JSON files (shards too) are parsed here, line by line: every bad row is named by file and line, and
each row stays as written; Arrow would unify the rows' schemas (docs/data.md). CSV is read here too; Parquet,
Arrow files, saved and hub datasets come through Arrow (launcher/data/arrow_rows.py). Checking the rows is
launcher/data/rows.py's job.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import DataSource
from launcher.data.arrow_rows import hub_name, hub_splits, is_saved_dataset, read_arrow, read_hub, read_parquet
from launcher.data.arrow_rows import read_saved as _read_saved
from launcher.errors import ConfigError

Row = dict[str, Any]

FILE_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq", ".arrow")
GLOB_CHARS = "*?["
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `name` or `owner/name`
Source = str | DataSource


@dataclass
class Piece:
    """The rows of one shard file or dataset split, and how messages name it."""

    name: str
    rows: list[Row]


def read_rows(path: str, field: str) -> list[Row]:
    """All rows of one file; `field` (e.g. 'data.train') prefixes every problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{field}: file not found: {p}"])
    suffix = p.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(p, field)
        if suffix == ".json":
            return _read_json(p, field)
        if suffix == ".csv":
            with p.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{field}: {p}: not UTF-8 text (byte {exc.start})"]) from None
    if suffix in (".parquet", ".pq"):
        return read_parquet(p, field)
    if suffix == ".arrow":
        return read_arrow(p, field)
    raise ConfigError([f"{field}: {p}: unsupported file type '{suffix}' (use {', '.join(FILE_TYPES)})"])


def _fields(source: Source) -> tuple[str, str | None, str | None, str | None]:
    if isinstance(source, str):
        return source, None, None, None
    return source.path, source.split, source.subset, source.revision


def default_split(field: str) -> str | None:
    """The split read when none is named: 'train' for training data; eval and reference data name theirs."""
    return "train" if field.startswith("data.train") else None


def _is_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS) and not Path(path).expanduser().exists()


def read_source(source: Source, field: str) -> list[Piece]:
    """The rows of one source, piece by piece (one per shard file or dataset split)."""
    path, split, subset, revision = _fields(source)
    p = Path(path).expanduser()
    if (p.exists() or _is_glob(path)) and revision is not None:
        raise ConfigError([f"{field}: {path} is local: `revision` applies to hub datasets"])
    if _is_glob(path):
        files = sorted(glob.glob(str(p), recursive=True))
        if not files:
            raise ConfigError([f"{field}: no file matches {path}"])
        return _files(files, split, subset, field)
    if is_saved_dataset(p):
        if subset is not None:
            raise ConfigError([f"{field}: {p} is a save_to_disk directory: `subset` applies to hub datasets"])
        return [Piece(*_read_saved(p, split, default_split(field), field))]
    if p.is_dir():
        if subset is not None:  # a hub repository's layout, its subsets declared in its README
            return [Piece(*read_hub(str(p), split or default_split(field), subset, None, field))]
        return _files(_split_files(p, split, field), None, None, field)
    if p.is_file():
        return _files([str(p)], split, subset, field)
    if HUB_ID.match(path) and p.suffix.lower() not in FILE_TYPES:
        return [Piece(*_read_hub_split(path, split, subset, revision, field))]
    raise ConfigError([f"{field}: file not found: {p}"])


def _files(files: list[str], split: str | None, subset: str | None, field: str) -> list[Piece]:
    if split is not None or subset is not None:
        raise ConfigError([f"{field}: {files[0]}: `split` and `subset` apply to hub datasets and dataset directories"])
    pieces, problems = [], []
    for f in files:
        try:
            pieces.append(Piece(f, read_rows(f, field)))
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return pieces


def _split_files(p: Path, split: str | None, field: str) -> list[str]:
    """The data files of one split of a directory: all of them, or, where their names or folders name splits
    (train-00000-of-00002.parquet, test/...), those of `split` (training data: 'train'), as `datasets` finds
    them."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(p)), base_path=str(p))
    except EmptyDatasetError:
        raise ConfigError([f"{field}: {p}: a directory with no data files ({', '.join(FILE_TYPES)})"]) from None
    splits = {str(k): sorted(v) for k, v in found.items()}
    if split is None and len(splits) == 1:
        return next(iter(splits.values()))
    name = split or default_split(field)
    if name not in splits:
        how = f"`split: {name}` is not one of them" if name else f"name one: {{path: {p}, split: ...}}"
        raise ConfigError([f"{field}: {p} holds the splits {', '.join(splits)}; {how}"])
    return splits[name]


def _read_hub_split(
    path: str, split: str | None, subset: str | None, revision: str | None, field: str
) -> tuple[str, list[Row]]:
    name = split or default_split(field)
    if name is None:
        known = hub_splits(path, subset, revision)
        listed = f" (its splits: {', '.join(known)})" if known else ""
        raise ConfigError([f"{field}: {path}: name the split to read{listed}: {{path: {path}, split: ...}}"])
    return read_hub(path, name, subset, revision, field)


def origin(source: Source | list[str], field: str) -> str:
    """Where a split comes from, for the start line."""
    if isinstance(source, list):
        return ", ".join(origin(s, field) for s in source)
    path, split, subset, revision = _fields(source)
    p = Path(path).expanduser()
    if _is_glob(path):
        return f"{path} ({len(glob.glob(str(p), recursive=True))} files)"
    if p.exists():
        return path + (f" split {split}" if split else "") + (f" subset {subset}" if subset else "")
    name = hub_name(path, subset, split or default_split(field))
    return name + (f" revision {revision}" if revision else "") + " (Hugging Face cache)"


def _read_jsonl(p: Path, field: str) -> list[Row]:
    rows, problems = [], []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{field}: {p} line {lineno}: not UTF-8 text (byte {exc.start} of the line)")
                continue
            if not line.strip():
                continue
            if lineno == 1 and line.lstrip().startswith("["):
                raise ConfigError(
                    [f"{field}: {p} holds a JSON array, not one object per line: name it .json, or write JSONL"]
                )
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{field}: {p} line {lineno}: malformed JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{field}: {p} line {lineno}: expected a JSON object, got {type(obj).__name__}")
                continue
            obj["_line"] = lineno
            rows.append(obj)
    if problems:
        raise ConfigError(problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []))
    return rows


def _read_json(p: Path, field: str) -> list[Row]:
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{field}: {p} line {exc.lineno}: malformed JSON ({exc.msg})"]) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConfigError([f"{field}: {p}: expected a list of JSON objects (or {{'data': [...]}})"])
    return data
