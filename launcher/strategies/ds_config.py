"""The DeepSpeed JSON config: a preset from ds_configs/ or the user's file, with "auto" values filled from ftl's config.

Nothing here imports torch or deepspeed, so `check_deepspeed_config` is cheap enough to run before any heavy
work (from `ftl validate` and before `ftl train` spawns ranks). A value in the user's JSON that contradicts
the ftl config is never silently overridden: it is a ConfigError naming both the JSON key (and file) and the
ftl field.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from launcher.config import Config
from launcher.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
OFFLOAD_KINDS = ("none", "optimizer", "params", "all")
FIELD = "distributed.deepspeed_config"


def read_user_json(path: str) -> dict[str, Any]:
    """The user's DeepSpeed JSON as a dict; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"{FIELD}: file not found: {p}"])
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{FIELD}: {p} line {exc.lineno}: invalid JSON ({exc.msg})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{FIELD}: {p}: the top level must be a JSON object"])
    return data


def json_offload(ds: dict[str, Any]) -> str:
    """What a DeepSpeed config offloads, in ftl's words (none | optimizer | params | all)."""
    zero = ds.get("zero_optimization") or {}

    def on(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    opt, par = on("offload_optimizer"), on("offload_param")
    return "all" if opt and par else "optimizer" if opt else "params" if par else "none"


def resolve_stage_offload(cfg: Config, user: dict[str, Any] | None) -> tuple[int, str]:
    """The ZeRO stage and offload: ftl's fields when set, else the user's JSON, else stage 2 and no offload."""
    d = cfg.distributed
    json_stage = (user or {}).get("zero_optimization", {}).get("stage") if user else None
    stage = d.zero_stage or (json_stage if isinstance(json_stage, int) else None) or 2
    offload = d.offload or (json_offload(user) if user else "none")
    return int(stage), offload


def stage_and_offload(cfg: Config) -> tuple[int, str]:
    """The ZeRO stage and offload a DeepSpeed run uses, reading `distributed.deepspeed_config` when set: the one
    answer for training, `ftl estimate` and `gradient_checkpointing: auto`."""
    path = cfg.distributed.deepspeed_config
    return resolve_stage_offload(cfg, read_user_json(path) if path else None)


def _ftl_values(cfg: Config, world_size: int | None) -> dict[tuple[str, ...], tuple[str, Any, Any]]:
    """JSON key path → (ftl field, the field's value as the user wrote it, the value DeepSpeed must get)."""
    t = cfg.train
    out: dict[tuple[str, ...], tuple[str, Any, Any]] = {
        ("train_micro_batch_size_per_gpu",): ("train.micro_batch_size", t.micro_batch_size, t.micro_batch_size),
        ("gradient_accumulation_steps",): ("train.grad_accum", t.grad_accum, t.grad_accum),
        ("gradient_clipping",): ("train.max_grad_norm", t.max_grad_norm, float(t.max_grad_norm or 0.0)),
        ("bf16", "enabled"): ("train.precision", t.precision, t.precision == "bf16"),
        ("bfloat16", "enabled"): ("train.precision", t.precision, t.precision == "bf16"),
        ("fp16", "enabled"): ("train.precision", t.precision, t.precision == "fp16"),
        ("fp16", "initial_scale_power"): (
            "train.fp16_initial_scale",
            t.fp16_initial_scale,
            round(math.log2(t.fp16_initial_scale)),
        ),
        ("fp16", "loss_scale_window"): ("train.fp16_growth_interval", t.fp16_growth_interval, t.fp16_growth_interval),
    }
    if world_size:
        batch = t.micro_batch_size * t.grad_accum * world_size
        shown = f"{t.micro_batch_size} × {t.grad_accum} × {world_size} ranks = {batch}"
        out[("train_batch_size",)] = ("train.micro_batch_size × train.grad_accum × ranks", shown, batch)
    return out


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _differs(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return not isinstance(value, bool) or value != expected
    if isinstance(value, (int, float)) and isinstance(expected, (int, float)):
        return abs(float(value) - float(expected)) > 1e-12
    return True


def config_problems(cfg: Config, world_size: int | None = None) -> list[str]:
    """Every contradiction between the DeepSpeed settings and the rest of the ftl config (no heavy imports).

    `world_size` is checked against train_batch_size when known (None before the ranks exist)."""
    d = cfg.distributed
    problems: list[str] = []
    user = None
    if d.deepspeed_config:
        try:
            user = read_user_json(d.deepspeed_config)
        except ConfigError as err:
            return err.problems
    stage, offload = resolve_stage_offload(cfg, user)
    if stage not in (1, 2, 3):
        problems.append(f'{FIELD}: {d.deepspeed_config}: "zero_optimization.stage" is {stage}; ftl supports 1, 2, 3')
    if offload in ("params", "all") and stage != 3:
        problems.append(f"distributed.offload: '{offload}' offloads parameters, which needs ZeRO-3 (stage is {stage})")
    if user is None:
        return problems
    where = f"{FIELD}: {d.deepspeed_config}"
    for path, (field, shown, expected) in _ftl_values(cfg, world_size).items():
        value = _get(user, path)
        if value is None or value == "auto" or not _differs(value, expected):
            continue
        problems.append(
            f'{where}: "{".".join(path)}" is {json.dumps(value)} but {field} is {json.dumps(shown)} '
            '(set it to "auto" or make the two agree)'
        )
    json_stage = _get(user, ("zero_optimization", "stage"))
    if d.zero_stage is not None and json_stage not in (None, "auto") and json_stage != d.zero_stage:
        problems.append(f'{where}: "zero_optimization.stage" is {json_stage} but distributed.zero_stage is {stage}')
    if d.offload is not None and json_offload(user) != d.offload:
        problems.append(
            f'{where}: "zero_optimization.offload_*" offloads {json_offload(user)} but distributed.offload is '
            f"'{d.offload}'"
        )
    for key, field in (("optimizer", "train.optimizer"), ("scheduler", "train.schedule / train.lr")):
        if key in user:
            problems.append(f'{where}: "{key}" is set but ftl builds it from {field}; remove "{key}" from the JSON')
    return problems


def check_deepspeed_config(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError listing every DeepSpeed config problem (a no-op for other strategies)."""
    if cfg.distributed.strategy != "deepspeed":
        return
    problems = config_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)


def preset_path(stage: int, offload: str) -> Path:
    """The ds_configs/ preset a stage and offload start from (offload is then set exactly, see build)."""
    name = {1: "zero1", 2: "zero2", 3: "zero3"}[stage]
    if offload != "none":
        name += "_offload"
    return PRESETS_DIR / f"{name}.json"


def _set_offload(zero: dict[str, Any], offload: str) -> None:
    template = {"device": "cpu", "pin_memory": True}
    for key, wanted in (("offload_optimizer", ("optimizer", "all")), ("offload_param", ("params", "all"))):
        if offload in wanted:
            if str((zero.get(key) or {}).get("device", "none")).lower() not in ("cpu", "nvme"):
                zero[key] = dict(template)
        else:
            zero.pop(key, None)


def _fill_model_sizes(zero: dict[str, Any], hidden_size: int | None) -> None:
    """'auto' bucket sizes and the ZeRO-3 persistence threshold from the model width (dropped if unknown)."""
    sizes = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, size in sizes.items():
        if zero.get(key) == "auto":
            if hidden_size:
                zero[key] = size(hidden_size)
            else:
                zero.pop(key)


def build_ds_config(cfg: Config, world_size: int, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run: checked, "auto" and missing values filled from ftl's config.

    Raises ConfigError on any contradiction (see `config_problems`)."""
    problems = config_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    user = read_user_json(cfg.distributed.deepspeed_config) if cfg.distributed.deepspeed_config else None
    stage, offload = resolve_stage_offload(cfg, user)
    if user is None:
        path = preset_path(stage, offload)
        if not path.is_file():
            raise ConfigError([f"distributed.strategy: DeepSpeed preset {path} is missing (is ds_configs/ there?)"])
        ds = json.loads(path.read_text())
    else:
        ds = copy.deepcopy(user)
    for keys, (_, _, expected) in _ftl_values(cfg, world_size).items():
        if keys[0] == "bfloat16" and "bfloat16" not in ds:
            continue  # the alias only when the user wrote it
        node = ds
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if node.get(keys[-1], "auto") == "auto":
            node[keys[-1]] = expected
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = stage
    _set_offload(zero, offload)
    _fill_model_sizes(zero, hidden_size)
    if offload != "none":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # ftl brings its own (torch) optimizer
    ds.setdefault("steps_per_print", 1_000_000_000)
    return ds
