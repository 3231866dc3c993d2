"""launcher/rng.py: side work between steps leaves the global random streams where it found them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from launcher.rng import global_streams_state, seed_global_streams, set_global_streams, untouched_global_streams


def _draw() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_side_work_puts_every_stream_back() -> None:
    """Whatever a decorated function draws from Python's, NumPy's and torch's global streams, the next draw
    after it is the one that would have come without it (also when it raises)."""
    seed_global_streams(11)
    expected = _draw()

    @untouched_global_streams()
    def noisy(fail: bool) -> None:
        _draw()
        if fail:
            raise RuntimeError("side work failed")

    seed_global_streams(11)
    noisy(False)
    with pytest.raises(RuntimeError):
        noisy(True)
    got = _draw()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_saved_state_restores_every_stream() -> None:
    """global_streams_state / set_global_streams round-trip: a checkpoint's RNG file resumes the same draws."""
    seed_global_streams(5)
    _draw()
    state = global_streams_state()
    expected = _draw()
    _draw()
    set_global_streams(state)
    got = _draw()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
