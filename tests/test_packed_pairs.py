"""Preference pairs without a prompt field (the implicit-prompt form) and pairs in padding-free and packed
batches: the same tokens as the explicit form, and the same DPO loss and gradients as the padded layout."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from helpers import WORDS, base_config, ftl, read_metrics, write_config, write_jsonl

from launcher import loss_models
from launcher.attention import NAME as SEGMENT_ATTENTION
from launcher.checkpoint import TrainState
from launcher.config import Config
from launcher.config_loading import load_config
from launcher.data.formats import IGNORE
from launcher.data.pair_batches import PairCollator
from launcher.data.preference import pack_pairs, pairs_in, tokenize_pairs
from launcher.data.rows import implicit_prompt
from launcher.data.tokenized import pack_groups
from launcher.dist import init_distributed
from launcher.model import build_model, load_tokenizer
from launcher.objectives import objective_for
from launcher.objectives.dpo import sequence_logps
from launcher.optim import optimizer_factory
from launcher.prepare import prepare_data
from launcher.run_start import make_collator
from launcher.trainer import optimizer_step, plan_run

LN2 = math.log(2)


def preference_rows(n: int, seed: int = 0, messages: bool = False) -> list[dict]:
    """Reverse a few words (chosen) rather than repeat them after a stray word (rejected): the two completions
    differ from their first word, so a shared prefix is exactly the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(3, 6))]
        prompt, chosen, rejected = "reverse : " + " ".join(words), " ".join(words[::-1]), "w30 " + " ".join(words)
        if messages:
            rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def implicit(row: dict) -> dict:
    """The same pair with its prompt folded into both completions (as preference data sets often ship)."""
    prompt = row["prompt"]
    if isinstance(prompt, list):
        turn = [{"role": "assistant", "content": row["chosen"]}], [{"role": "assistant", "content": row["rejected"]}]
        return {"chosen": prompt + turn[0], "rejected": prompt + turn[1]}
    return {"chosen": prompt + row["chosen"], "rejected": prompt + row["rejected"]}


def test_implicit_prompt_is_trls_shared_prefix() -> None:
    """Message lists and texts that part after a space split exactly as TRL's extract_prompt; a text that parts
    inside a word splits at that word's start (TRL reaches the same tokens by comparing token ids)."""
    from trl import extract_prompt

    user = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}]
    cases = [
        ([*user, {"role": "assistant", "content": "w4"}], [*user, {"role": "assistant", "content": "w5 w6"}]),
        ("sort : w3 w1 -> a b", "sort : w3 w1 -> c d e"),
        ("copy : w1\nb", "copy : w1\nc d"),
    ]
    for chosen, rejected in cases:
        theirs = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert implicit_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    assert implicit_prompt("sort : w12 w1", "sort : w13 w1") == ("sort :", " w12 w1", " w13 w1")
    assert implicit_prompt("w1 w2", "w1 w2 w3")[1] == ""  # one side a prefix of the other: refused (rows.py)


@pytest.mark.parametrize("messages", [False, True], ids=["text", "messages"])
def test_implicit_rows_tokenise_as_the_explicit_form(models: dict, messages: bool) -> None:
    """{chosen, rejected} rows give the tokens and labels of {prompt, chosen, rejected}: the shared prompt masked,
    labels on each completion (+ EOS, or the template's end of turn) only."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    rows = preference_rows(6, seed=4, messages=messages)
    explicit, folded = (tokenize_pairs(r, tokenizer, 64) for r in (rows, [implicit(r) for r in rows]))
    for a, b in ((explicit, folded), (explicit.rejected, folded.rejected)):
        assert all(torch.equal(torch.from_numpy(x), torch.from_numpy(y)) for x, y in zip(a.input_ids, b.input_ids))
        assert all(torch.equal(torch.from_numpy(x), torch.from_numpy(y)) for x, y in zip(a.labels, b.labels))
    for row, ids, labels in zip(rows, folded.input_ids, folded.labels, strict=True):
        assert tokenizer.decode(ids[labels != IGNORE]).split() == [*row["chosen"].split(), "<eos>"]


def test_implicit_text_rows_tokenise_as_trl(models: dict, tmp_path: Path) -> None:
    """TRL 1.16's DPOTrainer on the same implicit text rows (some parting inside a word) builds the same batch."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [implicit(r) for r in preference_rows(4, seed=3)] + [
        {"chosen": "sort : w3 w1 -> w13", "rejected": "sort : w3 w1 -> w12 w1"},
    ]
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    args = DPOConfig(str(tmp_path / "trl"), report_to=[], use_cpu=True, max_length=64)
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours = PairCollator(tokenizer.pad_token_id)(tokenize_pairs(rows, tokenizer, 64), range(len(rows)))
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["labels"] != IGNORE, theirs["completion_mask"].bool())


def _config(tmp_path: Path, model: Path, rows: list[dict], **data: object) -> Path:
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = base_config(
        tmp_path,
        model,
        path,
        method={"kind": "lora"},
        data={"format": "preference", **data},
        objective={"kind": "dpo", "beta": 0.5},
    )
    return write_config(tmp_path / "cfg.yaml", raw)


def _policy(cfg: Config, attention: str) -> torch.nn.Module:
    """ftl's LoRA model (label-only output layer, ftl's attention or SDPA), the adapter moved off zero so that
    policy and reference differ."""
    model = build_model(cfg, torch.device("cpu"))
    model.set_attn_implementation(attention)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def _layouts(samples, pad: int, segmented: bool) -> dict[str, tuple[dict[str, torch.Tensor], list[int]]]:
    """The same pairs padded, concatenated padding-free into one row, and packed into rows of whole pairs; each
    with the order its pairs come in (packing shuffles them)."""
    ids = list(range(len(samples)))
    packed = pack_pairs(samples, max_len=64, seed=0)
    assert 1 < len(packed) < len(samples) and pairs_in(packed) == len(samples)  # several pairs per packed row
    lengths = [len(a) + len(b) for a, b in zip(samples.input_ids, samples.rejected.input_ids, strict=True)]
    width = 32 if segmented else 10**6  # SDPA's dense mask: a wide model, where concatenation wins
    return {
        "padded": (PairCollator(pad)(samples, ids), ids),
        "padding_free": (PairCollator(pad, width, segmented)(samples, ids), ids),
        "packed": (PairCollator(pad)(packed, range(len(packed))), [i for g in pack_groups(lengths, 64, 0) for i in g]),
    }


@pytest.mark.parametrize("attention", ["sdpa", SEGMENT_ATTENTION])
def test_padded_padding_free_and_packed_pairs_give_one_loss_and_gradient(
    tmp_path: Path, models: dict, attention: str
) -> None:
    """Pairs of ragged lengths in three layouts: the same DPO loss, the same gradient, the same log-prob of every
    completion on the same side of the same pair (label-only sums in chunks that cross sequences)."""
    rows = preference_rows(10, seed=7)
    cfg = load_config(_config(tmp_path, models["llama"], rows))
    tokenizer = load_tokenizer(cfg)
    samples = tokenize_pairs(rows, tokenizer, 64)
    layouts = _layouts(samples, tokenizer.pad_token_id, attention == SEGMENT_ATTENTION)
    assert layouts["padding_free"][0]["input_ids"].shape == (1, sum(len(x) for x in samples.rows()))
    model, objective = _policy(cfg, attention), objective_for(cfg)
    chunk, loss_models.CHUNK_ELEMENTS = loss_models.CHUNK_ELEMENTS, 5 * model.config.vocab_size  # 5 positions
    results = {}
    try:
        for name, (batch, order) in layouts.items():
            model.zero_grad()
            result = objective.loss_sum(model, batch)
            result.loss.backward()
            with torch.no_grad():
                logps, lengths = sequence_logps(model, batch)
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results[name] = (
                result,
                _by_pair(logps, order),
                _by_pair(lengths, order),
                grads,
                objective.loss_units(batch),
            )
    finally:
        loss_models.CHUNK_ELEMENTS = chunk
    padded, *others = results.values()
    assert abs(padded[0].counts["rewards/margins"]) > 1e-2  # the policy really differs from its reference
    for result, logps, lengths, grads, units in others:
        assert units == padded[4] == len(rows)
        assert torch.allclose(result.loss, padded[0].loss, rtol=1e-5), (result.loss, padded[0].loss)
        for key, value in padded[0].counts.items():  # rewards: differences of fp32 sums of ~10 log-probs each
            assert result.counts[key] == pytest.approx(value, rel=1e-5, abs=2e-5), key
        assert torch.equal(lengths, padded[2]) and torch.allclose(logps, padded[1], rtol=1e-5)
        for gp, gf in zip(padded[3], grads, strict=True):
            assert (gp - gf).abs().max() <= 1e-5 * gp.abs().max()


def _by_pair(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """A batch's 2n per-sequence values as (pair id, side): row i holds pair i's (chosen, rejected)."""
    out = torch.empty(len(order), 2, dtype=values.dtype)
    out[order] = torch.stack(values.chunk(2), 1)
    return out


@pytest.mark.parametrize("layout", ["packed", "padding_free"])
def test_first_step_sigmoid_loss_is_ln2(tmp_path: Path, models: dict, layout: str) -> None:
    """At step 1 the policy is its reference: every pair's margin is 0 and the loss ln 2, not a multiple of it,
    whichever way the pairs are laid out (a known failure elsewhere: 6·ln 2 for padding-free pairs)."""
    data = {"packing": True, "max_seq_len": 96} if layout == "packed" else {}
    cfg = load_config(_config(tmp_path, models["llama"], preference_rows(32, seed=2), **data))
    tokenizer = load_tokenizer(cfg)
    run = plan_run(cfg, init_distributed(1), Path(cfg.output_dir), prepare_data(cfg, tokenizer))
    model = run.strategy.build_model()
    run.strategy.setup(model, optimizer_factory(cfg.train, model))
    run.collate = make_collator(run, tokenizer)
    batch = run.collate(run.data.train, run.sampler.micro_batches(0, 0)[0])
    if layout == "packed":
        assert "position_ids" in batch and int(batch["sequence_ids"].max()) + 1 > 2 * batch["input_ids"].shape[0]
    else:
        assert batch["input_ids"].shape[0] == 1 and int(batch["sequence_ids"].max()) + 1 == 8  # 4 pairs in one row
    row = optimizer_step(run, TrainState())
    assert abs(row["loss"] - LN2) < 1e-6, row["loss"]
    assert row["rewards/chosen"] == row["rewards/rejected"] == row["rewards/margins"] == 0.0


def test_ftl_train_with_packed_implicit_prompt_pairs(tmp_path: Path, models: dict) -> None:
    """`ftl train` on {chosen, rejected} message rows with data.packing: step 1 is ln 2, the loss falls, and the
    start line counts pairs (read and kept) and packed rows."""
    rows = [implicit(r) for r in preference_rows(64, seed=1, messages=True)]
    path = _config(tmp_path, models["llama"], rows, packing=True, max_seq_len=64)
    res = ftl("train", str(path), "train.max_steps=8", "train.lr=1e-2", "train.micro_batch_size=2")
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(steps) == 8 and abs(steps[0]["loss"] - LN2) < 1e-6
    assert max(r["loss"] for r in steps[-3:]) < LN2 - 0.05
    assert "data.train: 64 pairs read, 64 kept" in res.stderr
    assert "= 2 packed rows of whole pairs;" in res.stderr
