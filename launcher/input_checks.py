"""The cheap input checks that run before anything heavy (`ftl validate`, `ftl check`, `ftl slurm submit` on
a login node): every data file and row, and a DeepSpeed JSON against the config, reported together."""

from __future__ import annotations

from launcher.config import Config
from launcher.data.splits import read_splits
from launcher.errors import ConfigError
from launcher.strategies.ds_config import check_deepspeed_config


def check_inputs(cfg: Config, world_size: int | None = None) -> None:
    """The cheap checks run before anything heavy: data files and rows, a DeepSpeed JSON against the config."""
    problems = []
    for check in (lambda: read_splits(cfg), lambda: check_deepspeed_config(cfg, world_size)):
        try:
            check()
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
