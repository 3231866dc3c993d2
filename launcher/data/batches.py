"""The seeded global-batch sampler and the collator.

One seeded permutation per epoch is cut into global batches of micro_batch_size × grad_accum × world
samples; global batch k is split across ranks and micro-steps. So the samples of step k are the same
whatever the world size or grad_accum, and jumping to step k is O(1) (no dataloader replay).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from launcher.data.formats import IGNORE
from launcher.data.tokenized import Samples, concatenated


@dataclass(frozen=True)
class GlobalBatchSampler:
    """Which sample ids each rank's micro-batches hold at a given optimizer step."""

    num_samples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def global_ids(self, step: int) -> np.ndarray:
        """Sample ids of global batch `step` (0-based), in a fixed order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return perm[k * self.global_batch : (k + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """This rank's grad_accum micro-batches of step `step`."""
        ids = self.global_ids(step)
        b, w = self.micro_batch_size, self.world_size
        return [ids[(m * w + rank) * b : (m * w + rank + 1) * b] for m in range(self.grad_accum)]


@dataclass(frozen=True)
class MixtureSampler(GlobalBatchSampler):
    """Multi-task: every global batch holds each task's share by weight, exactly over time.

    Of the first j slots of the endless stream of global-batch slots, task t owns floor(j·W_{t+1}) −
    floor(j·W_t) (W: cumulative normalised weights, W_0 = 0, W_T = 1), so its count in any step is its share
    of the batch, rounded without drift. Task t's n-th sample is its own seeded permutation (one per pass over
    the task) at n; the batch is then shuffled with a per-step seed so that ranks and micro-batches mix the
    tasks. Building step k costs O(batch), whatever k: resume jumps straight to it.
    """

    task_sizes: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()

    def _before(self, step: int) -> list[int]:
        """How many samples each task has given to the steps before `step`."""
        total = sum(self.weights)
        cumulative = [sum(self.weights[:t]) / total for t in range(len(self.weights))] + [1.0]
        slots = step * self.global_batch
        return [
            math.floor(slots * cumulative[t + 1]) - math.floor(slots * cumulative[t]) for t in range(len(self.weights))
        ]

    def global_ids(self, step: int) -> np.ndarray:
        """Sample ids (into the merged split: tasks in order) of global batch `step`."""
        start, end = self._before(step), self._before(step + 1)
        offsets = np.cumsum([0, *self.task_sizes])
        ids = [
            offsets[t] + self._task_sample(t, n) for t in range(len(self.task_sizes)) for n in range(start[t], end[t])
        ]
        order = np.random.default_rng([self.seed, len(self.task_sizes), step]).permutation(len(ids))
        return np.asarray(ids, dtype=np.int64)[order]

    def _task_sample(self, task: int, n: int) -> int:
        """Index (within its task) of task `task`'s n-th drawn sample: one seeded permutation per pass."""
        rounds, k = divmod(n, self.task_sizes[task])
        return int(_permutation(self.seed, task, rounds, self.task_sizes[task])[k])


@functools.lru_cache(maxsize=32)
def _permutation(seed: int, task: int, rounds: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, task, rounds]).permutation(size)


@dataclass(frozen=True)
class Collator:
    """Turns a micro-batch's sample ids into model inputs.

    `padding_free_width` (the model's hidden size; 0 = off) lets unpacked causal rows be concatenated into
    one row with per-sample positions and a block-diagonal causal mask, whenever that computes less than
    the padded batch. The loss is the same (a sum over the same label tokens); only padding work goes.
    """

    pad_id: int
    padding_free_width: int = 0
    segment_attention: bool = False  # the model attends within each sample (launcher/attention.py), not T²

    def __call__(self, samples: Samples, ids: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        ids = [int(i) for i in ids]
        if not self._concatenate(samples, ids):
            return collate(samples, ids, self.pad_id)
        out = collate(concatenated(samples, ids), [0], self.pad_id)
        if samples.tasks is not None:
            tasks = [np.full(len(samples.input_ids[i]), samples.tasks[i]) for i in ids]
            out["task_ids"] = torch.from_numpy(np.concatenate(tasks))[None]
        return out

    def _concatenate(self, samples: Samples, ids: list[int]) -> bool:
        if not self.padding_free_width or samples.labels is None or samples.seq_ids is not None or len(ids) < 2:
            return False
        lengths = [len(samples.input_ids[i]) for i in ids]
        return concat_is_cheaper(lengths, self.padding_free_width, self.segment_attention)


def concat_is_cheaper(lengths: list[int], width: int, segmented: bool = False) -> bool:
    """Whether one concatenated row costs fewer FLOPs than the padded batch.

    Per layer and token the linear layers cost ~24·width² and attention ~4·width per (query, key) pair. A
    padded batch pays for B·L tokens and B·L² pairs; the concatenated row for T = Σ lengths tokens, and
    T² pairs where the block-diagonal mask is dense to the kernel (short rows gain, long rows would lose) or
    about Σ length² where the model attends sample by sample (`segmented`: it never loses).
    """
    batch, longest, total = len(lengths), max(lengths), sum(lengths)
    padded = 6 * width * batch * longest + batch * longest**2
    flat = 6 * width * total + (sum(n * n for n in lengths) if segmented else total**2)
    return flat < padded


def collate(samples: Samples, ids: np.ndarray | list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the chosen samples into a batch. Packed rows get a block-diagonal causal 4D mask."""
    ids = [int(i) for i in ids]
    seqs = [samples.input_ids[i] for i in ids]
    length = max(len(s) for s in seqs)
    batch = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        batch[row, : len(s)] = torch.from_numpy(s)
        mask[row, : len(s)] = 1
    out = {"input_ids": batch, "attention_mask": mask}
    if samples.labels is not None:
        labels = torch.full((len(ids), length), IGNORE, dtype=torch.long)
        for row, i in enumerate(ids):
            labels[row, : len(samples.labels[i])] = torch.from_numpy(samples.labels[i])
        out["labels"] = labels
    if samples.class_labels is not None:
        out["class_labels"] = torch.from_numpy(samples.class_labels[ids])
    if samples.tasks is not None:  # multi-task: each token's task (-1 on padding), for per-task losses
        out["task_ids"] = torch.where(mask.bool(), torch.from_numpy(samples.tasks[ids])[:, None], -1)
    if samples.seq_ids is not None:
        out.update(_packed_inputs(samples, ids, length))
    return out


def _packed_inputs(samples: Samples, ids: list[int], length: int) -> dict[str, torch.Tensor]:
    pos = torch.zeros((len(ids), length), dtype=torch.long)
    seq = torch.full((len(ids), length), -1, dtype=torch.long)
    for row, i in enumerate(ids):
        n = len(samples.input_ids[i])
        pos[row, :n] = torch.from_numpy(samples.position_ids[i])
        seq[row, :n] = torch.from_numpy(samples.seq_ids[i])
    same = seq[:, :, None] == seq[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool)  # padding attends to itself: no NaN
    return {"position_ids": pos, "attention_mask": allowed[:, None, :, :]}


def label_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens (or rows, for classification) that carry loss in a batch."""
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
    return int(batch["class_labels"].numel())
