"""Parallel dimensions: the data-parallel world is what deals out samples, not the process world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import base_config

from launcher.config import Config
from launcher.data import GlobalBatchSampler
from launcher.dist import DistEnv
from launcher.parallel import ParallelDims


def test_alone_and_data_parallel_worlds_are_the_process_world() -> None:
    """Today every rank is data parallel: dp rank and size equal the process rank and size."""
    assert (DistEnv().dp_rank, DistEnv().dp_size) == (0, 1)
    env = DistEnv(rank=3, world_size=4)
    assert (env.dp_rank, env.dp_size, env.dims.shape) == (3, 4, (4,))


def test_a_second_dimension_makes_groups_that_share_samples(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """4 ranks as 2 data-parallel × 2 sequence-parallel: ranks 0,1 and 2,3 form groups; the sampler built by the
    trainer deals each group (not each rank) its share, and the global batch counts groups, not ranks."""
    from launcher.trainer import make_sampler

    cfg = Config.model_validate(base_config(tmp_path, models["llama"], toy_data["completion"]))
    envs = [DistEnv(rank=r, world_size=4, dims=ParallelDims(dp=2, sp=2)) for r in range(4)]
    assert [e.dp_rank for e in envs] == [0, 0, 1, 1] and envs[0].dims.shape == (2, 2)

    class Train:  # the length is all the sampler reads of the split
        def __len__(self) -> int:
            return 64

    class Data:
        train = Train()

    sampler = make_sampler(cfg, envs[0], Data())
    assert sampler.global_batch == cfg.train.micro_batch_size * cfg.train.grad_accum * 2
    reference = GlobalBatchSampler(64, cfg.train.micro_batch_size, cfg.train.grad_accum, 2, cfg.train.seed)
    for step in range(3):
        for e in envs:
            got, want = sampler.micro_batches(step, e.dp_rank), reference.micro_batches(step, e.dp_rank)
            assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_dimensions_must_span_the_world() -> None:
    with pytest.raises(ValueError, match="span 2 ranks, not 4"):
        DistEnv(rank=0, world_size=4, dims=ParallelDims(dp=2))
