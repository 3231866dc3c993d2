"""Preference objectives under every strategy (issue 18) on real 2-rank CPU/gloo process groups: DDP, FSDP2 and
ZeRO-1/2/3 (+ offload) with LoRA, and QLoRA under FSDP2 and ZeRO-3, against one process; kill -9 and resume.

A reference objective's reference is the same network with its adapter switched off, scored without gradients
through the strategy's `forward_only_model`: the probe checks that this forward leaves no sharded weight
gathered and that the reference stays the base network while the policy trains.

Starting a rank costs seconds of imports, so one launch runs every config (this file is the driver, as
test_deepspeed.py is its own: `python test_preference_sharded.py train=CFG probe=CFG ...`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # helpers, when run as the driver

import yaml
from helpers import base_config, read_metrics, write_config, write_jsonl
from resume_utils import final_weights, kill_after, losses, max_weight_diff
from test_deepspeed import _launch
from test_dpo import preference_rows

from launcher.objectives.traits import KINDS, objective_traits

pytestmark = pytest.mark.slow
THIS = Path(__file__).resolve()
OBJECTIVES = ("dpo", "simpo", "orpo")  # the pair objectives on an LM head (objective.kind)
FIRST_LOSS = {"dpo": math.log(2)}  # the exact step-1 loss where there is one: the policy is its reference
STEPS = 5
STRATEGIES: dict[str, dict[str, Any]] = {  # name -> distributed section
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "zero1": {"strategy": "deepspeed", "zero_stage": 1},
    "zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "zero3": {"strategy": "deepspeed", "zero_stage": 3},
    "zero3_offload": {"strategy": "deepspeed", "zero_stage": 3, "offload": "all"},
}
CASES = [*((s, "lora") for s in STRATEGIES), ("fsdp", "qlora"), ("zero3", "qlora")]
# DPO gets every case (its reference forward is the strategy-sensitive part); the reference-free objectives share
# the rest of its path (sequence log-probs, pair batches), so the two sharded strategies suffice for them
# full fine-tuning DPO: `auto` picks precomputed reference log-probs under the sharded strategies (a pass over the
# sharded starting model), a frozen copy in one process: both are the starting model, so the runs agree
MATRIX = [("dpo", s, m) for s, m in CASES] + [("dpo", s, "full") for s in ("fsdp", "zero3")]
MATRIX += [(o, s, "lora") for o in ("simpo", "orpo") for s in ("fsdp", "zero3")]
RESUMED = ("dpo",)
PROBED = ("fsdp-lora", "zero3-lora", "fsdp-qlora", "zero3-qlora")  # the weights are sharded
REFERENCE_OBJECTIVES = [o for o in OBJECTIVES if objective_traits(KINDS[o]).reference]  # they have a reference forward


def _config(root: Path, model: Path, objective: str, strategy: str, method: str, ranks: int) -> Path:
    """A 5-step fp32 run of `objective` on 16 pairs, 4 pairs a step (2 ranks × 2, or 1 rank × 2 × 2 accum),
    written to root/NAME/cfg.yaml with output_dir root/NAME/run."""
    work = root / f"{objective}-{strategy}-{method}-{ranks}"
    work.mkdir()
    distributed = dict(STRATEGIES[strategy]) if ranks > 1 else {"strategy": "single"}
    chosen: dict[str, Any] = {"kind": method}
    if method == "qlora":  # as the SFT tests run it: fp32 compute; under ZeRO-3 partitioning even tiny 4-bit weights
        chosen["qlora"] = {"compute_dtype": "float32"}
        if strategy == "zero3" and ranks > 1:
            zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": "auto"}
            user = work / "ds.json"
            user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero}))
            distributed = {"strategy": "deepspeed", "deepspeed_config": str(user)}
    cfg = base_config(
        work,
        model,
        write_jsonl(work / "pairs.jsonl", preference_rows(16, seed=2)),
        objective={"kind": objective},
        method=chosen,
        data={"format": "preference"},
        distributed={**distributed, "timeout_minutes": 5},
        train={"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 1 if ranks > 1 else 2, "lr": 1e-2},
        checkpoint={"every_steps": 2},  # the FSDP run is the straight run of the resume test
    )
    return write_config(work / "cfg.yaml", cfg)


def _variant(path: Path, name: str, output_dir: Path, **train: int) -> Path:
    """The config at `path` written as NAME.yaml beside it, into `output_dir` (and `train` changed)."""
    cfg = yaml.safe_load(path.read_text())
    cfg["output_dir"] = str(output_dir)
    cfg["train"].update(train)
    return write_config(path.with_name(f"{name}.yaml"), cfg)


def _killed(path: Path) -> tuple[Path, Path]:
    """The FSDP2 run of `path` on 2 ranks, kill -9'd after step 3 (checkpoint at step 2, the next one parked),
    in two copies: resumed on 2 ranks, and on 1 rank with grad_accum 2 (the same global batch)."""
    same, down = path.parent / "killed", path.parent / "down"
    kill_after(path, same, step=3, nproc=2)
    shutil.copytree(same, down)
    return _variant(path, "resume-2", same), _variant(path, "resume-1", down, grad_accum=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, models: dict) -> dict[str, Path]:
    """A 2-rank FSDP2 run kill -9'd; then, in one 2-rank launch, every 2-rank config trained, the sharded ones
    probed and the killed run resumed; in one 1-rank launch the one-process references and the killed run's
    copy resumed. NAME (`objective-strategy-method-ranks`, `objective-resumed-ranks`) -> its output_dir."""
    tmp, model = tmp_path_factory.mktemp("pref"), models["llama"]
    two = {f"{o}-{s}-{m}": _config(tmp, model, o, s, m, 2) for o, s, m in MATRIX}
    one = [_config(tmp, model, o, "single", m, 1) for o, m in sorted({(o, m) for o, _, m in MATRIX})]
    probes = [
        _variant(two[f"{o}-{case}"], "probe", two[f"{o}-{case}"].parent / "probe")
        for o in REFERENCE_OBJECTIVES
        for case in PROBED
    ]
    resumed = {o: _killed(two[f"{o}-fsdp-lora"]) for o in RESUMED}  # o -> (2-rank, 1-rank) resume configs
    jobs = [*(f"train={p}" for p in two.values()), *(f"probe={p}" for p in probes)]
    _launch(2, tmp / "logs", *jobs, *(f"train={r[0]}" for r in resumed.values()), driver=THIS)
    _launch(1, tmp / "logs", *(f"train={p}" for p in [*one, *(r[1] for r in resumed.values())]), driver=THIS)
    out = {p.parent.name: p.parent / "run" for p in [*two.values(), *one]}
    for o in RESUMED:
        out[f"{o}-resumed-2"], out[f"{o}-resumed-1"] = (two[f"{o}-fsdp-lora"].parent / d for d in ("killed", "down"))
    out["logs"] = tmp / "logs"
    return out


def _rows(run: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run) if "loss" in r]


@pytest.mark.parametrize(("objective", "strategy", "method"), MATRIX)
def test_every_strategy_trains_as_one_process(runs: dict[str, Path], objective: str, strategy: str, method: str):
    """Step 1 is exact (ln 2 for sigmoid DPO: policy = reference), and every step's loss, grad norm and reward
    metrics equal the one-process run's within the sharded SFT tests' tolerance; so do the trained adapters."""
    got, want = (_rows(runs[f"{objective}-{s}-{method}-{n}"]) for s, n in ((strategy, 2), ("single", 1)))
    assert [r["world_size"] for r in got] == [2] * STEPS and len(want) == STEPS
    if objective in FIRST_LOSS:
        assert abs(got[0]["loss"] - FIRST_LOSS[objective]) < 1e-6
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4, abs=1e-6), key
    assert want[-1]["loss"] < want[0]["loss"] - 0.01  # it trained: the comparison is not of five equal steps
    a, b = (final_weights(runs[f"{objective}-{s}-{method}-{n}"]) for s, n in ((strategy, 2), ("single", 1)))
    assert max_weight_diff(a, b) < 1e-5


@pytest.mark.parametrize("objective", REFERENCE_OBJECTIVES)
@pytest.mark.parametrize("case", PROBED)
def test_reference_forward_gathers_and_frees(runs: dict[str, Path], objective: str, case: str):
    """The reference forward (no gradients, through the strategy's forward_only_model) frees the base weights it
    gathered, and a training step after it frees everything; the reference stays the base network (the adapter is
    off: its log-probs do not move over a step) while the policy's move.

    FSDP2 frees every unit after its forward. ZeRO-3's prefetcher replays the previous forward's order, and the
    reference and training forwards alternate, so after the reference forward the adapter weights it fetched ahead
    (which the reference skips) may stay gathered, until the training forward right after uses and frees them."""
    probe = json.loads((runs[f"{objective}-{case}-2"].with_name("probe") / "probe.json").read_text())
    after_reference, after_step = probe["gathered"][0::2], probe["gathered"][1::2]
    assert probe["sharded"] > 0 and after_step == [[], []], probe
    assert all("lora_" in name for names in after_reference for name in names), probe
    if case.startswith("fsdp"):
        assert after_reference == [[], []], probe
    assert probe["reference_moved"] < 1e-6 < 1e-3 < probe["policy_moved"], probe


@pytest.mark.parametrize("objective", RESUMED)
@pytest.mark.parametrize("ranks", [2, 1])
def test_fsdp_kill_and_resume_is_exact(runs: dict[str, Path], objective: str, ranks: int) -> None:
    """A 2-rank FSDP2 run kill -9'd after step 3 resumes from its step-2 checkpoint, on 2 ranks or on 1 (grad_accum
    2, the same global batch): steps 3-5 and final/ equal the straight run's (exactly; across world sizes within
    the sharded SFT tests' 1e-4)."""
    straight, run = runs[f"{objective}-fsdp-lora-2"], runs[f"{objective}-resumed-{ranks}"]
    log = (runs["logs"] / f"world{ranks}-rank0.log").read_text()
    assert any(f"resumed from {run}/" in x and "at step 2 (saved by 2 rank(s)" in x for x in log.splitlines())
    tol = 1e-6 if ranks == 2 else 1e-4
    got, want = losses(run), losses(straight)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in (3, 4, 5)] == pytest.approx([want[s] for s in (3, 4, 5)], rel=tol)
    assert max_weight_diff(final_weights(run), final_weights(straight)) <= tol


# ----------------------------------------------------------------------------------------- the driver
def _gathered(module: Any) -> tuple[int, list[str]]:
    """(how many parameters this rank holds sharded, the names of those now gathered whole): FSDP2 swaps a unit's
    DTensor shards for whole tensors while it is gathered; ZeRO-3 marks a fetched partitioned parameter available
    (small persistent ones always are)."""
    from torch.distributed.tensor import DTensor

    sharded, gathered = 0, []
    for name, p in module.named_parameters():
        partitioned = not p.ds_persist if hasattr(p, "ds_status") else True
        whole = p.ds_status.name != "NOT_AVAILABLE" if hasattr(p, "ds_status") else not isinstance(p, DTensor)
        sharded += partitioned
        if partitioned and whole:
            gathered.append(name)
    return sharded, gathered


def _probe(config: str) -> None:
    """Reference forward, training step, twice, as the loop builds the run; rank 0 writes OUTPUT_DIR/probe.json:
    the sharded parameter count, the names gathered after each of the four, and how far the reference's and the
    policy's log-probs of the same pairs moved over the steps."""
    import torch

    from launcher.checkpoint import TrainState
    from launcher.config_loading import load_config
    from launcher.dist import init_distributed
    from launcher.evaluation import to_device
    from launcher.model import load_tokenizer
    from launcher.objectives.dpo import sequence_logps
    from launcher.optim import optimizer_factory
    from launcher.prepare import prepare_data
    from launcher.run_start import make_collator
    from launcher.trainer import optimizer_step, plan_run

    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg)
    run = plan_run(cfg, init_distributed(5), Path(cfg.output_dir), prepare_data(cfg, tokenizer))
    strategy, objective, state = run.strategy, run.objective, TrainState()
    model = strategy.build_model()
    strategy.setup(model, optimizer_factory(cfg.train, model))
    objective.use_forward_only(strategy.forward_only_model)
    strategy.model.train()
    run.collate = make_collator(run, tokenizer)
    batch = to_device(run.collate(run.data.train, [0, 1]), run.env.device)
    inner = strategy.forward_only_model
    sharded, _ = _gathered(inner)
    references, gathered = [], []
    for _ in range(2):
        references.append(objective.reference_logps(strategy.model, batch))
        gathered.append(_gathered(inner)[1])
        optimizer_step(run, state)
        gathered.append(_gathered(inner)[1])
    with torch.no_grad():
        policy = sequence_logps(inner, batch)[0]
    out = {
        "sharded": sharded,
        "gathered": gathered,  # after: reference, step 1, reference, step 2
        "reference_moved": float((references[1] - references[0]).abs().max()),
        "policy_moved": float((policy - references[0]).abs().max()),
    }
    if run.env.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "probe.json").write_text(json.dumps(out))


def _drive(jobs: list[str]) -> int:
    """Run train=CFG (`ftl train CFG` in these ranks) and probe=CFG jobs in order, keeping the process group."""
    import launcher.trainer as trainer
    from launcher.cli import main
    from launcher.dist import DistEnv, shutdown

    trainer.shutdown = lambda env: None
    code = 0
    for job in jobs:
        kind, _, config = job.partition("=")
        if kind == "train":
            code = max(code, main(["train", config]))
        else:
            _probe(config)
    shutdown(DistEnv(world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    return code


if __name__ == "__main__":
    sys.exit(_drive(sys.argv[1:]))
