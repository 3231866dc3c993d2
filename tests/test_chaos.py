"""The short chaos run (scripts/chaos.py): random SIGKILLs, a corrupted checkpoint and (2 ranks) a stopped rank in
real runs, single and FSDP, lose nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


def test_random_kills_lose_nothing() -> None:
    cmd = [sys.executable, "scripts/chaos.py", "--trials", "2", "--strategies", "single,fsdp", "--kills", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line.strip("| ").split(" | ") for line in res.stdout.splitlines() if line.startswith("| ")]
    header, rows = lines[0], lines[2:]  # lines[1] is the separator
    table = {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in rows}
    assert set(table) == {"single", "fsdp"}, res.stdout
    for name, row in table.items():
        zeros = ("corrupt", "failed_resumes", "missing_steps", "duplicated_steps", "orphans")
        assert all(row[k] == "0" for k in zeros) and float(row["weight_diff"]) <= 1e-6, (name, row)
        assert row["wandb_ids_max"] == "1", (name, row)
        assert int(row["kills"]) >= 2, (name, row)  # every trial was hit
        assert row["corruptions_detected"] == row["corruptions"], (name, row)  # each set aside, and recovered
        assert row["stops_detected"] == row["stops"], (name, row)  # each named and ended with exit 5
    assert int(table["fsdp"]["stops"]) >= 1, table  # a rank stopped mid-training (not at the last steps)
