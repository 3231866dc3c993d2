"""Parallel dimensions: how the process world splits into the ways ranks divide the work.

The process world (rank, world_size) says who a process is; the data-parallel world says which samples it
trains on. Today ftl has one dimension, data parallelism (`dp`, every rank its own samples), so the two are
equal; a second dimension (sequence parallelism: the ranks of a group split each sequence) makes `dp` a
divisor of the world. Everything that deals out samples or counts replicas of the batch — the sampler, the
evaluation's share, the global-batch check on resume, the gradient averaging that loss scaling undoes —
asks for the data-parallel rank and size, never the process world's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    """The sizes of the parallel dimensions; their product is the world size. Ranks are laid out with the
    innermost (last) dimension varying fastest, as torch's DeviceMesh lays them out."""

    dp: int = 1  # data parallel: each group of the other dimensions trains its own samples
    sp: int = 1  # sequence parallel: the ranks of a group split each sequence (1 until that issue lands)

    @property
    def world_size(self) -> int:
        """Ranks the dimensions span together."""
        return self.dp * self.sp

    @property
    def names(self) -> tuple[str, ...]:
        """Mesh dimension names, outermost first (dimensions of size 1 left out)."""
        return tuple(n for n, size in (("dp", self.dp), ("sp", self.sp)) if size > 1) or ("dp",)

    @property
    def shape(self) -> tuple[int, ...]:
        """Mesh shape, outermost first (dimensions of size 1 left out)."""
        return tuple(size for size in (self.dp, self.sp) if size > 1) or (1,)

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of process `rank` (its position along `dp`)."""
        inner = self.world_size // self.dp
        return rank // inner

    @classmethod
    def data_parallel(cls, world_size: int) -> ParallelDims:
        """Every rank data parallel (DDP, FSDP, ZeRO today)."""
        return cls(dp=world_size)
