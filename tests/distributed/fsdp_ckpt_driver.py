"""Drives FSDPStrategy.save_checkpoint / load_checkpoint directly, on whatever world size started it.

    python fsdp_ckpt_driver.py CONFIG save|load WORKDIR KIND[+dotted.key=value...][,KIND...] [dotted.key=value ...]

For each method.kind (one process start serves several: imports dominate on small CPUs), with the overrides
given after it and its `+`s (its work directory is named by the whole item):
save: train steps 1-4, writing a DCP checkpoint to WORKDIR/KIND/ckpt after step 2.
load: load WORKDIR/KIND/ckpt, then train steps 3-4.
Rank 0 writes the losses of the steps it ran (WORKDIR/KIND/{phase}.json) and the final model as `final/` would
hold it (WORKDIR/KIND/{phase}-final, through save_pretrained), so the test can compare a resumed run with an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from launcher.checkpoint import TrainState
from launcher.config_loading import load_config
from launcher.dist import init_distributed, shutdown
from launcher.model import load_tokenizer
from launcher.optim import optimizer_factory
from launcher.prepare import prepare_data
from launcher.run_start import make_collator
from launcher.trainer import optimizer_step, plan_run

STEPS, SAVE_AT = 4, 2


def run_phase(config: str, phase: str, work: Path, overrides: list[str]) -> None:
    """One phase for one config (see the module docstring)."""
    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    env = init_distributed(cfg.distributed.timeout_minutes)
    run = dataclasses.replace(plan_run(cfg, env, Path(cfg.output_dir), data), steps=STEPS)
    strategy = run.strategy
    model = strategy.build_model()
    strategy.setup(model, optimizer_factory(cfg.train, model))
    run.collate = make_collator(run, tokenizer)
    state = TrainState()
    if phase == "load":
        strategy.load_checkpoint(work / "ckpt")
        state.step = SAVE_AT
    losses = []
    while state.step < STEPS:
        row = optimizer_step(run, state)
        losses.append(row["loss"])
        if phase == "save" and state.step == SAVE_AT:
            strategy.save_checkpoint(work / "ckpt")
    strategy.save_pretrained(work / f"{phase}-final")  # what the run's final/ would hold (every rank calls it)
    if env.is_main:
        (work / f"{phase}.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    config, phase, root, kinds, *extra = sys.argv[1:]
    for item in kinds.split(","):
        kind, *own = item.split("+")
        run_phase(config, phase, Path(root) / item, [*extra, *own, f"method.kind={kind}"])
    shutdown(init_distributed(30))
