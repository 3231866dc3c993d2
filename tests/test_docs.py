"""The documentation that is generated stays current."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def test_the_configuration_reference_matches_the_config_model() -> None:
    """docs/configuration.md is what scripts/config_reference.py writes from launcher/config.py's fields: a field
    added, renamed or re-documented without regenerating it fails here."""
    res = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
