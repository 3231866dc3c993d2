"""The training loop, top to bottom. It never asks which strategy it runs under.

Order matters for users: every input check (config, data files, tokenizer, tokenisation) happens before a
process group starts or a model loads, so bad input fails in seconds with exit code 2.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.checkpoint import CheckpointManager, CheckpointWriteError, TrainState, disk_full
from launcher.config import Config
from launcher.config_checks import strategy_problems
from launcher.data import DataSplits, GlobalBatchSampler, MixtureSampler
from launcher.dist import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown
from launcher.errors import EXIT_FAILED, EXIT_NONFINITE, EXIT_OK, EXIT_STOPPED, ConfigError
from launcher.evaluation import Evaluator, report_forgetting, to_device
from launcher.l2sp import L2SP
from launcher.loss import TaskLosses
from launcher.metrics import MetricsWriter, log, record_exit, report_peak_memory
from launcher.model import load_tokenizer
from launcher.objectives import objective_for
from launcher.objectives.base import Batch
from launcher.optim import group_lrs, lr_factor, optimizer_factory, set_lr, unfreeze_period
from launcher.preflight import check_room
from launcher.prepare import prepare_data, prepare_output_dir
from launcher.run_context import RunContext
from launcher.run_dir import FINAL_DIR, RunDir
from launcher.run_start import (
    decide_checkpointing,
    decide_reference,
    describe_sharding,
    describe_start,
    make_collator,
    start_mfu,
    start_objective,
)
from launcher.stop import StopRequest
from launcher.strategies import make_strategy
from launcher.strategies.base import Strategy
from launcher.watchdog import Watchdog


def total_steps(cfg: Config, sampler: GlobalBatchSampler) -> int:
    """max_steps when set, else epochs × steps per epoch."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * sampler.steps_per_epoch))


def train_step(run: RunContext, micro: list[Batch], local_tokens: int) -> StepResult:
    """One optimizer step over this rank's micro-batches. The summed loss is normalised by the objective's
    GLOBAL unit count, so N ranks × micro-batches give exactly the gradient of one big batch."""
    strategy, objective, env = run.strategy, run.objective, run.env
    (global_units,) = all_reduce_sum([sum(objective.loss_units(b) for b in micro)], env)
    names = run.data.task_names or []
    per_task = TaskLosses.zeros(len(names)) if names else None
    total, counts = 0.0, dict.fromkeys(objective.counts, 0.0)
    for m, batch in enumerate(micro):
        with strategy.no_sync(m == len(micro) - 1), strategy.autocast():
            result = objective.loss_sum(strategy.model, to_device(batch, env.device), per_task)
            loss = result.loss / max(global_units, 1)
        strategy.backward(loss)
        total += float(loss.detach())
        counts = {k: v + result.counts[k] for k, v in counts.items()}
    local = [total, local_tokens, *counts.values(), *(per_task.flat() if per_task else [])]
    loss_global, tokens, *sums = all_reduce_sum(local, env)
    metrics = objective.step_metrics(global_units, dict(zip(counts, sums[: len(counts)], strict=True)))
    task_losses = dict(zip(names, TaskLosses.means(sums[len(counts) :]), strict=True))
    if run.cfg.train.nonfinite == "skip" and not math.isfinite(loss_global):
        strategy.discard_step()
        return StepResult(loss_global, float("nan"), int(tokens), task_losses, metrics)
    return StepResult(loss_global, strategy.step(run.cfg.train.max_grad_norm), int(tokens), task_losses, metrics)


@dataclass
class StepResult:
    """What one optimizer step measured, the same on every rank."""

    loss: float  # global mean loss
    grad_norm: float  # before clipping; nan for a dropped step
    tokens: int  # global non-padding tokens
    task_losses: dict[str, float | None]  # multi-task: each task's mean loss (None: none of its labels)
    metrics: dict[str, float] = field(default_factory=dict)  # what the objective reports per step (step_metrics)


def run_training(cfg: Config) -> int:
    """`ftl train`: check inputs, start the group, build, resume, train, save. Returns the exit code."""
    out_dir = prepare_output_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    env = init_distributed(cfg.distributed.timeout_minutes)
    try:
        return _train(cfg, env, out_dir, data, tokenizer)
    except NonFiniteError as err:
        if env.is_main:
            log(f"aborted: {err}; exit code {EXIT_NONFINITE}")
        return EXIT_NONFINITE
    except CheckpointWriteError as err:  # every rank says it: the disk may be full on one node only
        log(f"failed: {err}" if env.is_main else f"rank {env.rank} failed: {err}")
        return EXIT_FAILED
    finally:
        shutdown(env)


def make_sampler(cfg: Config, env: DistEnv, data: DataSplits) -> GlobalBatchSampler:
    t, tasks = cfg.train, cfg.data.tasks()
    shape = (len(data.train), t.micro_batch_size, t.grad_accum, env.dp_size, t.seed)  # samples per dp replica
    if tasks is None:
        sampler = GlobalBatchSampler(*shape)
    else:
        sizes = tuple(int((data.train.tasks == i).sum()) for i in range(len(tasks)))
        sampler = MixtureSampler(*shape, task_sizes=sizes, weights=tuple(x.weight for x in tasks))
    if sampler.steps_per_epoch == 0:
        raise ConfigError(
            [
                f"data.train: {len(data.train)} samples is less than one global batch "
                f"({sampler.global_batch}); lower train.micro_batch_size or train.grad_accum"
            ]
        )
    return sampler


def optimizer_step(run: RunContext, state: TrainState) -> dict[str, float]:
    """Run optimizer step `state.step` on this rank's share of its global batch; advance the counters."""
    t0 = time.perf_counter()
    cfg, sampler, train = run.cfg, run.sampler, run.data.train
    period = unfreeze_period(cfg.train, sampler.steps_per_epoch)
    set_lr(run.strategy.optimizer, cfg.train.lr * lr_factor(state.step, cfg.train, run.steps), state.step, period)
    micro_ids = sampler.micro_batches(state.step, run.env.dp_rank)
    micro = [run.collate(train, ids) for ids in micro_ids]
    result = train_step(run, micro, train.tokens(i for ids in micro_ids for i in ids))
    state.step += 1
    nonfinite = not math.isfinite(result.loss) or (
        cfg.train.precision != "fp16" and not math.isfinite(result.grad_norm)
    )
    state.skipped_steps += nonfinite
    state.skipped_in_a_row = state.skipped_in_a_row + 1 if nonfinite else 0
    state.samples += sampler.global_batch
    state.tokens += result.tokens
    return metrics_row(run, state, result, time.perf_counter() - t0)


def metrics_row(run: RunContext, state: TrainState, result: StepResult, seconds: float) -> dict[str, Any]:
    """The metrics row of the step just taken."""
    lrs = group_lrs(run.strategy.optimizer)
    row = {
        "step": state.step,
        "loss": result.loss,
        **result.metrics,
        "lr": max(lrs.values()),  # the top group's (layer_lr_decay scales the lower ones down)
        "grad_norm": result.grad_norm,
        "tokens": state.tokens,
        "tokens_per_s": result.tokens / seconds,
        "step_time": seconds,
        "samples": state.samples,
        "epoch": state.samples / len(run.data.train),
        "world_size": run.env.world_size,
    }
    row.update({f"loss/{n}": v for n, v in result.task_losses.items() if v is not None})
    if len(lrs) > 1:
        row["lr_groups"] = lrs
    scale = run.strategy.loss_scale()
    if scale is not None:
        row["loss_scale"] = scale
    if run.cfg.train.nonfinite == "skip":
        row["skipped_steps"] = state.skipped_steps
    return row


class NonFiniteError(Exception):
    """Training produced a NaN/inf loss or gradient that train.nonfinite does not allow (exit 4)."""


def check_finite(run: RunContext, state: TrainState, ckpt: CheckpointManager) -> None:
    """Raise NonFiniteError for a non-finite step under `abort`, or too many skipped in a row under `skip`.
    Every rank sees the same all-reduced loss and global norm, so all ranks raise together."""
    if not state.skipped_in_a_row:
        return
    t = run.cfg.train
    if t.nonfinite == "skip" and state.skipped_in_a_row < t.max_skipped_steps:
        return
    ids = run.sampler.global_ids(state.step - 1).tolist()
    latest = ckpt.run.latest_checkpoint()
    first = state.step - state.skipped_in_a_row + 1
    what = (
        f"step {state.step} has a non-finite loss or gradient"
        if t.nonfinite == "abort"
        else f"steps {first}-{state.step} ({state.skipped_in_a_row} in a row, train.max_skipped_steps="
        f"{t.max_skipped_steps}) had a non-finite loss or gradient"
    )
    raise NonFiniteError(
        f"{what}; samples of step {state.step}: {ids[:32]}{' ...' if len(ids) > 32 else ''}. Nothing from this "
        f"step was saved; latest complete checkpoint: {latest or 'none'}. Lower train.lr, check those samples, "
        "or set train.nonfinite: skip"
    )


def make_l2sp(strategy: Strategy, weight: float) -> L2SP | None:
    """train.l2sp: the penalty anchored at what the optimizer holds now (before any checkpoint loads)."""
    if not weight:
        return None
    return L2SP(strategy.optimizer, strategy.optimizer_tensors(), weight, strategy.optimizer_holds_shards())


def plan_run(cfg: Config, env: DistEnv, out_dir: Path, data: DataSplits) -> RunContext:
    """The run's shape, decided before any model loads: checkpointing, strategy, objective, batches, length."""
    cfg = decide_reference(decide_checkpointing(cfg, env), env)
    strategy = make_strategy(cfg, env)
    problems = strategy_problems(cfg, strategy.name, env.device.type == "cuda")  # `auto` is resolved now
    if problems:
        raise ConfigError(problems)
    sampler = make_sampler(cfg, env, data)
    return RunContext(cfg, env, out_dir, data, strategy, objective_for(cfg), sampler, total_steps(cfg, sampler))


def _train(cfg: Config, env: DistEnv, out_dir: Path, data: DataSplits, tokenizer: Any) -> int:
    run = plan_run(cfg, env, out_dir, data)
    cfg, strategy = run.cfg, run.strategy
    if finished_before(out_dir, run.steps, env):
        return EXIT_OK
    model = strategy.build_model()
    strategy.setup(model, optimizer_factory(cfg.train, model))
    run.objective.use_forward_only(strategy.forward_only_model)
    run.collate = make_collator(run, tokenizer)
    start_objective(run)  # from the starting weights: before any checkpoint loads
    l2sp = make_l2sp(strategy, cfg.train.l2sp.weight)
    # (the L2-SP anchor is taken before any checkpoint loads)
    ckpt = CheckpointManager(cfg, env, strategy.name, data.fingerprints)
    resume_from = ckpt.resume_path()
    state = ckpt.load(strategy, resume_from) if resume_from else TrainState()
    describe_start(run)
    check_room(cfg, strategy, env)
    writer = MetricsWriter(cfg, out_dir, run.steps, state, start_mfu(run)) if env.is_main else None
    stop = StopRequest(env, out_dir / "STOP", cfg.checkpoint.stop_signals, cfg.checkpoint.max_minutes)
    strategy.model.train()
    first_step = state.step
    if stop.agreed()[0]:  # asked to stop while starting: the state is the checkpoint's, nothing new to save
        return stopped_early(run, writer, stop, state, saved=False)
    evaluator = Evaluator(run, tokenizer)
    evaluator.measure_reference_start(state, writer)
    ckpt.start_global_streams(resume_from, cfg.train.seed, state.step)  # last: nothing above moves step 1's draws
    watchdog = Watchdog(out_dir, env.rank, env.world_size, cfg.distributed.hang_timeout_minutes, state.step)
    while state.step < run.steps:
        row = optimizer_step(run, state)
        watchdog.beat(state.step)
        if l2sp is not None:
            row["l2sp_penalty"] = l2sp.penalty(env)
        check_finite(run, state, ckpt)
        if row["step"] == first_step + 1:
            describe_sharding(strategy, env)
        if writer and (state.step % cfg.logging.every_steps == 0 or state.step == run.steps):
            if cfg.logging.sample_ids:
                row["sample_ids"] = run.sampler.global_ids(state.step - 1).tolist()
            writer.write(row)
        if evaluator.due(state.step):
            with watchdog.phase("evaluation"):
                metrics = evaluator.metrics()
            if writer:
                writer.write({"step": state.step, **metrics})
                report_forgetting(state, metrics, run.steps)
        stopping, save_by_time = stop.agreed(ckpt.due_by_time())
        stopping = stopping and state.step < run.steps
        if stopping or ((save_by_time or ckpt.due_by_steps(state.step)) and state.step < run.steps):
            state.wandb_id = writer.wandb_id if writer else None
            with watchdog.phase("a checkpoint write"):
                ckpt.save(strategy, state)
        if stopping:
            code = stopped_early(run, writer, stop, state)
            watchdog.exiting(code)
            return code
    with watchdog.phase("the final save"):
        code = finish(run, writer, state, tokenizer)
    watchdog.exiting(code)  # the process group's shutdown still waits for every rank
    return code


def finish(run: RunContext, writer: MetricsWriter | None, state: TrainState, tokenizer: Any) -> int:
    """All steps trained: write final/, record the exit, and let no rank leave before rank 0 has."""
    final = save_final(run, tokenizer)
    report_peak_memory(run.env)
    if writer:
        writer.close()
        record_exit(run.out_dir, EXIT_OK, state.step, None)
        log(f"done: {state.step} steps; artifacts in {final}")
    barrier(run.env)  # no rank exits before rank 0 has recorded how the run ended
    return EXIT_OK


def finished_before(out_dir: Path, steps: int, env: DistEnv) -> bool:
    """A run that already finished all `steps` (final/ written, recorded by rank 0) is not trained again."""
    directory = RunDir(out_dir)
    ended = directory.exit_record() or {}
    done = directory.final_dir.is_dir() and ended.get("exit_code") == EXIT_OK and ended.get("step") == steps
    if done and env.is_main:
        log(f"already finished: all {steps} steps are trained and {directory.final_dir} is complete; nothing to do")
    barrier(env)  # every rank has read the record before rank 0 replaces it
    if not done and env.is_main:
        directory.exit_record_file.unlink(missing_ok=True)  # how an earlier run ended is not how this one will
    return done


def stopped_early(
    run: RunContext, writer: MetricsWriter | None, stop: StopRequest, state: TrainState, saved: bool = True
) -> int:
    """After the stop checkpoint is saved (or nothing was trained yet): consume the STOP file, record, exit 3."""
    if writer:
        writer.close()
        stop.consume_stop_file()
        record_exit(run.out_dir, EXIT_STOPPED, state.step, stop.reason)
        what = "checkpoint saved" if saved else "before training on: nothing new to save"
        log(f"stopped early at step {state.step} ({stop.reason}); {what}; exit code {EXIT_STOPPED}")
    barrier(run.env)  # no rank exits before rank 0 has recorded the stop
    return EXIT_STOPPED


def save_final(run: RunContext, tokenizer: Any) -> Path:
    """Write OUTPUT_DIR/final atomically: a temp sibling renamed into place once complete."""
    out_dir, env = run.out_dir, run.env
    final = out_dir / FINAL_DIR
    tmp = out_dir / f".{FINAL_DIR}.tmp"
    try:
        run.strategy.save_pretrained(tmp)
        if env.is_main:
            tokenizer.save_pretrained(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(err, out_dir):
            raise CheckpointWriteError(f"final model: no space left on device under {out_dir}") from err
        raise
    if env.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    barrier(env)
    return final
