"""The training loop, top to bottom. It never asks which strategy it runs under.

Order matters for users: every input check (config, data files, tokenizer, tokenisation) happens before a
process group starts or a model loads, so bad input fails in seconds with exit code 2.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from launcher.config import Config
from launcher.data import DataSplits, GlobalBatchSampler, Samples, collate, label_token_count
from launcher.dist import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown
from launcher.metrics import MetricsWriter, log
from launcher.model import load_tokenizer, param_counts
from launcher.optim import build_optimizer, lr_factor, set_lr
from launcher.prepare import prepare_data, prepare_output_dir
from launcher.strategies import make_strategy
from launcher.strategies.base import Strategy


@dataclass
class TrainState:
    """Counters that define where a run is; saved and restored like any other component."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    history: list[float] = field(default_factory=list)


def total_steps(cfg: Config, sampler: GlobalBatchSampler) -> int:
    """max_steps when set, else epochs × steps per epoch."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * sampler.steps_per_epoch))


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch's label tokens (or rows), and correct predictions for classification."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs).logits.float()
    if "class_labels" in batch:
        labels = batch["class_labels"]
        correct = int((logits.argmax(-1) == labels).sum())
        return F.cross_entropy(logits, labels, reduction="sum"), correct
    labels = batch["labels"][:, 1:]
    shifted = logits[:, :-1].reshape(-1, logits.size(-1))
    return F.cross_entropy(shifted, labels.reshape(-1), ignore_index=-100, reduction="sum"), 0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    strategy: Strategy,
    micro: list[dict[str, torch.Tensor]],
    env: DistEnv,
    max_grad_norm: float | None,
    local_tokens: int,
) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches. Loss is normalised by the GLOBAL label count,
    so N ranks × micro-batches give exactly the gradient of one big batch.

    Returns (global mean loss, grad norm, global non-padding tokens)."""
    local_count = sum(label_token_count(b) for b in micro)
    (global_count,) = all_reduce_sum([local_count], env)
    total = 0.0
    for m, batch in enumerate(micro):
        with strategy.no_sync(m == len(micro) - 1), strategy.autocast():
            loss, _ = loss_sum(strategy.model, to_device(batch, env.device))
            loss = loss / max(global_count, 1)
        strategy.backward(loss)
        total += float(loss.detach())
    norm = strategy.step(max_grad_norm)
    loss_global, tokens = all_reduce_sum([total, local_tokens], env)
    return loss_global, norm, int(tokens)


@torch.no_grad()
def evaluate(strategy: Strategy, samples: Samples, cfg: Config, env: DistEnv, pad_id: int) -> dict[str, float]:
    """Mean eval loss (and accuracy for classification); every rank runs the same number of batches."""
    model = strategy.model
    model.eval()
    mbs, world = cfg.train.micro_batch_size, env.world_size
    n_chunks = math.ceil(len(samples) / (mbs * world))
    if cfg.train.eval_batches:
        n_chunks = min(n_chunks, cfg.train.eval_batches)
    loss_total = count = correct = 0.0
    for c in range(n_chunks):
        start = c * mbs * world + env.rank * mbs
        ids = list(range(start, min(start + mbs, len(samples))))
        batch = collate(samples, ids or [0], pad_id)
        with strategy.autocast():
            loss, right = loss_sum(model, to_device(batch, env.device))
        if ids:
            loss_total += float(loss)
            count += label_token_count(batch)
            correct += right
    model.train()
    loss_total, count, correct = all_reduce_sum([loss_total, count, correct], env)
    out = {"eval_loss": loss_total / max(count, 1)}
    if samples.class_labels is not None:
        out["eval_accuracy"] = correct / max(count, 1)
    return out


def describe_start(strategy: Strategy, cfg: Config, env: DistEnv, sampler: GlobalBatchSampler, steps: int) -> None:
    trainable, total = param_counts(strategy.unwrapped)
    local_params, local_state = strategy.local_numel()
    if env.is_main:
        log(
            f"strategy={strategy.name} world_size={env.world_size} precision={cfg.train.precision} "
            f"method={cfg.method.kind} device={env.device.type}"
        )
        log(
            f"params: total={total:,} trainable={trainable:,} held on rank 0={local_params:,} "
            f"optimizer state on rank 0={local_state:,}"
        )
        log(
            f"global batch = {cfg.train.micro_batch_size} micro × {cfg.train.grad_accum} accum × "
            f"{env.world_size} ranks = {sampler.global_batch} samples; {sampler.steps_per_epoch} steps/epoch; "
            f"{steps} steps"
        )


def run_training(cfg: Config) -> Path:
    """`ftl train`: check inputs, start the group, build, train, evaluate, save final artifacts."""
    out_dir = prepare_output_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    env = init_distributed(cfg.distributed.timeout_minutes)
    try:
        return _train(cfg, env, out_dir, data, tokenizer)
    finally:
        shutdown(env)


def _train(cfg: Config, env: DistEnv, out_dir: Path, data: DataSplits, tokenizer) -> Path:
    t = cfg.train
    strategy = make_strategy(cfg, env)
    model = strategy.build_model()
    strategy.setup(model, functools.partial(build_optimizer, t))
    sampler = GlobalBatchSampler(len(data.train), t.micro_batch_size, t.grad_accum, env.world_size, t.seed)
    if sampler.steps_per_epoch == 0:
        from launcher.config import ConfigError

        raise ConfigError(
            [
                f"data.train: {len(data.train)} samples is less than one global batch "
                f"({sampler.global_batch}); lower train.micro_batch_size or grad_accum"
            ]
        )
    steps = total_steps(cfg, sampler)
    describe_start(strategy, cfg, env, sampler, steps)
    state = TrainState()
    writer = MetricsWriter(cfg, out_dir, steps) if env.is_main else None
    pad_id = tokenizer.pad_token_id
    strategy.model.train()
    while state.step < steps:
        t0 = time.perf_counter()
        set_lr(strategy.optimizer, t.lr * lr_factor(state.step, t, steps))
        micro_ids = sampler.micro_batches(state.step, env.rank)
        micro = [collate(data.train, ids, pad_id) for ids in micro_ids]
        real = sum(len(data.train.input_ids[i]) for ids in micro_ids for i in ids)
        loss, norm, tokens = train_step(strategy, micro, env, t.max_grad_norm, real)
        state.step += 1
        state.samples += sampler.global_batch
        state.tokens += tokens
        state.history.append(loss)
        dt = time.perf_counter() - t0
        if writer and (state.step % cfg.logging.every_steps == 0 or state.step == steps):
            writer.write(
                {
                    "step": state.step,
                    "loss": loss,
                    "lr": strategy.optimizer.param_groups[0]["lr"],
                    "grad_norm": norm,
                    "tokens": state.tokens,
                    "tokens_per_s": tokens / dt,
                    "step_time": dt,
                    "samples": state.samples,
                    "epoch": state.samples / len(data.train),
                }
            )
        if data.eval is not None and ((t.eval_every and state.step % t.eval_every == 0) or state.step == steps):
            metrics = evaluate(strategy, data.eval, cfg, env, pad_id)
            if writer:
                writer.write({"step": state.step, **metrics})
    final = save_final(strategy, tokenizer, out_dir, env)
    if writer:
        writer.close()
        log(f"done: {state.step} steps, final loss {np.mean(state.history[-5:]):.4f}; artifacts in {final}")
    return final


def save_final(strategy: Strategy, tokenizer, out_dir: Path, env: DistEnv) -> Path:
    """Write OUTPUT_DIR/final atomically: a temp sibling renamed into place once complete."""
    final = out_dir / "final"
    tmp = out_dir / ".final.tmp"
    strategy.save_pretrained(tmp)
    if env.is_main:
        tokenizer.save_pretrained(tmp)
        import shutil

        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    barrier(env)
    return final
