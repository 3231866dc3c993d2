"""Loading a run config: the YAML file, dotted overrides, the typed model, then the cross-field checks.

Every problem is collected (pydantic's and the cross-field checks) and raised once as a `ConfigError` whose
lines name the field path; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import os

from pydantic import ValidationError

from launcher.config import Config, apply_overrides, pydantic_problems, read_yaml
from launcher.config_checks import cross_field_problems, cuda_available
from launcher.errors import ConfigError
from launcher.methods import raw_method_problems


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, cuda: bool | None = None) -> Config:
    """Load, override, type-check and cross-check a config; raise ConfigError with every problem.

    `cuda`: whether the run's ranks will have a CUDA GPU; None means this machine decides (a SLURM login
    node without GPUs passes what the job will have)."""
    raw = read_yaml(path) if path is not None else {}
    problems = apply_overrides(raw, overrides or [])
    if isinstance(raw.get("method"), dict):
        problems += raw_method_problems(raw["method"])
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(problems + pydantic_problems(err)) from None
    if cuda is None:  # only fp16 asks; importing torch for nothing would cost `ftl validate` seconds
        cuda = cfg.train.precision == "fp16" and cuda_available()
    problems += cross_field_problems(cfg, cuda)
    if problems:
        raise ConfigError(problems)
    return cfg
