"""Process-group environment read from whatever started us (torchrun, accelerate launch, srun, ftl --nproc).

ftl never starts ranks through a framework object: it reads RANK / WORLD_SIZE / LOCAL_RANK (or SLURM_*),
picks nccl on CUDA and gloo on CPU, and joins the group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launcher.parallel import ParallelDims
from launcher.world import cpu_threads_per_rank, env_world, slurm_rendezvous


def backend_for(device: torch.device) -> str:
    """The collective backend for ranks on `device`: nccl on CUDA, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class DistEnv:
    """Who this process is among the ranks of the run, and how the ranks divide the work (`dims`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dims: ParallelDims | None = None  # None: every rank data parallel

    def __post_init__(self) -> None:
        dims = self.dims or ParallelDims.data_parallel(self.world_size)
        if dims.world_size != self.world_size:
            raise ValueError(f"parallel dimensions {dims} span {dims.world_size} ranks, not {self.world_size}")
        object.__setattr__(self, "dims", dims)

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel rank: which share of each global batch it trains on."""
        return self.dims.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        """How many data-parallel replicas share each global batch."""
        return self.dims.dp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_minutes: float) -> DistEnv:
    """Join the process group when the world has more than one rank; pick the device."""
    rank, world, local_rank = env_world()
    threads = cpu_threads_per_rank()
    if threads is not None:
        torch.set_num_threads(threads)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a bare `srun ftl train`: meet where the SLURM job says
            addr, port = slurm_rendezvous() or ("127.0.0.1", 29500)
            os.environ["MASTER_ADDR"] = addr
            os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(
            backend=backend_for(device),
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if use_cuda else None,
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats across ranks (float64 so counts stay exact)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_lists(items: list[str], env: DistEnv) -> list[str]:
    """Every rank's `items`, concatenated in rank order, on every rank (small lists: messages)."""
    if not env.distributed:
        return list(items)
    gathered: list[list[str] | None] = [None] * env.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part or []]


def all_reduce_tensor(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Σ of a CPU tensor across ranks, back on the CPU (the tensor itself in one process)."""
    if not env.distributed:
        return t
    x = t.to(env.device) if env.device.type == "cuda" else t.clone()
    dist.all_reduce(x)
    return x.cpu()


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
