"""The reference a preference objective compares its policy with, behind one interface (objective.reference).

- AdapterOff: the same network with its adapter switched off (LoRA, QLoRA, prompt/prefix tuning): no copy.
- ModelCopy: a frozen copy of the starting model beside the policy (full fine-tuning under single or DDP).
- Precomputed: every pair's reference log-probs computed once, before training, from the starting weights, and
  cached beside the tokenised data; the batch carries them, so no reference model is resident while training.

`reference_for` is the only place that picks one. Every implementation returns each row's summed label
log-probability (`sequence_logps`), the chosen rows of a batch first, without a graph.
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn

from launcher.config import Config
from launcher.data import Samples
from launcher.data.formats import IGNORE
from launcher.data.pair_batches import sequence_index
from launcher.data.reference_logps import load_logps, logps_path, save_logps
from launcher.loss import causal_lm_loss_by_segment
from launcher.methods import method_for
from launcher.metrics import log
from launcher.model import weights_fingerprint
from launcher.objectives.base import Batch, TrainingStart


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-probability of its label tokens (fp32), and how many label tokens it has: 2n
    values for n pairs, the chosen sides then the rejected ones, whatever the batch's layout (padded, one
    padding-free row, packed rows: launcher/data/preference.py)."""
    segments, count = sequence_index(batch)
    labelled = segments[:, 1:][batch["labels"][:, 1:] != IGNORE]
    return -causal_lm_loss_by_segment(model, batch, segments, count), torch.bincount(labelled, minlength=count)


class Reference(ABC):
    """Where the reference log-probs of a batch come from."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def start(self, start: TrainingStart) -> None:
        """Prepare from the starting model, before any checkpoint loads (nothing by default)."""
        return

    @abstractmethod
    def logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Each row's reference log-probability, shape (rows,), no graph; `model` is the policy's module for a
        forward without backward (the strategy's forward_only_model)."""


class AdapterOff(Reference):
    """The policy's own network with its adapter switched off."""

    def logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The network the run started from (the method's view: adapter off, or the frozen SFT adapter), no
        graph; `model` is the strategy's module for a forward without backward."""
        with torch.no_grad(), method_for(self.cfg).reference_view(model):
            return sequence_logps(model, batch)[0]


class ModelCopy(Reference):
    """A frozen, unsharded copy of the starting model (eval mode, no gradients) held beside the policy."""

    model: nn.Module | None = None

    def start(self, start: TrainingStart) -> None:
        """Copy the bare model before any checkpoint loads: a resumed run's reference is still the start."""
        self.model = copy.deepcopy(start.bare).eval().requires_grad_(False)
        if start.ranks.is_main:
            held = sum(p.numel() * p.element_size() for p in self.model.parameters())
            log(f"reference: a frozen copy of the starting model beside the policy ({held / 2**30:.2f} GiB per rank)")

    def logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The copy's forward, no graph."""
        with torch.no_grad():
            return sequence_logps(self.model, batch)[0]


class Precomputed(Reference):
    """Log-probs computed once per (model, data, settings) before training; the batch carries them by sample id."""

    def start(self, start: TrainingStart) -> None:
        """Attach every split's stored log-probs to its samples: read from the cache, or computed in one pass over
        the starting model and stored there. A resumed run finds the file its first run wrote."""
        for field, samples in (("data.train", start.data.train), ("data.eval", start.data.eval)):
            if samples is not None:
                samples.reference_logps = self._stored_or_computed(start, samples, field)

    def logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """What the batch carries (the pair collator looked them up by sample id); no forward."""
        if "reference_logps" not in batch:
            raise RuntimeError("objective.reference precomputed: the batch carries no reference log-probs")
        return batch["reference_logps"]

    def settings(self) -> dict:
        """What changes a reference forward besides the pairs' tokens (those are hashed themselves)."""
        cfg = self.cfg
        return {
            "model": cfg.model.path,
            "weights": weights_fingerprint(cfg.model.path),
            "dtype": cfg.model.dtype,
            "precision": cfg.train.precision,
            "method": cfg.method.model_dump(mode="json"),
            "adapter": weights_fingerprint(cfg.model.adapter) if cfg.model.adapter else None,  # the SFT start
            "seed": cfg.train.seed if method_for(cfg).adapters else None,  # an adapter's initialisation
        }

    def _stored_or_computed(self, start: TrainingStart, samples: Samples, field: str) -> np.ndarray:
        ranks = start.ranks
        path = logps_path(samples, self.settings())
        stored = load_logps(path, len(samples))
        missing = float(ranks.sum(torch.tensor([float(stored is None)], dtype=torch.float64))[0])
        if not missing:  # every rank found it (ranks on other machines have caches of their own)
            if ranks.is_main:
                log(f"reference log-probs of {field}: {len(samples)} pairs read from {path} (no reference pass)")
            return stored
        t0 = time.perf_counter()
        computed = reference_pass(start, samples, self.cfg.train.micro_batch_size)
        if ranks.writes:
            save_logps(path, computed)
        if ranks.is_main:
            log(
                f"reference log-probs of {field}: computed for {len(samples)} pairs in {time.perf_counter() - t0:.1f}s "
                f"(one pass over the starting model), stored in {path}"
            )
        return computed


@torch.no_grad()
def reference_pass(start: TrainingStart, samples: Samples, micro_batch: int) -> np.ndarray:
    """(pairs, 2) log-probs (chosen, rejected) of the starting model. Each data-parallel rank computes its share
    with the model as the strategy runs it (every rank joins each forward, as in evaluation), and one sum
    across ranks gives every rank the whole array (the other ranks add exact zeros)."""
    ranks, n = start.ranks, len(samples)
    out = torch.zeros(n, 2, dtype=torch.float32)
    per_round = micro_batch * ranks.dp_size
    start.model.eval()
    for r in range(math.ceil(n / per_round)):
        first = r * per_round + ranks.dp_rank * micro_batch
        ids = list(range(first, min(first + micro_batch, n)))
        batch = {k: v.to(ranks.device) for k, v in start.collate(samples, ids or [0]).items()}
        with start.autocast():
            logps = sequence_logps(start.model, batch)[0].float().cpu()
        if ids and ranks.first_of_replica:
            out[ids] = logps.view(2, -1).T
    start.model.train()
    return ranks.sum(out).numpy()


KINDS = {"adapter_disabled": AdapterOff, "model": ModelCopy, "precomputed": Precomputed}


def reference_for(cfg: Config) -> Reference:
    """The run's reference; `auto` is resolved before the objective is made (launcher/run_start.py), and
    reads as adapter_disabled where it was not (e.g. an objective built outside a run)."""
    kind = cfg.objective.reference if cfg.objective is not None else "auto"
    return KINDS.get(kind, AdapterOff)(cfg)
