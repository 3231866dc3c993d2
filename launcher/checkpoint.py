"""Checkpoints that are either complete or ignored.

Layout: CKPT_ROOT/step-00000040/ with
  model/            the strategy's own sharded format (DCP, DeepSpeed engine, or safetensors + optimizer)
  rng-rank{r}.pt    RNG states of rank r (tensors and plain numbers only; loaded with weights_only=True)
  trainer_state.json step, samples, tokens, world size, strategy, W&B id, ftl version, config + hash
  MANIFEST-rank{r}.json  checksums of rank r's share of the files above (launcher/manifest.py)
  COMPLETE          written last, after everything else is fsynced, by rank 0

Every rank writes into CKPT_ROOT/.step-00000040.tmp; after a barrier rank 0 fsyncs, renames the directory
into place and writes COMPLETE. A directory without COMPLETE (killed mid-write) is never loaded, never
counted as latest, and is cleaned up by the next save. Retention runs only after a checkpoint is complete.
A complete checkpoint is verified against its manifest before it is loaded; one that fails is renamed
corrupt-step-N (kept for inspection, never loaded again) and the run resumes from the one before it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from launcher import __version__
from launcher.config import Config
from launcher.config_checks import run_dir_of
from launcher.dist import DistEnv, all_lists, barrier
from launcher.errors import ConfigError
from launcher.manifest import verify_share, write_share
from launcher.metrics import log
from launcher.prepare import flatten, meaningful_changes
from launcher.rng import global_streams_state, seed_global_streams, set_global_streams, untouched_global_streams
from launcher.run_dir import (
    CHECKPOINT_MODEL_DIR,
    CORRUPT_PREFIX,
    MARKER,
    STEP_DIR,
    TRAIN_STATE_FILE,
    checkpoint_step,
    is_complete,
    read_train_state,
    step_dir_name,
)
from launcher.strategies.base import Strategy
from launcher.strategies.traits import traits

# "STEP:SECONDS[,STEP:SECONDS...]": the write of those steps' checkpoints pauses before the rename (tests kill
# or signal a run at a known point).
SLOW_WRITE_ENV = "FTL_TEST_SLOW_CHECKPOINT"


@dataclass
class TrainState:
    """Counters that define where a run is; saved and restored like any other component."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    wandb_id: str | None = None
    skipped_steps: int = 0  # train.nonfinite=skip: steps whose update was dropped, in all
    skipped_in_a_row: int = 0  # ... and since the last update
    reference_start: float | None = None  # data.reference: the pre-trained model's loss on it

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any]) -> TrainState:
        """The counters of a checkpoint's trainer_state.json (fields it predates keep their defaults)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


class CheckpointWriteError(Exception):
    """A checkpoint could not be written for a reason the user can fix (a full disk); exit 1, no traceback."""


def disk_full(err: BaseException, where: Path) -> bool:
    """Whether `err` (or what caused it) is ENOSPC, or the file system at `where` has (almost) no room left."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(where).free < 2**20
    except OSError:
        return False


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(cfg.to_yaml().encode()).hexdigest()[:16]


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Saves, finds, loads and prunes checkpoints of one run. Every rank holds one."""

    def __init__(self, cfg: Config, env: DistEnv, strategy_name: str, data: dict[str, str] | None = None):
        self.cfg = cfg
        self.data = data or {}  # each split's fingerprint (its token cache key), recorded and checked on resume
        self.env = env
        self.strategy_name = strategy_name
        self.run = run_dir_of(cfg)
        self.root = self.run.checkpoint_root
        self.last_save_time = time.monotonic()

    def due_by_steps(self, step: int) -> bool:
        """Whether `every_steps` asks for a checkpoint after `step` (the same answer on every rank)."""
        return bool(self.cfg.checkpoint.every_steps) and step % self.cfg.checkpoint.every_steps == 0

    def due_by_time(self) -> bool:
        """Whether `every_minutes` has passed on this rank's clock; ranks must agree on it (StopRequest)."""
        minutes = self.cfg.checkpoint.every_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= minutes * 60

    @untouched_global_streams()  # the streams saved here are those the next step draws from, whatever the writers do
    def save(self, strategy: Strategy, state: TrainState) -> Path:
        """Write a complete checkpoint for `state.step` (all ranks call this)."""
        t0 = time.perf_counter()
        final = self.root / step_dir_name(state.step)
        tmp = self.root / f".{step_dir_name(state.step)}.tmp"
        if self.env.is_main:
            self._remove_partial()
            tmp.mkdir(parents=True)
        barrier(self.env)
        try:
            torch.save(global_streams_state(), tmp / f"rng-rank{self.env.rank}.pt")
            strategy.save_checkpoint(tmp / CHECKPOINT_MODEL_DIR)
            if self.env.is_main:
                (tmp / TRAIN_STATE_FILE).write_text(json.dumps(self._trainer_state(state), indent=1))
        except Exception as err:
            raise self._write_failed(err, tmp, state.step) from err
        barrier(self.env)  # every rank has finished writing
        hashing = time.perf_counter()
        write_share(tmp, self.env.rank, self.env.world_size)
        barrier(self.env)
        hashing = time.perf_counter() - hashing
        if self.env.is_main:
            _pause_for_tests(state.step)
            _fsync_tree(tmp)
            if final.exists():  # an earlier incomplete attempt at the same step
                shutil.rmtree(final)
            tmp.rename(final)
            (final / MARKER).write_text(f"{state.step}\n")
            _fsync_dir(final)
            _fsync_dir(self.root)
            size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
            seconds = time.perf_counter() - t0
            mib = size / 2**20
            log(f"checkpoint step {state.step}: {final} ({mib:.1f} MiB, {seconds:.2f}s; checksums {hashing:.3f}s)")
            self._prune()
        barrier(self.env)
        self.last_save_time = time.monotonic()
        return final

    def _write_failed(self, err: Exception, tmp: Path, step: int) -> Exception:
        """Remove the partial write (a full disk stays full otherwise, and the rerun fails too); a full disk is
        named as such, whatever the serializer's own message says."""
        shutil.rmtree(tmp, ignore_errors=True)
        if not disk_full(err, self.root):
            return err
        latest = self.run.latest_checkpoint()
        free = shutil.disk_usage(self.root).free / 2**20
        return CheckpointWriteError(
            f"checkpoint step {step}: no space left on device under {self.root} ({free:.1f} MiB free). The "
            f"partial checkpoint was removed. Free space (or lower checkpoint.keep_last, or set checkpoint.dir), "
            f"then run the same command again: it resumes from {latest or 'the start (no complete checkpoint yet)'}"
        )

    def _trainer_state(self, state: TrainState) -> dict[str, Any]:
        return {
            **state.state_dict(),
            "world_size": self.env.world_size,
            "dp_size": self.env.dp_size,
            "strategy": self.strategy_name,
            "ftl_version": __version__,
            "config_hash": config_hash(self.cfg),
            "data_fingerprints": self.data,
            "config": self.cfg.model_dump(mode="json"),
            "time": time.time(),
        }

    def _remove_partial(self) -> None:
        """Leftovers of a killed write: temp dirs and step dirs without the marker."""
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            if p.name.startswith(".step-") or (STEP_DIR.match(p.name) and not is_complete(p)):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        """Keep the newest keep_last complete checkpoints (+ every keep_every-th step)."""
        c = self.cfg.checkpoint
        done = self.run.checkpoints()
        for p in done[: max(0, len(done) - c.keep_last)]:
            if c.keep_every and checkpoint_step(p) % c.keep_every == 0:
                continue
            # invalidate before deleting: a kill mid-rmtree must leave an ignored directory, never a
            # "complete" one without its weights
            (p / MARKER).unlink()
            _fsync_dir(p)
            shutil.rmtree(p)

    def resume_path(self) -> Path | None:
        """What to resume from: the configured PATH, or the latest complete checkpoint that verifies (auto), or
        nothing. Collective: every rank verifies its share of the files and all learn the verdict."""
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not is_complete(path):
                raise ConfigError([f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} marker)"])
            problems = self._verify(path)
            if problems:
                raise ConfigError([f"checkpoint.resume: {path} is corrupt: {'; '.join(problems)}"])
            return path
        corrupt = []
        for path in reversed(self.run.checkpoints()):
            problems = self._verify(path)
            if not problems:
                return path
            corrupt.append(self._set_aside(path, problems))
        if corrupt:
            raise ConfigError(
                [f"checkpoint: no verified checkpoint left to resume from; set aside as corrupt: {', '.join(corrupt)}"]
            )
        return None

    def _verify(self, path: Path) -> list[str]:
        """Problems with `path` found by any rank (each checks a share of its files); the same list on every rank."""
        t0 = time.perf_counter()
        has_manifest, problems = verify_share(path, self.env.rank, self.env.world_size)
        problems = all_lists(problems, self.env)
        if self.env.is_main and not problems and has_manifest:
            log(f"{path.name}: checksums verified in {time.perf_counter() - t0:.3f}s")
        elif self.env.is_main and not problems:
            log(f"{path.name}: no checksum manifest (written before checkpoints were verified); loaded unverified")
        return problems

    def _set_aside(self, path: Path, problems: list[str]) -> str:
        """Rename a corrupt checkpoint out of the way (never deleted: the user may want the bytes) and say so."""
        aside, n = path.with_name(f"{CORRUPT_PREFIX}{path.name}"), 1
        while aside.exists():  # the same step set aside before (a rerun wrote it anew, and it rotted again)
            n += 1
            aside = path.with_name(f"{CORRUPT_PREFIX}{path.name}.{n}")
        barrier(self.env)
        if self.env.is_main:
            log(f"checkpoint {path} is corrupt ({'; '.join(problems)}); moved to {aside}, trying the one before it")
            path.rename(aside)
            _fsync_dir(path.parent)
        barrier(self.env)
        return aside.name

    def load(self, strategy: Strategy, path: Path) -> TrainState:
        """Restore model, optimizer and counters from `path` (all ranks); the random streams are restored by
        `start_global_streams`, just before the first step."""
        t0 = time.perf_counter()
        saved = read_train_state(path)
        self._check_compatible(saved)
        strategy.load_checkpoint(path / CHECKPOINT_MODEL_DIR)
        log_fn = log if self.env.is_main else (lambda _msg: None)
        log_fn(
            f"resumed from {path} at step {saved['step']} (saved by {saved['world_size']} rank(s); "
            f"loaded in {time.perf_counter() - t0:.3f}s)"
        )
        changes = harmless_changes(saved["config"], self.cfg.model_dump(mode="json"))
        if changes:
            log_fn(f"config changed since the checkpoint (allowed): {'; '.join(changes)}")
        return TrainState.from_state_dict(saved)

    def start_global_streams(self, path: Path | None, seed: int, step: int) -> None:
        """Seed this rank's global random streams for a fresh run, or restore those saved at `path` (resumed at
        `step`). A rank the saving run did not have (resumed on more ranks) is seeded from seed, step and rank."""
        rng_file = path / f"rng-rank{self.env.rank}.pt" if path is not None else None
        if rng_file is not None and rng_file.exists():
            set_global_streams(torch.load(rng_file, weights_only=True))
        else:
            seed_global_streams(seed + self.env.rank + step * 1_000_003)

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        old, new = saved["config"], self.cfg.model_dump(mode="json")
        problems = [
            f"{k}: changed since the checkpoint ({_get(old, k)!r} -> {_get(new, k)!r}); it changes what the run means"
            for k in meaningful_changes(old, new)
        ]
        t_old, t_new = old["train"], self.cfg.train
        old_dp = saved.get("dp_size", saved["world_size"])  # checkpoints before parallel dimensions: dp = world
        old_batch = t_old["micro_batch_size"] * t_old["grad_accum"] * old_dp
        new_batch = t_new.micro_batch_size * t_new.grad_accum * self.env.dp_size
        if old_batch != new_batch:
            problems.append(
                f"train.micro_batch_size × train.grad_accum × world size: global batch {new_batch} "
                f"differs from the checkpoint's {old_batch}"
            )
        if _family(saved["strategy"]) != _family(self.strategy_name):
            problems.append(
                f"distributed.strategy: checkpoint written by '{saved['strategy']}' cannot be "
                f"loaded by '{self.strategy_name}'"
            )
        problems += self._data_changes(saved.get("data_fingerprints") or {})
        if problems:
            raise ConfigError(problems)

    def _data_changes(self, saved: dict[str, str]) -> list[str]:
        """Splits whose tokenised data differ from those the checkpoint was trained on: problems, or (with
        checkpoint.allow_data_change) a log line."""
        d = self.cfg.data
        sources = {"data.train": d.train, "data.eval": d.eval or "data.eval_fraction of data.train"}
        changed = [
            f"{field} ({sources[field]}): the data differ from the checkpoint's (fingerprint {old} -> {new})"
            for field, old in saved.items()
            if field in sources and (new := self.data.get(field)) is not None and new != old
        ]
        if changed and self.cfg.checkpoint.allow_data_change:
            if self.env.is_main:
                log(f"data changed since the checkpoint (checkpoint.allow_data_change): {'; '.join(changed)}")
            return []
        hint = (
            "; the samples of step k would no longer be those the run trained on. Restore the data, use a new "
            "output_dir, or set checkpoint.allow_data_change: true"
        )
        return [c + hint for c in changed]


def harmless_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'field (old -> new)' for each field that differs but does not change what the run means."""
    a, b = flatten(old), flatten(new)
    meaningful = set(meaningful_changes(old, new))
    return [
        f"{k} ({a.get(k)!r} -> {b.get(k)!r})"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in meaningful
    ]


def _pause_for_tests(step: int) -> None:
    for item in filter(None, os.environ.get(SLOW_WRITE_ENV, "").split(",")):
        at, seconds = item.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def _family(strategy: str) -> str:
    return traits(strategy).family


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d if d != {} else None
