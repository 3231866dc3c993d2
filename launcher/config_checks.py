"""Config checks across fields, files and strategies: each returns every problem it finds (litgpt-style),
so `load_config` can raise them all at once."""

from __future__ import annotations

import math
import os
from pathlib import Path

from launcher.config import Config, ObjectiveConfig
from launcher.data.columns import CONVERSATION_FORMATS, column_problems
from launcher.methods import METHODS, method_for
from launcher.objectives.traits import TRAITS, chosen_by, format_problem, objective_name, objective_traits
from launcher.run_dir import RunDir
from launcher.strategies.traits import replicated_strategies, traits


def cross_field_problems(cfg: Config, cuda: bool) -> list[str]:
    """Combinations that are each valid alone but impossible together."""
    p: list[str] = []
    if not cfg.model.path:
        p.append("model.path: required (a local Hugging Face model directory or hub id)")
    if not cfg.data.train:
        p.append("data.train: required (a data file, glob, directory, saved or hub dataset, or a list of files)")
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        p.append("train.max_steps / train.epochs: set at least one (both are unset)")
    if not math.log2(cfg.train.fp16_initial_scale).is_integer():
        p.append(f"train.fp16_initial_scale: {cfg.train.fp16_initial_scale:g} is not a power of two")
    if cfg.data.packing and not objective_traits(objective_name(cfg)).packs:
        p.append(f"data.packing: the objective of {chosen_by(cfg)} scores whole rows; its rows cannot be packed")
    if cfg.data.tasks() is None:
        p += [m for m in [format_problem(cfg.data.format, cfg, "data.format")] if m]
    if cfg.data.eval and cfg.data.eval_fraction > 0:
        p.append("data.eval_fraction: set either data.eval or data.eval_fraction, not both")
    import signal

    bad = [n for n in cfg.checkpoint.stop_signals if not isinstance(getattr(signal, n, None), signal.Signals)]
    if bad:
        p.append(f"checkpoint.stop_signals: unknown signal name(s) {', '.join(bad)} (e.g. SIGTERM, SIGUSR1)")
    uncatchable = [n for n in cfg.checkpoint.stop_signals if n in ("SIGKILL", "SIGSTOP")]
    if uncatchable:
        p.append(
            f"checkpoint.stop_signals: {', '.join(uncatchable)} cannot be caught, so it cannot mean 'save and stop'"
        )
    p += model_path_problems(cfg)
    p += start_adapter_problems(cfg)
    p += transfer_problems(cfg)
    p += task_problems(cfg)
    p += row_shape_problems(cfg)
    p += objective_problems(cfg)
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        p.append(f"checkpoint.resume: no such checkpoint directory: {cfg.checkpoint.resume}")
    p += strategy_problems(cfg, cfg.distributed.strategy, cuda)
    return p


def model_path_problems(cfg: Config) -> list[str]:
    """model.path / model.tokenizer: an existing model directory, or a hub id while the hub is reachable."""
    p: list[str] = []
    offline = any(os.environ.get(k, "") not in ("", "0") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    for field, value in (("model.path", cfg.model.path), ("model.tokenizer", cfg.model.tokenizer)):
        if not value:
            continue
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            p.append(f"{field}: {value} is a file; give the model's directory (the one holding config.json)")
        elif path.is_dir() and field == "model.path" and not (path / "config.json").is_file():
            p.append(f"{field}: {value} has no config.json (is it a Hugging Face model directory?)")
        elif not path.exists() and (value.startswith(("/", ".", "~")) or value.count("/") != 1):
            p.append(f"{field}: no such directory: {value} (and it is not a hub id of the form org/name)")
        elif not path.exists() and offline:
            p.append(f"{field}: {value} is not a local directory, and the hub is offline (HF_HUB_OFFLINE)")
    return p


def start_adapter_problems(cfg: Config) -> list[str]:
    """model.adapter: a method that starts from a trained adapter, an adapter it can start from, and a reference
    that is the model it gives (never the bare base)."""
    if cfg.model.adapter is None:
        return []
    method = method_for(cfg)
    if not method.starts_from_adapter:
        able = " or ".join(name for name, m in METHODS.items() if m.starts_from_adapter)
        return [
            f"model.adapter: method.kind {cfg.method.kind} cannot start from a trained adapter; use {able} "
            "(a fully fine-tuned model is a model: give its final/ as model.path)"
        ]
    p = method.start_problems(cfg)
    if objective_traits(objective_name(cfg)).reference and cfg.objective.reference == "adapter_disabled":
        p.append(
            "objective.reference: adapter_disabled would compare with the bare base model, not the model "
            "model.adapter starts from; leave it auto (the frozen starting adapter is the reference)"
        )
    return p


def strategy_problems(cfg: Config, strategy: str, cuda: bool) -> list[str]:
    """What the strategy cannot do with this config: checked at validation for an explicit strategy, and
    again by the trainer once `auto` is resolved (from the launcher's environment)."""
    p: list[str] = []
    declared = traits(strategy)
    if cfg.train.precision == "fp16" and declared and declared.fp16_needs_cuda and not cuda:
        p.append(f"train.precision: fp16 under {declared.format} needs a CUDA GPU; use fp32 or bf16 on CPU")
    if cfg.train.nonfinite == "skip" and declared and not declared.skips_steps:
        p.append(f"train.nonfinite: 'skip' is not available under {declared.format} (its engine always steps)")
    if declared and objective_traits(objective_name(cfg)).replicated_only and not declared.replicated:
        p.append(
            f"distributed.strategy: {chosen_by(cfg)} runs under {' or '.join(replicated_strategies())} for now "
            f"(not {strategy}; the sharded strategies come later)"
        )
    o = cfg.objective
    copies = o is not None and o.reference == "model" and objective_traits(objective_name(cfg)).reference
    if declared and not declared.replicated and copies:
        p.append(
            f"objective.reference: model holds an unsharded frozen copy, which runs under "
            f"{' or '.join(replicated_strategies())}, not distributed.strategy {strategy}; use "
            "objective.reference: precomputed (or auto)"
        )
    foreign = foreign_pickled_resume(cfg, strategy)
    if foreign:
        p.append(foreign)
    return p


def run_dir_of(cfg: Config) -> RunDir:
    """The run's directory as `cfg` places it: OUTPUT_DIR, and checkpoint.dir when set."""
    return RunDir.of(cfg.output_dir, cfg.checkpoint.dir)


def foreign_pickled_resume(cfg: Config, strategy: str) -> str | None:
    """The problem with `checkpoint.resume: PATH` when `strategy` stores pickles and PATH is not this run's own."""
    resume, declared = cfg.checkpoint.resume, traits(strategy)
    if declared is None or not declared.unpickles or resume in ("auto", "never"):
        return None
    root = run_dir_of(cfg).checkpoint_root
    if Path(resume).resolve().is_relative_to(root.resolve()):
        return None
    return (
        f"checkpoint.resume: {resume} is outside this run's checkpoints ({root}); {declared.format} "
        "checkpoints contain pickles, which ftl loads only from the run's own checkpoint directory "
        "(copy it there if you trust its source)"
    )


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def task_problems(cfg: Config) -> list[str]:
    """A multi-task data.train: every task fits the one head the run trains, distinct names."""
    tasks = cfg.data.tasks()
    if tasks is None:
        return []
    p: list[str] = []
    for i, t in enumerate(tasks):
        problem = format_problem(t.format or cfg.data.format, cfg, f"data.train[{i}].format")
        p += [problem] if problem else []
    names = cfg.data.task_names()
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        p.append(f"data.train: task name(s) {', '.join(twice)} appear twice; give each task a distinct `name`")
    return p


def row_shape_problems(cfg: Config) -> list[str]:
    """data.columns (and a task's columns) name fields its format reads; data.system_prompt has a conversation
    to go into."""
    d, tasks = cfg.data, cfg.data.tasks()
    sources = [(d.format, d.columns, "data.columns")] if tasks is None else []
    for i, t in enumerate(tasks or []):
        own = t.columns is not None
        where = f"data.train[{i}].columns" if own else f"data.columns (for data.train[{i}])"
        sources.append((t.format or d.format, t.columns if own else d.columns, where))
    p = [m for fmt, columns, where in sources for m in column_problems(fmt, columns, where)]
    if d.system_prompt is not None and not any(fmt in CONVERSATION_FORMATS for fmt, _, _ in sources):
        formats = sorted({fmt for fmt, _, _ in sources})
        p.append(
            f"data.system_prompt: applies to conversations (format {' or '.join(CONVERSATION_FORMATS)}), not "
            f"{', '.join(formats)} rows; put the instruction into the rows instead"
        )
    return p


def transfer_problems(cfg: Config) -> list[str]:
    """The transfer-learning settings: valid regexes, a schedule without a second warmup, blocks that exist."""
    import json
    import re

    p: list[str] = []
    f = cfg.method.freeze
    for pattern in f.patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            p.append(f"method.freeze.patterns: {pattern!r} is not a valid regex ({err})")
    if cfg.train.schedule == "stlr" and cfg.train.warmup_steps:
        p.append("train.warmup_steps: schedule stlr rises over train.stlr.cut_frac of the steps itself; set 0")
    p += method_for(cfg).problems(cfg)  # what the method refuses (packing, tasks, L2-SP)
    g = cfg.train.gradual_unfreeze
    if g.every_steps and g.every_epochs:
        p.append("train.gradual_unfreeze: set every_steps or every_epochs, not both")
    config_json = Path(cfg.model.path).expanduser() / "config.json"
    if f.bottom_layers and config_json.is_file():
        hf = json.loads(config_json.read_text())
        layers = hf.get("num_hidden_layers", hf.get("text_config", {}).get("num_hidden_layers"))
        if isinstance(layers, int) and f.bottom_layers > layers:
            p.append(f"method.freeze.bottom_layers: {f.bottom_layers} but the model has {layers} blocks")
    return p


def objective_problems(cfg: Config) -> list[str]:
    """objective: the model it trains, and what a preference objective cannot do (yet)."""
    why, declared = chosen_by(cfg), objective_traits(objective_name(cfg))
    p: list[str] = []
    if cfg.model.task not in declared.tasks:
        p.append(f"objective.kind: {why} trains a {' or '.join(declared.tasks)} model, not model.task={cfg.model.task}")
    p += head_problems(cfg) + unread_settings(cfg)
    if not declared.pairs:
        return p
    o = cfg.objective
    p += reference_problems(cfg) if declared.reference else []
    if o.label_smoothing and o.loss_type != "sigmoid":
        p.append(f"objective.label_smoothing: applies to the sigmoid loss only, not {o.loss_type}")
    if cfg.data.tasks() is not None:
        p.append(f"data.train: multi-task mixing is not available with objective.kind {o.kind} yet; give one file")
    if cfg.data.reference:
        p.append(f"data.reference: the forgetting measure is not available with objective.kind {o.kind} yet")
    if not cfg.data.mask_prompt:
        p.append(f"data.mask_prompt: {o.kind} compares completions only; the prompt never carries loss (set true)")
    return p


def unread_settings(cfg: Config) -> list[str]:
    """objective.* settings of another objective given a value (not its default) that this one would ignore. A
    resolved config.yaml carries every default, so only a value that differs is something the user set."""
    o = cfg.objective
    if o is None:
        return []
    read = objective_traits(objective_name(cfg)).settings
    owners = {name: [k for k, t in TRAITS.items() if name in t.settings] for name in ObjectiveConfig.model_fields}
    return [
        f"objective.{name}: {getattr(o, name)!r} is not read by {chosen_by(cfg)} (it applies to "
        f"{', '.join(owners[name])}; {chosen_by(cfg)} reads {', '.join(read) or 'no other setting'})"
        for name, field in ObjectiveConfig.model_fields.items()
        if owners[name] and name not in read and getattr(o, name) != field.default
    ]


def head_problems(cfg: Config) -> list[str]:
    """model.num_labels: what the objective's head needs (a reward model one score, a classifier two classes)."""
    why, declared, n = chosen_by(cfg), objective_traits(objective_name(cfg)), cfg.model.num_labels
    if declared.num_labels is not None and n != declared.num_labels:
        return [
            f"model.num_labels: {why} scores each completion with {declared.num_labels} output; set "
            f"model.num_labels: {declared.num_labels} (got {n})"
        ]
    if declared.num_labels is None and cfg.model.task == "sequence_classification" and n < 2:
        return [
            f"model.num_labels: {why} needs at least 2 classes (got {n}); one output is a reward model's "
            "score: objective.kind: reward, on preference pairs"
        ]
    return []


def reference_problems(cfg: Config) -> list[str]:
    """objective.reference: a switched-off adapter needs an adapter; a copy of a model that has one is waste."""
    reference, method = cfg.objective.reference, method_for(cfg)
    if reference == "adapter_disabled" and not method.switches_off:
        switchable = [name for name, m in METHODS.items() if m.switches_off]
        return [
            f"objective.reference: adapter_disabled needs a method that switches its adapter off "
            f"({', '.join(switchable)}), and method.kind {cfg.method.kind} has none; use objective.reference: "
            "model (a frozen copy), precomputed (log-probs computed once before training) or auto"
        ]
    if reference == "precomputed" and cfg.data.packing:
        return [
            "data.packing: precomputed reference log-probs are stored per pair, and a packed row mixes pairs; "
            "leave data.packing off (padding-free pairs, data.padding_free, join a micro-batch's pairs anyway)"
        ]
    if reference == "model" and method.switches_off:
        return [
            f"objective.reference: model would copy the whole network, but with method.kind {cfg.method.kind} the "
            "reference is the same network with its adapter switched off; use adapter_disabled (or auto)"
        ]
    return []
