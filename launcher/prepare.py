"""Everything checked and prepared before a process group starts or a model loads.

- The run directory: a directory that belongs to a run with a different meaning is never reused silently.
- The data: rows read and checked, then tokenised once under a file lock (the first rank builds the
  cache, the others wait on the lock and reuse it), so slow preprocessing never trips a collective timeout.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from launcher.config import Config
from launcher.data.splits import DataSplits, read_splits, tokenize_tasks
from launcher.data.splits import finish_split as _finish
from launcher.data.splits import tokenize_split as _tokenize
from launcher.data.tokenized import Samples, token_cache_dir
from launcher.errors import ConfigError
from launcher.metrics import log
from launcher.run_dir import CONFIG_FILE, RunDir
from launcher.run_lock import lock_output_dir
from launcher.world import env_world

# Fields that may change between runs in one output_dir without changing what the run means. The split of
# the global batch into micro-batches, accumulation and ranks may change too: resume checks the product, and
# a checkpoint written by another strategy family is refused when it is loaded.
HARMLESS_PREFIXES = (
    "output_dir",
    "logging.",
    "checkpoint.",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.eval_batches",
    "train.micro_batch_size",
    "train.grad_accum",
    "distributed.",
)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def meaningful_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted fields whose values differ and that change what the run means."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(HARMLESS_PREFIXES)]


def check_output_dir(cfg: Config) -> Path:
    """Refuse an OUTPUT_DIR that holds a run of a different config (nothing is written)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"output_dir: {out} is a file, not a directory"])
    old = RunDir(out).config()
    if old is not None:
        changed = meaningful_changes(old, cfg.model_dump(mode="json"))
        if changed:
            raise ConfigError(
                [
                    f"output_dir: {out} holds a run with a different config ({', '.join(changed[:8])} differ). "
                    "Use a new output_dir, or delete that directory if you mean to discard it."
                ]
            )
    return out


def prepare_output_dir(cfg: Config) -> Path:
    """Create and lock OUTPUT_DIR (rank 0); refuse one in use by another run or holding a run of a different
    config; write config.yaml (rank 0)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        check_output_dir(cfg)  # names the problem
    rank, _, _ = env_world()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log(lock_output_dir(out, cfg.checkpoint.run_lock))
    check_output_dir(cfg)
    if rank == 0:
        tmp = out / f".{CONFIG_FILE}.tmp"
        tmp.write_text(cfg.to_yaml())
        os.replace(tmp, out / CONFIG_FILE)
    return out


def prepare_data(cfg: Config, tokenizer: Any) -> DataSplits:
    """Read, check, tokenise (cached, once per machine) and pack both splits."""
    raw = read_splits(cfg)
    lock_path = token_cache_dir() / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        train = _tokenized(raw.train, raw.train_parts, cfg, tokenizer, "data.train")
        evals = _tokenized(raw.eval, raw.eval_parts, cfg, tokenizer, "data.eval") if raw.eval else None
        ref = _tokenize(raw.reference, cfg, tokenizer, "data.reference", build=True) if raw.reference else None
    return DataSplits(
        train=_finish(train, cfg, training=True),
        eval=_finish(evals, cfg, training=False) if evals is not None else None,
        reference=ref,
        task_names=cfg.data.task_names(),
        origins=raw.origins,
        fingerprints={
            f: s.fingerprint for f, s in (("data.train", train), ("data.eval", evals)) if s and s.fingerprint
        },
    )


def _tokenized(rows: list[dict], parts: list[int] | None, cfg: Config, tokenizer: Any, field: str) -> Samples:
    """One split tokenised: as one piece, or (multi-task) task by task."""
    if parts is None:
        return _tokenize(rows, cfg, tokenizer, field, build=True)
    return tokenize_tasks(rows, parts, cfg, tokenizer, field)
