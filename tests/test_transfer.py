"""The transfer-learning toolbox: layer freezing, discriminative LRs, slanted triangular LR — each under
single, FSDP and ZeRO-3 (2 real ranks), asserted on the trained weights and the optimizer's own LRs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import base_config, ftl, read_metrics, write_config
from safetensors.torch import load_file

from launcher.config import TrainConfig
from launcher.optim import lr_factor, stlr_factor

STRATEGIES = {
    "single": ({}, 0),
    "fsdp": ({"strategy": "fsdp"}, 2),
    "zero3": ({"strategy": "deepspeed", "zero_stage": 3}, 2),
}


def _train(tmp: Path, cfg: dict, nproc: int) -> tuple[Path, str]:
    path = write_config(tmp / "cfg.yaml", cfg)
    res = ftl("train", str(path), *(["--nproc", str(nproc)] if nproc else []))
    assert res.returncode == 0, res.stderr[-4000:]
    return Path(cfg["output_dir"]), res.stderr


def _strategy_param(name: str):
    return pytest.param(name, marks=[pytest.mark.slow] if STRATEGIES[name][1] else [])


@pytest.mark.parametrize("strategy", [_strategy_param(s) for s in STRATEGIES])
def test_frozen_parameters_are_bitwise_unchanged(tmp_path: Path, models: dict, toy_data: dict, strategy: str) -> None:
    dist, nproc = STRATEGIES[strategy]
    freeze = {"embeddings": True, "bottom_layers": 1, "patterns": [r"post_attention_layernorm"]}
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "full", "freeze": freeze},
        train={"max_steps": 3, "lr": 1e-2},
        distributed=dist,
    )
    run, log = _train(tmp_path, cfg, nproc)
    base = load_file(models["llama"] / "model.safetensors")
    trained = load_file(run / "final" / "model.safetensors")
    frozen = [n for n in base if "embed_tokens" in n or ".layers.0." in n or "post_attention_layernorm" in n]
    moving = [n for n in base if n not in frozen]
    assert frozen and moving
    for name in frozen:
        assert trained[name].equal(base[name]), name  # bitwise: no update, no weight decay, no drift
    for name in moving:
        assert not trained[name].equal(base[name]), name
    assert "trainable per block: emb=0 0=0 1=" in log, log[-3000:]


def test_freezing_applies_on_top_of_lora(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "lora", "freeze": {"bottom_layers": 1}},
        train={"max_steps": 3, "lr": 1e-2},
    )
    run, _ = _train(tmp_path, cfg, 0)
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    lower = [n for n in adapter if ".layers.0." in n and "lora_B" in n]
    upper = [n for n in adapter if ".layers.1." in n and "lora_B" in n]
    assert lower and upper
    assert all(not adapter[n].any() for n in lower)  # B starts at zero; frozen, it stays there
    assert all(adapter[n].any() for n in upper)


@pytest.mark.parametrize("strategy", [_strategy_param(s) for s in STRATEGIES])
def test_each_group_lr_is_layer_decay_times_the_schedule(
    tmp_path: Path, models: dict, toy_data: dict, strategy: str
) -> None:
    dist, nproc = STRATEGIES[strategy]
    decay, steps = 0.5, 6
    train = {"max_steps": steps, "lr": 1e-2, "layer_lr_decay": decay, "schedule": "stlr"}
    train["stlr"] = {"cut_frac": 0.34, "ratio": 8}
    cfg = base_config(
        tmp_path, models["llama"], toy_data["completion"], method={"kind": "full"}, train=train, distributed=dist
    )
    run, log = _train(tmp_path, cfg, nproc)
    t = TrainConfig.model_validate(train)
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert len(rows) == steps
    layers = 2
    for row in rows:
        peak = 1e-2 * lr_factor(row["step"] - 1, t, steps)
        expected = {"emb": peak * decay**layers, "0": peak * decay, "1": peak, "head": peak}
        assert row["lr_groups"] == pytest.approx(expected, rel=1e-9), row
        assert row["lr"] == pytest.approx(peak, rel=1e-9)
    assert "peak LR per group: emb=0.0025 0=0.005 1=0.01 head=0.01" in log, log[-3000:]


def test_slanted_triangular_lr_equals_the_ulmfit_formula() -> None:
    # T = 100 steps, cut_frac 0.1 -> cut = 10; ratio 32 (Howard & Ruder 2018, eq. 3)
    expected = {0: 1 / 32, 5: (1 + 0.5 * 31) / 32, 10: 1.0, 55: (1 + 0.5 * 31) / 32, 99: (1 + 31 / 90) / 32}
    for step, value in expected.items():
        assert stlr_factor(step, 100, 0.1, 32) == pytest.approx(value, rel=1e-12), step
    values = [stlr_factor(s, 100, 0.1, 32) for s in range(100)]
    assert values.index(max(values)) == 10 and min(values) == pytest.approx(1 / 32)


@pytest.mark.parametrize(("total", "cut_frac"), [(25, 0.1), (37, 0.3)])  # T·cut_frac = 2.5, 11.1: not whole
def test_slanted_triangular_lr_follows_the_paper_when_the_cut_is_rounded(total: int, cut_frac: float) -> None:
    """With T·cut_frac not whole the fall lasts cut·(1/cut_frac − 1) steps (Howard & Ruder 2018, eq. 3), not
    T − cut: lr_factor equals the paper's formula at every step, floored at the documented lowest LR, peak/ratio."""
    import math

    ratio = 32.0
    t = TrainConfig(schedule="stlr", stlr={"cut_frac": cut_frac, "ratio": ratio})
    cut = math.floor(total * cut_frac)
    for step in range(total):
        p = step / cut if step < cut else 1 - (step - cut) / (cut * (1 / cut_frac - 1))
        # the paper's p goes below 0 after step cut/cut_frac < T; the LR stops at peak/ratio instead of crossing 0
        expected = (1 + max(p, 0.0) * (ratio - 1)) / ratio
        assert lr_factor(step, t, total) == pytest.approx(expected, rel=1e-12), step


def _gradual_config(tmp_path: Path, models: dict, toy_data: dict, dist: dict) -> dict:
    return base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "full"},
        train={"max_steps": 8, "lr": 1e-2, "weight_decay": 0.1, "gradual_unfreeze": {"every_steps": 2}},
        checkpoint={"every_steps": 2, "keep_last": 10},
        distributed=dist,
        logging={"every_steps": 1, "sample_ids": True},
    )


def _depth(name: str) -> str:
    return "emb" if "embed_tokens" in name else "0" if ".layers.0." in name else "1" if ".layers.1." in name else "head"


@pytest.mark.parametrize("strategy", [_strategy_param(s) for s in STRATEGIES])
def test_gradual_unfreezing_thaws_one_block_per_period(
    tmp_path: Path, models: dict, toy_data: dict, strategy: str
) -> None:
    """2 blocks, a thaw every 2 steps: head alone (steps 1-2), + block 1 (3-4), + block 0 (5-6), + embeddings.
    With weight decay on, a block still frozen by the schedule must be bitwise the pre-trained one."""
    from launcher.export import checkpoint_weights

    dist, nproc = STRATEGIES[strategy]
    run, _ = _train(tmp_path, _gradual_config(tmp_path, models, toy_data, dist), nproc)
    base = load_file(models["llama"] / "model.safetensors")
    thawed_after = {"head": 0, "1": 2, "0": 4, "emb": 6}  # steps done before the depth first trains
    for step in (2, 4, 6):
        weights = checkpoint_weights(run / "checkpoints" / f"step-{step:08d}")
        for name, tensor in weights.items():
            key = name.removeprefix("model.") if name not in base else name
            changed = not tensor.equal(base.get(name, base.get(key)))
            assert changed == (step > thawed_after[_depth(name)]), (step, name)
    rows = [r for r in read_metrics(run) if "loss" in r]
    for row in rows:
        for depth, after in thawed_after.items():
            assert (row["lr_groups"][depth] > 0) == (row["step"] > after), row


def test_gradual_unfreezing_resumes_exactly_across_a_thaw(tmp_path: Path, models: dict, toy_data: dict) -> None:
    from resume_utils import straight_and_resumed

    cfg = write_config(tmp_path / "cfg.yaml", _gradual_config(tmp_path, models, toy_data, {}))
    straight_and_resumed(cfg, tmp_path, kill_step=3)  # step 2's checkpoint is the latest; block 1 thaws at step 3


RESUMED_TECHNIQUES = {  # technique: (method, train); each holds state a resume must restore or rebuild alike
    "l2sp": ({"kind": "full"}, {"l2sp": {"weight": 1.0}}),  # the anchor: the base model, not the checkpoint
    "adapter": ({"kind": "adapter", "adapter": {"size": 8}}, {}),
    "prompt_tuning": ({"kind": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 4}}, {}),
}


@pytest.mark.parametrize("technique", list(RESUMED_TECHNIQUES))
def test_techniques_with_state_resume_exactly(tmp_path: Path, models: dict, toy_data: dict, technique: str) -> None:
    """Killed after step 3 (step 2's checkpoint is the latest) and resumed = the uninterrupted run: final
    weights within 1e-6 and, for L2-SP, the same penalty every step (re-anchoring at the checkpoint would
    restart it near 0)."""
    from resume_utils import straight_and_resumed

    method, train = RESUMED_TECHNIQUES[technique]
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method=method,
        train={"max_steps": 6, "lr": 1e-2, **train},
        checkpoint={"every_steps": 2, "keep_last": 10},
    )
    straight_run, run = straight_and_resumed(write_config(tmp_path / "cfg.yaml", cfg), tmp_path)
    if technique == "l2sp":
        penalty = lambda r: {x["step"]: x["l2sp_penalty"] for x in read_metrics(r) if "l2sp_penalty" in x}  # noqa: E731
        straight, resumed = penalty(straight_run), penalty(run)
        assert all(resumed[s] == pytest.approx(straight[s], rel=1e-5) for s in (3, 4, 5, 6)), (straight, resumed)


@pytest.mark.parametrize("strategy", [_strategy_param(s) for s in STRATEGIES])
def test_reference_loss_measures_forgetting(tmp_path: Path, models: dict, toy_data: dict, strategy: str) -> None:
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.data import collate
    from launcher.data.tokenized import tokenize_rows
    from launcher.loss import causal_lm_loss_sum

    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": "full"},
        data={"reference": str(toy_data["text"])},
        train={"max_steps": 6, "lr": 1e-2, "eval_every": 3},
        distributed=STRATEGIES[strategy][0],
    )
    run, log = _train(tmp_path, cfg, STRATEGIES[strategy][1])
    refs = [(r["step"], r["reference_loss"]) for r in read_metrics(run) if "reference_loss" in r]
    assert [s for s, _ in refs] == [0, 3, 6]
    tok = AutoTokenizer.from_pretrained(models["llama"])
    rows = [json.loads(x) for x in toy_data["text"].read_text().splitlines()]
    samples = tokenize_rows(rows, "text", tok, 64, mask_prompt=False)
    model = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    with torch.no_grad():
        total = sum(
            float(causal_lm_loss_sum(model, collate(samples, range(i, min(i + 4, len(samples))), 0)))
            for i in range(0, len(samples), 4)
        )
    assert refs[0][1] == pytest.approx(total / samples.num_label_tokens, rel=1e-5)  # the untouched model's loss
    start, end = refs[0][1], refs[-1][1]
    assert f"forgetting: reference loss {start:.4f} -> {end:.4f}" in log, log[-2000:]


@pytest.mark.parametrize("example", sorted(p.name for p in (Path(__file__).parents[1] / "examples").glob("*.yaml")))
def test_every_example_config_is_valid(models: dict, toy_data: dict, example: str) -> None:
    from launcher.config_loading import load_config

    path = Path(__file__).parents[1] / "examples" / example
    classify = "task: sequence_classification" in path.read_text()
    data = toy_data["classification" if classify else "chat"]
    model = models["bert" if classify else "llama"]
    overrides = [f"model.path={model}"]
    if "- {path:" not in path.read_text():  # a multi-task example keeps its task list
        overrides += [f"data.train={data}", f"data.eval={data}"]
    if "reference:" in path.read_text():
        overrides.append(f"data.reference={toy_data['text']}")
    cfg = load_config(path, overrides)
    assert "# " in path.read_text().splitlines()[0] and "python" in path.read_text()  # opens with its command
    assert cfg.output_dir


def test_l2sp_with_weight_zero_is_the_plain_run(tmp_path: Path, models: dict, toy_data: dict) -> None:
    runs = {}
    for name, extra in (("plain", {}), ("zero", {"l2sp": {"weight": 0.0}})):
        cfg = base_config(
            tmp_path / name,
            models["llama"],
            toy_data["completion"],
            method={"kind": "full"},
            train={"max_steps": 3, "lr": 1e-2, **extra},
        )
        (tmp_path / name).mkdir()
        runs[name], _ = _train(tmp_path / name, cfg, 0)
    losses = {k: [r["loss"] for r in read_metrics(v) if "loss" in r] for k, v in runs.items()}
    assert losses["zero"] == losses["plain"]
    a, b = (load_file(runs[k] / "final" / "model.safetensors") for k in ("plain", "zero"))
    assert all(a[n].equal(b[n]) for n in a)


@pytest.mark.parametrize("strategy", [_strategy_param(s) for s in STRATEGIES])
def test_l2sp_holds_weights_near_the_pretrained_and_logs_its_penalty(
    tmp_path: Path, models: dict, toy_data: dict, strategy: str
) -> None:
    dist, nproc = STRATEGIES[strategy]
    base = load_file(models["llama"] / "model.safetensors")
    drift, penalties = {}, {}
    for name, weight in (("plain", 0.0), ("l2sp", 100.0)):
        (tmp_path / name).mkdir()
        cfg = base_config(
            tmp_path / name,
            models["llama"],
            toy_data["completion"],
            method={"kind": "full"},
            train={"max_steps": 6, "lr": 1e-2, "l2sp": {"weight": weight}},
            distributed=dist if weight else {},
        )
        run, _ = _train(tmp_path / name, cfg, nproc if weight else 0)
        final = load_file(run / "final" / "model.safetensors")
        drift[name] = sum(float((final[n].float() - base[n].float()).pow(2).sum()) for n in base)
        penalties[name] = [r.get("l2sp_penalty") for r in read_metrics(run) if "loss" in r]
    assert penalties["plain"] == [None] * 6  # off: no metric
    assert penalties["l2sp"][-1] == pytest.approx(100.0 / 2 * drift["l2sp"], rel=1e-4)  # recomputed from saved
    assert drift["l2sp"] < 0.25 * drift["plain"], drift


def test_l2sp_adds_weight_times_the_drift_to_the_gradient() -> None:
    """One SGD step under L2SP moves an anchored weight by lr·(g + weight·(θ − θ_pre)), the gradient of
    L + weight/2·‖θ − θ_pre‖², leaves an unanchored group plain SGD, and reports weight/2·‖θ − θ_pre‖² after it."""
    import torch

    from launcher.dist import DistEnv
    from launcher.l2sp import L2SP

    torch.manual_seed(0)
    anchored, free = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    pre = anchored.clone()
    for p in (anchored, free):
        p.requires_grad_(True)
    lr, weight = 0.1, 0.7
    opt = torch.optim.SGD([{"params": [anchored], "l2sp": True}, {"params": [free]}], lr=lr)
    l2sp = L2SP(opt, [(g, p) for g in opt.param_groups for p in g["params"]], weight, sharded=False)
    drift = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        anchored.add_(drift)  # as if earlier steps had moved it away from the pre-trained value
    before = anchored.detach().clone(), free.detach().clone()
    grads = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    anchored.grad, free.grad = grads[0].clone(), grads[1].clone()
    opt.step()
    expected = before[0] - lr * (grads[0] + weight * (before[0] - pre))
    assert torch.allclose(anchored.detach(), expected, atol=1e-12, rtol=0)
    assert torch.allclose(free.detach(), before[1] - lr * grads[1], atol=1e-12, rtol=0)
    penalty = weight / 2 * float((expected - pre).pow(2).sum())
    assert l2sp.penalty(DistEnv()) == pytest.approx(penalty, rel=1e-6)  # it measures in fp32


@pytest.mark.parametrize("strategy", [_strategy_param(s) for s in STRATEGIES])
@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_train_only_their_tokens_and_reload(
    tmp_path: Path, models: dict, toy_data: dict, kind: str, strategy: str
) -> None:
    from peft import PeftModel
    from test_train import _eval_loss_of
    from transformers import AutoModelForCausalLM

    settings = {"num_virtual_tokens": 4} | ({"init_text": "reverse these words"} if kind == "prompt_tuning" else {})
    cfg = base_config(
        tmp_path,
        models["llama"],
        toy_data["completion"],
        method={"kind": kind, kind: settings},
        data={"eval": str(toy_data["completion"])},
        train={"max_steps": 4, "lr": 3e-2},
        distributed=STRATEGIES[strategy][0],
    )
    run, log = _train(tmp_path, cfg, STRATEGIES[strategy][1])
    saved = load_file(run / "final" / "adapter_model.safetensors")
    assert saved and all("prompt" in n for n in saved), list(saved)  # only the virtual tokens were saved
    assert "trainable=" in log and f"trainable={sum(t.numel() for t in saved.values()):,}" in log
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama"]), run / "final")
    trained_eval = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r][-1]
    assert _eval_loss_of(reloaded, run / "final", toy_data["completion"]) == pytest.approx(trained_eval, rel=1e-4)
    base = AutoModelForCausalLM.from_pretrained(models["llama"])
    assert _eval_loss_of(base, run / "final", toy_data["completion"]) != pytest.approx(trained_eval, rel=1e-3)
    packed = ftl("validate", str(run / "config.yaml"), "data.packing=true")
    assert packed.returncode == 2 and "cannot follow a packed row" in packed.stderr


CLASSIFICATION_CASES = {  # technique: (method, train) on an encoder + classification head
    "freeze": ({"kind": "full", "freeze": {"embeddings": True, "bottom_layers": 1}}, {}),
    "layer_lr_decay": ({"kind": "full"}, {"layer_lr_decay": 0.5}),
    "stlr": ({"kind": "full"}, {"schedule": "stlr"}),
    "gradual_unfreeze": ({"kind": "full"}, {"gradual_unfreeze": {"every_steps": 2}}),
    "l2sp": ({"kind": "full"}, {"l2sp": {"weight": 10.0}}),
    "adapter": ({"kind": "adapter", "adapter": {"size": 8}}, {}),
    "prompt_tuning": ({"kind": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 4}}, {}),
}


@pytest.mark.parametrize("technique", list(CLASSIFICATION_CASES))
def test_each_technique_pairs_with_sequence_classification(
    tmp_path: Path, models: dict, toy_data: dict, technique: str
) -> None:
    """BERT-shaped encoder + classification head: the head trains from step 1 under every technique, and each
    technique's own effect holds (frozen = bitwise, group LRs = formula, penalty = recomputation, ...)."""
    method, train = CLASSIFICATION_CASES[technique]
    cfg = base_config(
        tmp_path,
        models["bert"],
        toy_data["classification"],
        model={"task": "sequence_classification"},
        method=method,
        data={"format": "classification"},
        train={"max_steps": 4, "lr": 1e-2, **train},
        checkpoint={"every_steps": 2, "keep_last": 10},
    )
    run, _ = _train(tmp_path, cfg, 0)
    rows = [r for r in read_metrics(run) if "loss" in r]
    base = load_file(models["bert"] / "model.safetensors")
    if technique == "adapter":
        saved = load_file(run / "final" / "adapter_model.safetensors")
        assert saved and all("_adapter." in n or n.startswith("classifier.") for n in saved), list(saved)
        assert not saved["classifier.weight"].equal(base["classifier.weight"])
        return
    if technique.endswith("_tuning"):
        saved = load_file(run / "final" / "adapter_model.safetensors")
        head = [n for n in saved if "classifier.weight" in n]
        assert "prompt_embeddings" in saved and head, list(saved)  # the virtual tokens and the new head only
        assert all(n == "prompt_embeddings" or "classifier" in n for n in saved), list(saved)
        assert not saved[head[0]].equal(base["classifier.weight"])
        return
    final = load_file(run / "final" / "model.safetensors")
    assert not final["classifier.weight"].equal(base["classifier.weight"])  # the head trained
    encoder = [n for n in base if not n.startswith("classifier.")]
    if technique == "freeze":
        frozen = [n for n in encoder if ".embeddings." in n or ".layer.0." in n]
        assert frozen and all(final[n].equal(base[n]) for n in frozen)
        assert all(not final[n].equal(base[n]) for n in encoder if ".layer.1." in n and "weight" in n)
    elif technique == "layer_lr_decay":
        for r in rows:
            g = r["lr_groups"]
            top = g["head/new"]  # block l of L=2 at decay^(L-1-l): block 1 at the top LR, block 0 half, emb a quarter
            assert (g["1"], g["0"], g["emb"]) == pytest.approx((top, 0.5 * top, 0.25 * top))
    elif technique == "stlr":
        t = TrainConfig(schedule="stlr", lr=1e-2, warmup_steps=0)
        assert [r["lr"] for r in rows] == pytest.approx([1e-2 * lr_factor(s, t, 4) for s in range(4)])
    elif technique == "gradual_unfreeze":
        from launcher.export import checkpoint_weights
        from launcher.methods import block_of

        first = checkpoint_weights(run / "checkpoints" / "step-00000002")
        below_head = [n for n in encoder if block_of(n, 2) < 2]  # the pooler sits above the blocks: the head's
        assert below_head and all(first[n].equal(base[n]) for n in below_head)  # steps 1-2: the head alone
        assert not first["classifier.weight"].equal(base["classifier.weight"])
        assert any(not final[n].equal(base[n]) for n in encoder if ".layer.1." in n)  # then the top block
    elif technique == "l2sp":
        drift = sum(float((final[n].float() - base[n].float()).pow(2).sum()) for n in encoder)
        assert rows[-1]["l2sp_penalty"] == pytest.approx(10.0 / 2 * drift, rel=1e-4)  # the head is not anchored


@pytest.mark.parametrize("strategy", [_strategy_param(s) for s in STRATEGIES])
def test_gradual_unfreezing_clips_by_the_norm_of_what_trains(
    tmp_path: Path, models: dict, toy_data: dict, strategy: str
) -> None:
    """Steps 1-2 train the head alone: the grad norm (which clipping divides by) must be the head's, equal to a
    run where everything below the head is frozen outright — not counting the scheduled-frozen gradients."""
    dist, nproc = STRATEGIES[strategy]
    norms = {}
    for name, method, train in (
        ("gradual", {"kind": "full"}, {"gradual_unfreeze": {"every_steps": 4}}),
        ("static", {"kind": "full", "freeze": {"embeddings": True, "bottom_layers": 2}}, {}),
    ):
        (tmp_path / name).mkdir()
        cfg = base_config(
            tmp_path / name,
            models["llama"],
            toy_data["completion"],
            method=method,
            train={"max_steps": 2, "lr": 1e-2, "max_grad_norm": 0.5, **train},
            distributed=dist,
        )
        run, _ = _train(tmp_path / name, cfg, nproc)
        norms[name] = [r["grad_norm"] for r in read_metrics(run) if "loss" in r]
    assert norms["gradual"] == pytest.approx(norms["static"], rel=1e-5)
