"""Checksums of a checkpoint's files: written before its COMPLETE marker, verified before it is loaded.

COMPLETE says every file was written and fsynced; it cannot say the bytes are still the ones written (a bad disk,
a partial rsync, a copy between file systems). So each rank of the saving run hashes every world-th file of the
checkpoint (sorted by path: the cost is shared like the writing) into MANIFEST-rank{r}.json, and a loading run
verifies the same way before it trusts a byte. xxh3-128 (the `xxhash` package, already installed for `datasets`)
hashes faster than a disk reads, so verification costs about one more read of files that are in the page cache
right after a save. Torch-free: `ftl check RUN_DIR` verifies without starting a run.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import xxhash

from launcher.run_dir import MANIFEST_PREFIX, MARKER, checkpoint_step, complete_checkpoints

Entry = tuple[int, str]  # (size in bytes, xxh3-128 hex digest)


def data_files(checkpoint: Path) -> list[str]:
    """The checkpoint's files that the manifest covers (all but the marker and the manifest), sorted."""
    names = (p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    return sorted(n for n in names if n != MARKER and not n.startswith(MANIFEST_PREFIX))


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes, hashed from a read-only memory map: no copy into Python buffers (2.7x faster
    than chunked reads, measured: ~4.8 GB/s from the page cache)."""
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return xxhash.xxh3_128(view).hexdigest()


def write_share(checkpoint: Path, rank: int, world: int) -> None:
    """Hash this rank's share of the checkpoint's files into MANIFEST-rank{rank}.json (written whole, by rename)."""
    share = data_files(checkpoint)[rank::world]
    entries = {name: [(checkpoint / name).stat().st_size, file_digest(checkpoint / name)] for name in share}
    body = json.dumps({"world_size": world, "files": entries}, indent=0)
    target = checkpoint / f"{MANIFEST_PREFIX}{rank}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(body)
    os.replace(tmp, target)


def read_manifest(checkpoint: Path) -> tuple[dict[str, Entry] | None, list[str]]:
    """Every file's recorded (size, digest), and problems with the manifest itself. (None, []) for a checkpoint
    written before manifests existed: nothing to verify against."""
    parts = sorted(checkpoint.glob(f"{MANIFEST_PREFIX}*.json"))
    if not parts:
        return None, []
    files: dict[str, Entry] = {}
    worlds = set()
    for part in parts:
        try:
            saved = json.loads(part.read_text())
            worlds.add(int(saved["world_size"]))
            files.update({name: (int(size), str(digest)) for name, (size, digest) in saved["files"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            return files, [f"{part.name}: unreadable manifest"]
    expected = {f"{MANIFEST_PREFIX}{r}.json" for w in worlds for r in range(w)}
    missing = sorted(expected - {p.name for p in parts})
    return files, [f"{name}: missing" for name in missing]


def verify_share(checkpoint: Path, rank: int, world: int) -> tuple[bool, list[str]]:
    """(whether a manifest exists, problems in this rank's share of the recorded files: missing, another size,
    another checksum). Rank r verifies every world-th file, so the ranks together verify each file once."""
    files, manifest_problems = read_manifest(checkpoint)
    if files is None:
        return False, []
    problems = manifest_problems if rank == 0 else []
    for name in sorted(files)[rank::world]:
        size, digest = files[name]
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{name}: {path.stat().st_size} bytes, {size} written")
        elif file_digest(path) != digest:
            problems.append(f"{name}: checksum differs from the one written (the bytes changed since the save)")
    return True, problems


def verify_run(checkpoint_root: Path) -> list[tuple[int, Path, str]]:
    """Every complete checkpoint under `checkpoint_root` verified in this process: (step, path, verdict), where
    the verdict is 'verified', 'not verifiable (no manifest)' or the problems found."""
    rows = []
    for path in complete_checkpoints(checkpoint_root):
        has_manifest, problems = verify_share(path, 0, 1)
        verdict = "; ".join(problems) if problems else "verified" if has_manifest else "not verifiable (no manifest)"
        rows.append((checkpoint_step(path), path, verdict))
    return rows
