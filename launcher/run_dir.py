"""Reading a run directory without torch: which checkpoints are complete, and the latest one.

A checkpoint is CKPT_ROOT/step-00000040/ and counts only once its COMPLETE marker is written (last, after
fsync); launcher/checkpoint.py writes them, everything else (resume, export, `ftl slurm status`) reads here.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None
