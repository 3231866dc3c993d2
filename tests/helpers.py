"""Tiny real models, tokenizers and data for tests (no hub access; built from configs in seconds)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(40)] + list("abcdefghij") + [str(i) for i in range(10)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(out: Path, kind: str = "causal", chat_template: bool = True) -> Path:
    """A word-level tokenizer over a small vocabulary, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "causal":
        specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["reverse", ":", "sort", "copy"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "causal":
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            additional_special_tokens=specials[4:],
        )
        if chat_template:
            fast.chat_template = CHAT_TEMPLATE
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            mask_token="[MASK]",
        )
    fast.save_pretrained(out)
    return out


def build_model(out: Path, arch: str = "llama", vocab_size: int = 80, seed: int = 0, **shape: int) -> Path:
    """A random model of the given family (2 layers, hidden 32 unless `shape` overrides config fields) with its
    tokenizer, saved as an HF directory."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    small = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": vocab_size,
        "initializer_range": 0.2,  # wide enough logits that adapters alone can move the loss
        **shape,
    }
    llama_like = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}
    if arch in llama_like:
        config_cls, model_cls = llama_like[arch]
        kv = {"num_key_value_heads": 2, **small}
        cfg = config_cls(max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0, **kv)
        model = model_cls(cfg)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(max_position_embeddings=256, bos_token_id=2, eos_token_id=3, pad_token_id=0, **small)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(max_position_embeddings=128, pad_token_id=0, **small)
        model = tf.BertForSequenceClassification(cfg)
    else:
        raise ValueError(arch)
    model.save_pretrained(out)
    build_tokenizer(out, "encoder" if arch == "bert" else "causal")
    return out


def reverse_rows(n: int, seed: int = 0, fmt: str = "completion", lo: int = 3, hi: int = 6) -> list[dict]:
    """A learnable toy task: reverse a few words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS[:20]) for _ in range(rng.randint(lo, hi))]
        prompt, answer = "reverse : " + " ".join(words), " ".join(reversed(words))
        if fmt == "completion":
            rows.append({"prompt": prompt, "completion": " " + answer})
        elif fmt == "chat":
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        elif fmt == "alpaca":
            rows.append({"instruction": prompt, "input": "", "output": answer})
        elif fmt == "text":
            rows.append({"text": prompt + " " + answer})
        elif fmt == "classification":
            rows.append({"text": " ".join(words), "label": int(words[0] < words[-1])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def base_config(tmp: Path, model_dir: Path, data_path: Path, **sections: dict) -> dict[str, Any]:
    """A small fp32 config; `sections` update the named sections."""
    cfg: dict[str, Any] = {
        "output_dir": str(tmp / "run"),
        "model": {"path": str(model_dir)},
        "method": {"kind": "full", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"train": str(data_path), "format": "completion", "max_seq_len": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
        "logging": {"every_steps": 1},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


def ftl(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
