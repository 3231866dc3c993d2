"""Session-wide tiny models (built once) and an isolated tokenisation cache per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from helpers import build_model, reverse_rows, write_jsonl


def _say_order(config: pytest.Config, reporter: Any) -> None:
    seed = config.getoption("randomly_seed", None)
    if reporter is not None and isinstance(seed, int):
        reporter.write_line(f"test order: random, seed {seed} (the same order again: --randomly-seed={seed})")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Print pytest-randomly's seed even under -q (its own header line is hidden there)."""
    _say_order(session.config, session.config.pluginmanager.get_plugin("terminalreporter"))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """... and again below the failures, where a reader of a red run looks."""
    _say_order(config, terminalreporter)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["FTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("ftl-cache"))


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(root / arch, arch) for arch in ("llama", "qwen2", "gpt_neox", "bert")}


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        fmt: write_jsonl(root / f"{fmt}.jsonl", reverse_rows(64, seed=1, fmt=fmt))
        for fmt in ("completion", "chat", "alpaca", "text", "classification")
    }


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 160 KiB tmpfs: too small for one full-model checkpoint of the tiny model (weights + Adam state)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.decode()[-200:]}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
