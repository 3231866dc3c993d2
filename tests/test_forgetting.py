"""Forgetting for sequence classifiers: `data.reference` scored through the checkpoint's own pre-trained LM
head on the fine-tuned body — an encoder's masked-LM head, a decoder's next-token head — under single, FSDP
and ZeRO-3; a frozen body forgets nothing; a checkpoint without an LM head is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import base_config, build_tokenizer, ftl, read_metrics, write_config
from safetensors import safe_open

from launcher.config import Config
from launcher.data import collate
from launcher.data.tokenized import tokenize_rows
from launcher.reference_head import load_reference_head

STRATEGIES = {
    "single": ({}, 0),
    "fsdp": ({"strategy": "fsdp"}, 2),
    "zero3": ({"strategy": "deepspeed", "zero_stage": 3}, 2),
}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT-shaped checkpoint saved with its masked-LM head, as pre-trained encoders ship."""
    import transformers as tf

    out = tmp_path_factory.mktemp("bert_mlm")
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    cfg = tf.BertConfig(max_position_embeddings=128, pad_token_id=0, vocab_size=80, initializer_range=0.2, **shape)
    tf.BertForMaskedLM(cfg).save_pretrained(out)
    build_tokenizer(out, "encoder")
    return out


def _config(tmp: Path, model: Path, toy_data: dict, strategy: str, **method) -> dict:
    return base_config(
        tmp,
        model,
        toy_data["classification"],
        model={"task": "sequence_classification"},
        method=method or {"kind": "full"},
        data={"format": "classification", "reference": str(toy_data["text"])},
        train={"max_steps": 4, "lr": 1e-2, "eval_every": 2},
        distributed=STRATEGIES[strategy][0],
    )


def _run(tmp: Path, cfg: dict, nproc: int = 0) -> tuple[int, str, list[tuple[int, float]]]:
    res = ftl("train", str(write_config(tmp / "cfg.yaml", cfg)), *(["--nproc", str(nproc)] if nproc else []))
    rows = read_metrics(Path(cfg["output_dir"])) if res.returncode == 0 else []
    return res.returncode, res.stderr, [(r["step"], r["reference_loss"]) for r in rows if "reference_loss" in r]


def _pretrained_lm_loss(cfg: dict, toy_data: dict) -> float:
    """The reference rows' loss under the untouched checkpoint's own LM model (its forward computes the loss).
    An encoder's input gets [MASK] put in here, at the tokens ftl scores, so ftl's own masking is checked too."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    conf = Config.model_validate(cfg)
    tok = AutoTokenizer.from_pretrained(conf.model.path)
    head = load_reference_head(conf, tok, torch.device("cpu"))  # only its fixed choice of masked tokens
    cls = AutoModelForCausalLM if head.causal else AutoModelForMaskedLM
    lm = cls.from_pretrained(conf.model.path).eval()
    rows = [json.loads(x) for x in toy_data["text"].read_text().splitlines()]
    samples = tokenize_rows(rows, "text", tok, conf.data.max_seq_len, mask_prompt=False)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(samples), 4):
            batch = collate(samples, range(i, min(i + 4, len(samples))), tok.pad_token_id)
            labels = head.prepare(batch)["labels"]  # only which tokens ftl scores; the masking is done here
            scored = labels != -100
            ids = batch["input_ids"] if head.causal else torch.where(scored, tok.mask_token_id, batch["input_ids"])
            n = int(scored[:, 1:].sum()) if head.causal else int(scored.sum())
            out = lm(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels)
            total, count = total + float(out.loss) * n, count + n
    return total / count


@pytest.mark.parametrize(
    "strategy", [pytest.param(s, marks=[pytest.mark.slow] if n else []) for s, (_, n) in STRATEGIES.items()]
)
def test_an_encoders_forgetting_is_its_masked_lm_loss(
    tmp_path: Path, encoder: Path, toy_data: dict, strategy: str
) -> None:
    cfg = _config(tmp_path, encoder, toy_data, strategy)
    code, log, refs = _run(tmp_path, cfg, STRATEGIES[strategy][1])
    assert code == 0, log[-3000:]
    assert [s for s, _ in refs] == [0, 2, 4]
    assert refs[0][1] == pytest.approx(_pretrained_lm_loss(cfg, toy_data), rel=1e-4)  # the pre-trained MLM's
    assert refs[-1][1] != pytest.approx(refs[0][1], rel=1e-3)  # the body moved, and the score with it
    start, end = refs[0][1], refs[-1][1]
    assert f"forgetting: reference loss {start:.4f} -> {end:.4f}" in log, log[-2000:]
    saved = safe_open(Path(cfg["output_dir"]) / "final" / "model.safetensors", "pt").keys()
    assert any(k.startswith("classifier.") for k in saved) and not any(k.startswith("cls.") for k in saved)


def test_a_frozen_body_forgets_nothing(tmp_path: Path, encoder: Path, toy_data: dict) -> None:
    """Only the classification head trains: the reference loss stays exactly the pre-trained one, so it
    measures the body (and the LM head itself never trains)."""
    freeze = {"embeddings": True, "bottom_layers": 2}
    code, log, refs = _run(tmp_path, _config(tmp_path, encoder, toy_data, "single", kind="full", freeze=freeze))
    assert code == 0, log[-3000:]
    assert len(refs) == 3 and len({v for _, v in refs}) == 1, refs


def test_a_decoder_classifiers_forgetting_is_its_next_token_loss(tmp_path: Path, models: dict, toy_data: dict) -> None:
    cfg = _config(tmp_path, models["llama"], toy_data, "single")
    code, log, refs = _run(tmp_path, cfg)
    assert code == 0, log[-3000:]
    assert refs[0][1] == pytest.approx(_pretrained_lm_loss(cfg, toy_data), rel=1e-5)
    assert refs[-1][1] != pytest.approx(refs[0][1], rel=1e-3)


def test_a_checkpoint_without_an_lm_head_is_refused(tmp_path: Path, models: dict, toy_data: dict) -> None:
    """models["bert"] was saved as a classifier: it has no pre-trained masked-LM head to score with."""
    code, log, _ = _run(tmp_path, _config(tmp_path, models["bert"], toy_data, "single"))
    assert code == 2 and "data.reference" in log and "no pre-trained masked-LM head" in log, log[-2000:]
    assert "step 1/" not in log
