"""What `accelerate launch` asked for, read from its environment and merged into the config.

`accelerate launch` only starts processes; its choices arrive as ACCELERATE_* / FSDP_* variables. With
`distributed.strategy: auto` ftl honours them. A value the config sets explicitly that disagrees with the
launcher is an error naming both — never a silent override. Accelerate exports its defaults too
(mixed precision "no", offload "false"), so only non-default launcher values count as a request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from launcher.config import Config
from launcher.errors import ConfigError

Setting = tuple[str, Any, str]  # (dotted config field, value, where it came from)


def _true(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "").lower() == "true"


def _deepspeed_settings(env: Mapping[str, str]) -> list[Setting]:
    out: list[Setting] = [("distributed.strategy", "deepspeed", "ACCELERATE_USE_DEEPSPEED=true")]
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage and stage.isdigit():
        out.append(("distributed.zero_stage", int(stage), f"ACCELERATE_DEEPSPEED_ZERO_STAGE={stage}"))
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path.lower() != "none":
        out.append(("distributed.deepspeed_config", path, f"ACCELERATE_DEEPSPEED_CONFIG_FILE={path}"))
    opt = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") not in ("none", "")
    par = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") not in ("none", "")
    if opt or par:
        offload = "all" if opt and par else ("optimizer" if opt else "params")
        out.append(("distributed.offload", offload, "ACCELERATE_DEEPSPEED_OFFLOAD_*_DEVICE"))
    return out


def _fsdp_settings(env: Mapping[str, str]) -> list[Setting]:
    out: list[Setting] = [("distributed.strategy", "fsdp", "ACCELERATE_USE_FSDP=true")]
    if _true(env, "FSDP_OFFLOAD_PARAMS"):
        out.append(("distributed.fsdp_cpu_offload", True, "FSDP_OFFLOAD_PARAMS=true"))
    if _true(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        out.append(("train.gradient_checkpointing", True, "FSDP_ACTIVATION_CHECKPOINTING=true"))
    if env.get("FSDP_RESHARD_AFTER_FORWARD", "").lower() == "false":
        out.append(("distributed.fsdp_reshard_after_forward", False, "FSDP_RESHARD_AFTER_FORWARD=false"))
    classes = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if classes:
        names = [c.strip() for c in classes.split(",") if c.strip()]
        out.append(("distributed.fsdp_wrap", names, f"FSDP_TRANSFORMER_CLS_TO_WRAP={classes}"))
    return out


def launcher_settings(env: Mapping[str, str]) -> list[Setting]:
    """Config values requested through `accelerate launch`'s environment."""
    out: list[Setting] = []
    if _true(env, "ACCELERATE_USE_DEEPSPEED"):
        out += _deepspeed_settings(env)
    elif _true(env, "ACCELERATE_USE_FSDP"):
        out += _fsdp_settings(env)
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("bf16", "fp16"):
        out.append(("train.precision", precision, f"ACCELERATE_MIXED_PRECISION={precision}"))
    return out


def _explicit(cfg: Config, dotted: str) -> tuple[Any, bool]:
    """(current value, whether the user set it explicitly in the file or on the command line)."""
    *sections, leaf = dotted.split(".")
    node: Any = cfg
    for name in sections:
        node = getattr(node, name)
    return getattr(node, leaf), leaf in node.model_fields_set


def requested_but_absent_world(env: Mapping[str, str]) -> int | None:
    """`accelerate launch --num_processes N` without --multi_gpu on a GPU-less machine starts ONE process
    and says nothing: read N from the parent's command line."""
    if "ACCELERATE_DYNAMO_BACKEND" not in env or "WORLD_SIZE" in env:
        return None
    try:
        import psutil

        cmdline = " ".join(psutil.Process(os.getppid()).cmdline())
    except Exception:
        return None
    m = re.search(r"--num[_-]processes[ =](\d+)", cmdline)
    return int(m.group(1)) if m and int(m.group(1)) > 1 else None


def apply_launcher_env(cfg: Config, env: Mapping[str, str] | None = None) -> tuple[Config, list[str]]:
    """Merge the launcher's requests into cfg. Returns (config, notes); raises ConfigError on conflicts."""
    env = os.environ if env is None else env
    problems, notes = [], []
    asked = requested_but_absent_world(env)
    if asked:
        problems.append(
            f"launcher: `accelerate launch` was asked for {asked} processes but started only 1 (no WORLD_SIZE). "
            "Without GPUs add --multi_gpu (or --use_deepspeed / --use_fsdp) to start real CPU ranks."
        )
    raw = cfg.model_dump(mode="json", exclude_unset=False)
    for dotted, value, source in launcher_settings(env):
        current, explicit = _explicit(cfg, dotted)
        if explicit and current != value and not (dotted == "distributed.strategy" and current == "auto"):
            problems.append(
                f"{dotted}: the config says {current!r} but accelerate launch exported {source}; "
                "make them agree (or drop one of them)"
            )
            continue
        *sections, leaf = dotted.split(".")
        node = raw
        for name in sections:
            node = node[name]
        node[leaf] = value
        notes.append(f"{dotted}={value!r} (from {source})")
    if problems:
        raise ConfigError(problems)
    return (Config.model_validate(raw) if notes else cfg), notes
