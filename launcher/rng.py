"""The global random streams (torch CPU and CUDA, NumPy, Python `random`) belong to the training computation.

Exact resume rests on one rule: between two optimizer steps, only the training computation draws from the
global streams (dropout, the model's own sampling). Everything else that runs during a run, such as measuring
the CPU's peak, evaluation, checkpoint writes, W&B, either uses a private generator or runs inside
`untouched_global_streams`, which puts the streams back as they were. A measurement that happens only on a
cache miss, or a library that jitters its network retries with `random.random()`, then cannot change which
dropout masks the next step draws.

The trainer sets the streams (seeds them, or restores a checkpoint's) as the last thing before its first step,
so nothing set up before the loop can move them either.

torch's streams are handled once torch is loaded (before that nothing can have drawn from them): `ftl
validate` and the other light commands log through modules that use this one, and stay free of torch.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np


def _torch() -> ModuleType | None:
    return sys.modules.get("torch")


def seed_global_streams(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), NumPy's legacy global generator and Python's `random`."""
    seed %= 2**32  # NumPy's limit
    random.seed(seed)
    np.random.seed(seed)
    torch = _torch()
    if torch is not None:
        torch.manual_seed(seed)


def global_streams_state() -> dict[str, Any]:
    """Every global stream's state: tensors and plain values only, so it loads with weights_only=True."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].copy(), *np_state[2:]]}
    torch = _torch()
    if torch is not None:
        state["numpy"][1] = torch.from_numpy(state["numpy"][1])  # a tensor: checkpoints load weights_only
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_streams(state: dict[str, Any]) -> None:
    """Put every global stream back to `state` (from `global_streams_state`)."""
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys), *rest))
    torch = _torch()
    if torch is not None and "torch" in state:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def untouched_global_streams() -> Iterator[None]:
    """Run side work (measurement, evaluation, checkpointing, logging) without moving the global streams; as a
    decorator, `@untouched_global_streams()` (contextlib's context managers decorate too)."""
    saved = global_streams_state()
    try:
        yield
    finally:
        set_global_streams(saved)
