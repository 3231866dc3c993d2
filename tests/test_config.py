"""Config: typed, validated up front, every problem at once, dotted overrides, exit code 2 from the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import base_config, ftl, write_config

from launcher.config_loading import load_config
from launcher.errors import ConfigError


@pytest.fixture
def cfg_file(tmp_path: Path, models: dict, toy_data: dict) -> Path:
    return write_config(tmp_path / "c.yaml", base_config(tmp_path, models["llama"], toy_data["completion"]))


def test_precedence_defaults_file_cli(cfg_file: Path) -> None:
    cfg = load_config(cfg_file, ["train.lr=0.5", "method.lora.r=4", "data.packing=true"])
    assert cfg.train.lr == 0.5 and cfg.method.lora.r == 4 and cfg.data.packing is True
    assert cfg.train.micro_batch_size == 4  # from the file
    assert cfg.train.schedule == "cosine"  # default


def test_every_problem_is_reported_at_once(cfg_file: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, ["train.lrr=1", "train.micro_batch_size=many", "method.kind=half"])
    text = "\n".join(err.value.problems)
    assert "train.lrr: unknown key" in text
    assert "train.micro_batch_size:" in text
    assert "method.kind:" in text
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["method.kind=full", "method.qlora.quant_type=fp4"], "method.qlora"),
        (["train.precision=fp16", "distributed.strategy=deepspeed"], "train.precision"),
        (["train.fp16_initial_scale=1000"], "train.fp16_initial_scale"),
        (["data.packing=true", "data.format=classification", "model.task=sequence_classification"], "data.packing"),
        (["train.max_steps=null"], "train.max_steps / train.epochs"),
        (["model.task=sequence_classification"], "data.format"),
    ],
)
def test_impossible_combinations_exit_2_naming_the_field(cfg_file: Path, overrides: list[str], field: str) -> None:
    res = ftl("validate", str(cfg_file), *overrides)
    assert res.returncode == 2, res.stderr
    assert field in res.stderr
    assert "Traceback" not in res.stderr


def test_validate_prints_the_resolved_config(cfg_file: Path) -> None:
    res = ftl("validate", str(cfg_file), "train.lr=0.25")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert resolved["train"]["lr"] == 0.25 and resolved["method"]["lora"]["target_modules"] == "all-linear"


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n train: [\n")
    res = ftl("validate", str(bad))
    assert res.returncode == 2 and "bad.yaml line" in res.stderr


def test_train_on_missing_data_fails_before_loading_anything(cfg_file: Path, tmp_path: Path) -> None:
    res = ftl("train", str(cfg_file), f"data.train={tmp_path / 'nope.jsonl'}", f"output_dir={tmp_path / 'r'}")
    assert res.returncode == 2
    assert "data.train: file not found" in res.stderr and "nope.jsonl" in res.stderr
    assert not (tmp_path / "r").exists()  # nothing was created
