"""L2-SP (Li et al. 2018): fine-tune toward the task while staying near the pre-trained weights,
θ_ft = argmin L_task(θ) + weight/2 · Σ‖θ − θ_pre‖² over the trained pre-trained weights.

The penalty's gradient, weight · (θ − θ_pre), is added in a step pre-hook of the torch optimizer itself, on
whatever that optimizer holds: the full tensors (single, DDP), this rank's FSDP shards, or DeepSpeed's flat
fp32 partitions. So θ_pre is held exactly as sharded as θ (no full copy per rank under FSDP/ZeRO-3), it is
taken once, from the pre-trained weights, before any checkpoint is loaded, and it is never saved (it is the
base model). Only param groups marked `l2sp` (pre-trained weights; not adapters, not a new head) count.
The logged penalty is measured after each update, so it describes the weights the step leaves behind.
"""

from __future__ import annotations

import torch

from launcher.dist import DistEnv, all_reduce_sum


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class L2SP:
    """The anchor and the two hooks; `penalty` is the metric (every rank must call it).

    `tensors`: (param group, tensor) for everything the optimizer steps, as the strategy holds it. They are
    matched by identity in the hooks, because ZeRO-3 puts each flat partition into its group only for the
    duration of its own step (and steps sub-group by sub-group)."""

    def __init__(self, optimizer: torch.optim.Optimizer, tensors: list, weight: float, sharded: bool):
        self.weight, self.sharded = weight, sharded
        self.anchor = {id(t): _local(t).detach().clone() for group, t in tensors if group.get("l2sp")}
        self.sq: dict[int, float] = {}
        optimizer.register_step_pre_hook(self._pull)
        optimizer.register_step_post_hook(self._measure)

    def _stepping(self, optimizer: torch.optim.Optimizer) -> list:
        return [(p, self.anchor[id(p)]) for g in optimizer.param_groups for p in g["params"] if id(p) in self.anchor]

    @torch.no_grad()
    def _pull(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for p, anchor in self._stepping(optimizer):
            if p.grad is not None:  # None: frozen by the gradual-unfreezing schedule this step
                _local(p.grad).add_(_local(p).detach() - anchor, alpha=self.weight)

    @torch.no_grad()
    def _measure(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        for p, anchor in self._stepping(optimizer):
            self.sq[id(p)] = float((_local(p).detach().float() - anchor.float()).pow(2).sum())

    def penalty(self, env: DistEnv) -> float:
        """weight/2 · Σ‖θ − θ_pre‖² over all ranks (replicated strategies: each rank holds the whole sum)."""
        total = all_reduce_sum([sum(self.sq.values())], env)[0]
        return self.weight / 2 * (total if self.sharded else total / env.world_size)
