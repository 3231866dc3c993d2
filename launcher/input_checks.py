"""The cheap input checks that run before anything heavy (`ftl validate`, `ftl check`, `ftl slurm submit` on
a login node): every data file and row, and a DeepSpeed JSON against the config, reported together."""

from __future__ import annotations

from launcher.config import Config
from launcher.data.splits import RawSplits, read_splits
from launcher.errors import ConfigError
from launcher.objectives.traits import KINDS, TRAITS, chosen_by, objective_name, objective_traits
from launcher.strategies.ds_config import check_deepspeed_config


def check_inputs(cfg: Config, world_size: int | None = None) -> None:
    """The cheap checks run before anything heavy: data files and rows, a DeepSpeed JSON against the config."""
    problems = []
    for check in (lambda: margin_problems(cfg, read_splits(cfg)), lambda: check_deepspeed_config(cfg, world_size)):
        try:
            check()
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)


def margin_problems(cfg: Config, raw: RawSplits) -> None:
    """Preference rows' per-pair `margin` is read by some pair objectives only; elsewhere it would be silently
    ignored."""
    declared = objective_traits(objective_name(cfg))
    if declared.margins or not declared.pairs:
        return
    for field, rows in (("data.train", raw.train), ("data.eval", raw.eval or [])):
        if any(isinstance(r, dict) and r.get("margin") is not None for r in rows):
            readers = ", ".join(k for k, name in KINDS.items() if TRAITS[name].margins)
            raise ConfigError(
                [
                    f"{field}: the rows give a per-pair 'margin', which {chosen_by(cfg)} does not read (objective.kind "
                    f"{readers} does); remove the column"
                ]
            )
