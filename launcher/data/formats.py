"""Render rows into token ids and labels.

Each causal row becomes a list of (text, trainable) segments that are tokenised one by one and
concatenated: the prompt part is exactly what the model sees at inference before it generates, so
`mask_prompt` masks precisely the tokens the model is not asked to produce.
"""

from __future__ import annotations

from typing import Any

from launcher.errors import ConfigError

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


def require_tool_calls(rows: list[dict], tokenizer: Any, field: str) -> None:
    """Tool calls in assistant turns are kept only where the chat template renders them: never dropped silently."""
    if "tool_calls" in (tokenizer.chat_template or ""):
        return
    for i, row in enumerate(rows):
        if any(isinstance(m, dict) and m.get("tool_calls") for m in row.get("messages") or []):
            where = f"line {row['_line']}" if "_line" in row else f"row {i + 1}"
            raise ConfigError(
                [
                    f"{field}: {where} has an assistant turn with tool_calls, and the tokenizer's chat template "
                    "does not render tool calls (they would be lost). Use a model whose template supports tools, "
                    "or write the calls into the turn's content."
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


PREFIX_CHARS_PER_TOKEN = 8  # a first cut: most tokens are shorter; the agreement check below covers the rest


def _word_boundary(text: str, cut: int) -> int:
    """The start of the last whitespace run before `cut` (tokenizers split words there); when the first
    word runs past `cut`, the end of that word (a tokenizer may treat a long word as a whole, e.g. [UNK])."""
    j = max(text.rfind(c, 0, cut) for c in " \n\t\r")
    while j > 0 and text[j - 1].isspace():
        j -= 1
    if j > 0:
        return j
    ends = [k for k in (text.find(c, cut) for c in " \n\t\r") if k >= 0]
    return min(ends, default=len(text))


def _prefix(text: str, cut: int) -> str:
    return text if cut >= len(text) else text[: _word_boundary(text, cut)]


def text_prefix(tokenizer: Any, text: str, need: int, **kwargs: Any) -> tuple[str, list[int]]:
    """A prefix of `text` whose tokens start with the first `need` tokens of all of `text`, and its ids.

    A huge text is never tokenised whole: a prefix cut where a word ends is accepted once its first `need`
    ids agree with those of a prefix twice as long (else the prefix doubles), so a cut that changes the
    tokens before it is never trusted.
    """
    cut = max(need, 1) * PREFIX_CHARS_PER_TOKEN
    prefix = _prefix(text, cut)
    ids = tokenizer(prefix, **kwargs)["input_ids"]
    while len(prefix) < len(text):
        cut *= 2
        longer_prefix = _prefix(text, cut)
        longer = tokenizer(longer_prefix, **kwargs)["input_ids"]
        if len(ids) > need and ids[:need] == longer[:need]:
            break
        prefix, ids = longer_prefix, longer
    return prefix, ids


def tokenize_prefix(tokenizer: Any, text: str, need: int, **kwargs: Any) -> list[int]:
    """The first `need` token ids of `text` (see text_prefix)."""
    return text_prefix(tokenizer, text, need, **kwargs)[1][:need]


def encode_causal(
    row: dict, fmt: str, tokenizer: Any, max_len: int, mask_prompt: bool, prefix_ids: list[int]
) -> dict[str, list[int]] | None:
    """input_ids + labels (IGNORE on masked tokens); None when nothing trainable survives truncation."""
    start = [] if fmt == "chat" else prefix_ids  # a chat template writes its own leading tokens
    return encode_segments(causal_segments(row, fmt, tokenizer), tokenizer, max_len, mask_prompt, start)


def encode_segments(
    segments: list[Segment], tokenizer: Any, max_len: int, mask_prompt: bool, start_ids: list[int]
) -> dict[str, list[int]] | None:
    """`start_ids` then each (text, trainable) segment's tokens, cut at `max_len`; labels IGNORE on the masked
    ones. None when no label survives the cut."""
    ids: list[int] = list(start_ids)
    labels: list[int] = [IGNORE] * len(ids)
    for text, trainable in segments:
        if not text or len(ids) >= max_len:  # what comes after the cut is never seen: do not tokenise it
            continue
        piece = tokenize_prefix(tokenizer, text, max_len - len(ids), add_special_tokens=False)
        ids += piece
        labels += piece if (trainable or not mask_prompt) else [IGNORE] * len(piece)
    ids, labels = ids[:max_len], labels[:max_len]
    if sum(1 for x in labels[1:] if x != IGNORE) == 0:
        return None
    return {"input_ids": ids, "labels": labels}


def encode_classification(row: dict, tokenizer: Any, max_len: int) -> dict[str, Any]:
    """input_ids (with the encoder's special tokens) + an integer label."""
    text = str(row["text"])
    if len(text) > max_len * PREFIX_CHARS_PER_TOKEN:  # a huge text: tokenise only the part that survives the cut
        text = text_prefix(tokenizer, text, max_len, add_special_tokens=False)[0]
    ids = tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
    return {"input_ids": ids, "label": int(row["label"])}
