"""Render rows into token ids and labels.

Each causal row becomes a list of (text, trainable) segments that are tokenised one by one and
concatenated: the prompt part is exactly what the model sees at inference before it generates, so
`mask_prompt` masks precisely the tokens the model is not asked to produce.
"""

from __future__ import annotations

from typing import Any

from launcher.config import ConfigError

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

Segment = tuple[str, bool]


def require_chat_template(tokenizer: Any, where: str) -> None:
    """format: chat needs a chat template; say how to get one."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            [
                f"data.format: 'chat' needs a tokenizer with a chat template, and the tokenizer from {where} has "
                "none. Fix: point model.tokenizer at a tokenizer that has one, add a 'chat_template' entry to its "
                "tokenizer_config.json, or use data.format: completion / alpaca instead."
            ]
        )


def chat_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The text a model sees before generating the next assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def alpaca_prompt(row: dict) -> str:
    """The Alpaca prompt for one row (with or without its 'input')."""
    if row.get("input"):
        return ALPACA_PROMPT_INPUT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_PROMPT.format(instruction=row["instruction"])


def _chat_segments(tokenizer: Any, messages: list[dict]) -> list[Segment]:
    segments: list[Segment] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = chat_prompt(tokenizer, messages[:i])
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    if len(whole) > len(done):
        segments.append((whole[len(done) :], False))
    return segments


def causal_segments(row: dict, fmt: str, tokenizer: Any) -> list[Segment]:
    """(text, trainable) pieces of one causal-LM row."""
    eos = tokenizer.eos_token or ""
    if fmt == "chat":
        return _chat_segments(tokenizer, row["messages"])
    if fmt == "alpaca":
        return [(alpaca_prompt(row), False), (str(row["output"]) + eos, True)]
    if fmt == "completion":
        return [(str(row["prompt"]), False), (str(row["completion"]) + eos, True)]
    return [(str(row["text"]) + eos, True)]


def leading_special_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before text on its own (e.g. BOS), found by comparison."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    if without and without[0] in with_special:
        return list(with_special[: with_special.index(without[0])])
    return []


def encode_causal(
    row: dict, fmt: str, tokenizer: Any, max_len: int, mask_prompt: bool, prefix_ids: list[int]
) -> dict[str, list[int]] | None:
    """input_ids + labels (IGNORE on masked tokens); None when nothing trainable survives truncation."""
    ids: list[int] = [] if fmt == "chat" else list(prefix_ids)
    labels: list[int] = [IGNORE] * len(ids)
    for text, trainable in causal_segments(row, fmt, tokenizer):
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (trainable or not mask_prompt) else [IGNORE] * len(piece)
    ids, labels = ids[:max_len], labels[:max_len]
    if sum(1 for x in labels[1:] if x != IGNORE) == 0:
        return None
    return {"input_ids": ids, "labels": labels}


def encode_classification(row: dict, tokenizer: Any, max_len: int) -> dict[str, Any]:
    """input_ids (with the encoder's special tokens) + an integer label."""
    ids = tokenizer(str(row["text"]), truncation=True, max_length=max_len)["input_ids"]
    return {"input_ids": ids, "label": int(row["label"])}
