"""Sharding strategies behind one interface. `make_strategy` is the only place that picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.config import Config
from launcher.errors import ConfigError

if TYPE_CHECKING:  # keep `ftl validate` free of torch: this package's __init__ imports nothing heavy
    from launcher.dist import DistEnv
    from launcher.strategies.base import Strategy


def resolve_strategy_name(cfg: Config, world_size: int) -> str:
    """auto → single for one process, else ddp. (Launcher hints are added by the distributed issue.)"""
    name = cfg.distributed.strategy
    if name == "auto":
        return "single" if world_size == 1 else "ddp"
    if name == "single" and world_size > 1:
        raise ConfigError([f"distributed.strategy: 'single' but the launcher started {world_size} ranks"])
    return name


def make_strategy(cfg: Config, env: DistEnv) -> Strategy:
    """The strategy the config names (`auto` resolved); each implementation (torch) is imported only here."""
    name = resolve_strategy_name(cfg, env.world_size)
    if name == "single":
        from launcher.strategies.single import SingleStrategy

        return SingleStrategy(cfg, env)
    if name == "ddp":
        from launcher.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, env)
    if name == "deepspeed":
        from launcher.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, env)
    from launcher.strategies.fsdp import FSDPStrategy  # the last name distributed.strategy admits

    return FSDPStrategy(cfg, env)


def sharding_alternatives(cfg: Config, world_size: int, cuda: bool) -> list[tuple[str, dict]]:
    """Strategy settings that hold less per rank than the configured one, as (label, config change), for
    `ftl estimate` to try: FSDP, DeepSpeed ZeRO-3, and on CUDA ZeRO-3 with the optimizer offloaded."""
    if world_size <= 1:
        return []
    tries: list[tuple[str, dict]] = []
    if cfg.distributed.strategy != "fsdp":
        tries.append(("distributed.strategy=fsdp", {"distributed": {"strategy": "fsdp"}}))
    ds = {"strategy": "deepspeed", "zero_stage": 3}
    tries.append(("distributed.strategy=deepspeed distributed.zero_stage=3", {"distributed": ds}))
    if cuda:
        label = "distributed.strategy=deepspeed distributed.zero_stage=3 distributed.offload=optimizer"
        tries.append((label, {"distributed": {**ds, "offload": "optimizer"}}))
    return tries
