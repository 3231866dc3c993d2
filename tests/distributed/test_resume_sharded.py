"""Exact resume and world-size changes for the sharded strategies (2 real ranks on gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import base_config, write_config
from resume_utils import final_weights, finish, flip_bytes, kill_after, loss_scales, losses, max_weight_diff, start

pytestmark = pytest.mark.slow
STEPS = 8
STRATEGY = {
    "fsdp": ["distributed.strategy=fsdp"],
    "zero2": ["distributed.strategy=deepspeed", "distributed.zero_stage=2"],
    "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"],
}


def _config(tmp_path: Path, models: dict, toy_data: dict, kind: str) -> Path:
    """kind: full | lora | qlora, or full-fp16 (a loss scale that overflows and grows every step)."""
    # QLoRA runs train with adapter dropout, so their exact resume proves each rank's RNG state is restored;
    # the others use none, as a world-size change cannot reproduce per-rank dropout masks
    dropout = 0.1 if kind == "qlora" else 0.0
    method = {"kind": kind.removesuffix("-fp16"), "lora": {"r": 8, "alpha": 16, "dropout": dropout}}
    if kind == "qlora":
        method["qlora"] = {"compute_dtype": "float32"}
    train = {"max_steps": STEPS, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 2}
    if kind.endswith("-fp16"):
        train |= {"precision": "fp16", "fp16_initial_scale": 2**20, "fp16_growth_interval": 1}
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method=method,
        train=train,
        checkpoint={"every_steps": 2, "keep_last": 2},
        logging={"sample_ids": True},
    )
    return write_config(tmp_path / f"{kind}.yaml", cfg)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, models: dict, toy_data: dict):
    """The uninterrupted 2-rank reference run per (strategy, kind), run once and shared by the tests."""
    done: dict[tuple[str, str], Path] = {}

    def get(strategy: str, kind: str) -> Path:
        if (strategy, kind) not in done:
            root = tmp_path_factory.mktemp(f"straight-{strategy}-{kind}")
            _run(_config(root, models, toy_data, kind), root / "run", STRATEGY[strategy], 2)
            done[strategy, kind] = root / "run"
        return done[strategy, kind]

    return get


def _run(cfg: Path, out: Path, overrides: list[str], nproc: int) -> str:
    code, log = finish(start(cfg, f"output_dir={out}", *overrides, nproc=nproc))
    assert code == 0, log[-4000:]
    return log


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [
        ("fsdp", "full"),
        ("fsdp", "lora"),
        ("zero2", "full"),
        ("zero2", "lora"),
        ("zero3", "full"),
        ("zero3", "lora"),
        ("fsdp", "qlora"),
        ("zero3", "qlora"),
        ("fsdp", "full-fp16"),
    ],
)
def test_kill_and_resume_is_exact(
    tmp_path: Path, models: dict, toy_data: dict, straight, strategy: str, kind: str
) -> None:
    cfg, extra = _config(tmp_path, models, toy_data, kind), STRATEGY[strategy]
    ref = straight(strategy, kind)
    run = tmp_path / "killed"
    kill_after(cfg, run, *extra, step=5, nproc=2)
    log = _run(cfg, run, extra, 2)
    assert "at step 4" in log
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(5, STEPS + 1)] == pytest.approx([want[s] for s in range(5, STEPS + 1)], rel=1e-6)
    assert max_weight_diff(final_weights(run), final_weights(ref)) <= 1e-6
    if kind.endswith("-fp16"):  # the sharded grad scaler resumed mid-flight, not from its initial scale
        assert loss_scales(run) == loss_scales(ref) and len(set(loss_scales(ref))) > 2


@pytest.mark.parametrize(("strategy", "kind"), [("fsdp", "lora"), ("zero3", "full")])
def test_a_corrupt_shard_is_set_aside_and_the_run_still_ends_exactly(
    tmp_path: Path, models: dict, toy_data: dict, straight, strategy: str, kind: str
) -> None:
    """8 bytes flipped in the largest shard of the latest checkpoint (killed after step 5): the ranks verify their
    shares, agree it is corrupt, set it aside and resume from step 2, ending where the straight run ends."""
    cfg, extra = _config(tmp_path, models, toy_data, kind), STRATEGY[strategy]
    ref = straight(strategy, kind)
    run = tmp_path / "killed"
    kill_after(cfg, run, *extra, step=5, nproc=2)
    victim = flip_bytes(run / "checkpoints" / "step-00000004")
    log = _run(cfg, run, extra, 2)
    assert "step-00000004 is corrupt" in log and victim.name in log and "at step 2" in log, log[-3000:]
    assert (run / "checkpoints" / "corrupt-step-00000004").is_dir()
    got, want = losses(run), losses(ref)
    assert [got[s] for s in range(3, STEPS + 1)] == pytest.approx([want[s] for s in range(3, STEPS + 1)], rel=1e-6)
    assert max_weight_diff(final_weights(run), final_weights(ref)) <= 1e-6


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_resume_on_another_world_size(tmp_path: Path, models: dict, toy_data: dict, straight, strategy: str) -> None:
    """2 ranks × micro 2 → 1 rank × micro 2 × accum 2 (same global batch), and 1 → 2 likewise."""
    cfg, extra = _config(tmp_path, models, toy_data, "lora"), STRATEGY[strategy]
    ref = straight(strategy, "lora")
    down = tmp_path / "down"
    kill_after(cfg, down, *extra, step=5, nproc=2)
    log = _run(cfg, down, [*extra, "train.grad_accum=2"], 0)
    assert "at step 4" in log and "saved by 2 rank(s)" in log
    up = tmp_path / "up"
    kill_after(cfg, up, *extra, "train.grad_accum=2", step=5)
    log = _run(cfg, up, extra, 2)
    assert "at step 4" in log and "saved by 1 rank(s)" in log
    want = losses(ref)
    for run in (down, up):
        got = losses(run)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert [got[s] for s in range(5, STEPS + 1)] == pytest.approx([want[s] for s in range(5, STEPS + 1)], rel=1e-4)
        assert max_weight_diff(final_weights(run), final_weights(ref)) <= 1e-4


@pytest.mark.parametrize(("strategy", "kind"), [("fsdp", "lora"), ("zero3", "full")])
def test_export_from_a_sharded_checkpoint(
    tmp_path: Path, models: dict, toy_data: dict, strategy: str, kind: str
) -> None:
    """`ftl export --checkpoint` consolidates shards offline (one process) into the same model `final/` holds."""
    from helpers import ftl
    from safetensors.torch import load_file

    cfg, extra = _config(tmp_path, models, toy_data, kind), STRATEGY[strategy]
    const = [*extra, "train.schedule=constant", "train.warmup_steps=0"]
    _run(cfg, tmp_path / "long", [*const, "train.max_steps=4"], 2)
    _run(cfg, tmp_path / "short", [*const, "train.max_steps=2"], 2)
    out = tmp_path / "exported"
    res = ftl("export", str(tmp_path / "long"), "--checkpoint", "step-00000002", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    name = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    exported, final = load_file(out / name), load_file(tmp_path / "short" / "final" / name)
    assert exported.keys() == final.keys()
    assert max(float((exported[k].float() - final[k].float()).abs().max()) for k in final) <= 1e-6
