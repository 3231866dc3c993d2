"""What happens once before the first step: decisions taken from the run's shape, and the start-up log lines."""

from __future__ import annotations

import os
from typing import Any

import torch

from launcher.config import Config
from launcher.data import Collator, GlobalBatchSampler
from launcher.dist import DistEnv, all_reduce_sum, all_reduce_tensor
from launcher.estimate import resolve_checkpointing, resolve_reference
from launcher.launch.allocator import active_allocator
from launcher.methods import method_for, trainable_by_block
from launcher.metrics import log
from launcher.mfu import MfuMeter
from launcher.model import param_counts
from launcher.objectives.base import Ranks, TrainingStart
from launcher.optim import depth_label, group_lrs
from launcher.run_context import RunContext
from launcher.strategies.base import Strategy


def describe_start(run: RunContext) -> None:
    """The start-up lines: strategy, world, precision and method; parameters; LR groups; the global batch."""
    strategy, cfg, env, sampler, steps = run.strategy, run.cfg, run.env, run.sampler, run.steps
    trainable, total = param_counts(strategy.unwrapped)
    if env.is_main:
        log(
            f"strategy={strategy.name} world_size={env.world_size} precision={cfg.train.precision} "
            f"method={method_for(cfg).name} device={env.device.type} cpu_threads={torch.get_num_threads()} "
            f"host_allocator={active_allocator()} "
            f"gradient_checkpointing={'on' if recomputes(strategy.unwrapped) else 'off'}"
        )
        log(f"params: total={total:,} trainable={trainable:,}")
        per_block = trainable_by_block(strategy.unwrapped)
        layers = len(per_block) - 2
        log("trainable per block: " + " ".join(f"{depth_label(d, layers)}={n:,}" for d, n in per_block.items()))
        lrs = group_lrs(strategy.optimizer)
        if len(lrs) > 1:
            log("peak LR per group: " + " ".join(f"{k}={v:.3g}" for k, v in lrs.items()))
        pairs = run.objective.traits.pairs
        unit = "pairs" if pairs else "samples"  # a preference sample is a pair of rows
        unit = "packed rows of whole pairs" if pairs and cfg.data.packing else unit
        describe_data(run)
        log(
            f"global batch = {cfg.train.micro_batch_size} micro × {cfg.train.grad_accum} accum × "
            f"{env.dp_size} data-parallel ranks = {sampler.global_batch} {unit}; "
            f"{sampler.steps_per_epoch} steps/epoch; {steps} steps"
        )
        describe_tasks(cfg, sampler)


def describe_data(run: RunContext) -> None:
    """Per split: where its rows came from, how many were read and how many are kept (after eval_fraction and
    truncation)."""
    data, cfg = run.data, run.cfg
    origins = data.origins or {}
    held = origins["data.eval"][1] if cfg.data.eval_fraction > 0 else 0
    for field, (where, read) in origins.items():
        samples = {"data.train": data.train, "data.eval": data.eval, "data.reference": data.reference}[field]
        out = held if field == "data.train" else 0
        kept = read - out - (samples.dropped if samples is not None else 0)
        unit = "pairs" if run.objective.traits.pairs and field != "data.reference" else "rows"
        note = f" ({out} held out as data.eval)" if out else ""
        log(f"{field}: {read} {unit} read, {kept} kept{note}; from {where}")


def describe_tasks(cfg: Config, sampler: GlobalBatchSampler) -> None:
    """Multi-task: each task's samples and share of the global batch."""
    tasks, names = cfg.data.tasks(), cfg.data.task_names()
    if tasks is None:
        return
    total = sum(t.weight for t in tasks)
    shares = [
        f"{n}: {size} samples, weight {t.weight / total:.1%} = {t.weight / total * sampler.global_batch:.3g}/batch"
        for n, t, size in zip(names, tasks, sampler.task_sizes, strict=True)
    ]
    log("tasks: " + "; ".join(shares))


def describe_sharding(strategy: Strategy, env: DistEnv) -> None:
    """After the first step (optimizer state exists then): what rank 0 holds locally."""
    local_params, local_state = strategy.local_numel()
    if env.is_main:
        log(f"held on rank 0: params={local_params:,} optimizer state={local_state:,} (of {env.world_size} rank(s))")


def decide_checkpointing(cfg: Config, env: DistEnv) -> Config:
    """Resolve `gradient_checkpointing: auto` from the memory estimate; every rank takes the same choice."""
    if cfg.train.gradient_checkpointing != "auto":
        return cfg
    cfg, note = resolve_checkpointing(cfg, env.world_size, env.device.type == "cuda", memory_per_rank(env))
    wanted = all_reduce_sum([float(cfg.train.gradient_checkpointing)], env)[0]
    cfg.train.gradient_checkpointing = wanted > 0  # any rank short of memory: all recompute
    if env.is_main:
        log(note)
    return cfg


def memory_per_rank(env: DistEnv) -> float:
    """Bytes one rank may use: its GPU's, or this machine's memory shared by its ranks."""
    if env.device.type == "cuda":
        return torch.cuda.get_device_properties(env.device).total_memory
    import psutil

    return psutil.virtual_memory().total / int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))


def decide_reference(cfg: Config, env: DistEnv) -> Config:
    """Resolve `objective.reference: auto` from the memory estimate; any rank short of memory for a frozen copy
    makes every rank take the precomputed log-probs."""
    cfg, note = resolve_reference(cfg, env.world_size, env.device.type == "cuda", memory_per_rank(env))
    if not note:
        return cfg
    chosen = cfg.objective.reference
    if chosen in ("model", "precomputed") and all_reduce_sum([float(chosen == "precomputed")], env)[0]:
        cfg.objective.reference = "precomputed"
    if env.is_main:
        log(note if cfg.objective.reference == chosen else f"{note}; another rank has no room for it: precomputed")
    return cfg


def start_objective(run: RunContext) -> None:
    """Let the objective prepare from the starting model (a reference copy, or precomputed log-probs): after the
    strategy wrapped it and before any checkpoint loads."""
    env, strategy = run.env, run.strategy
    ranks = Ranks(
        device=env.device,
        sum=lambda t: all_reduce_tensor(t, env),
        dp_rank=env.dp_rank,
        dp_size=env.dp_size,
        is_main=env.is_main,
        writes=env.local_rank == 0,
        first_of_replica=env.rank % (env.world_size // env.dp_size) == 0,
    )
    start = TrainingStart(strategy.model, strategy.unwrapped, run.data, run.collate, strategy.autocast, ranks)
    run.objective.start(start)


def make_collator(run: RunContext, tokenizer: Any) -> Collator:
    """The objective's collator; rows may be joined (padding-free) when data.padding_free asks and the method
    keeps a joined row's masks intact."""
    cfg = run.cfg
    may_concatenate = cfg.data.padding_free and method_for(cfg).concatenates
    return run.objective.collator(tokenizer, run.strategy.unwrapped.config, may_concatenate)


def start_mfu(run: RunContext) -> MfuMeter:
    """The meter for the `mfu` column (rank 0; the CPU peak is measured once per machine, then cached)."""
    train, env = run.data.train, run.env
    return MfuMeter(run.strategy.unwrapped, train.mean_length, train.label_fraction, env.device, env.world_size)


def recomputes(model: torch.nn.Module) -> bool:
    """Whether the model really has activation checkpointing on (asked of the model, not the config)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
