"""Data as users have it (issue 19, point 2): ShareGPT files, renamed columns and a default system prompt train on
exactly the tokens of the equivalent file in ftl's own field names; tool calls are kept or refused, never lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import base_config, ftl, write_config, write_jsonl
from transformers import AutoTokenizer

from launcher.config_loading import load_config
from launcher.model import load_tokenizer
from launcher.prepare import prepare_data

CHATS = [
    [("system", "w1 w2"), ("user", "reverse : w3 w4"), ("assistant", "w4 w3")],
    [("user", "copy : w5"), ("assistant", "w5"), ("user", "sort : w7 w6"), ("assistant", "w6 w7")],
]
SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}


def tokens(tmp: Path, model: Path, rows: list[dict], fmt: str, name: str, **data: object) -> list[np.ndarray]:
    """input_ids and labels of the train split of `rows` read as `fmt` (plus data settings)."""
    path = write_jsonl(tmp / f"{name}.jsonl", rows)
    cfg = base_config(tmp / name, model, path, data={"format": fmt, **data})
    cfg = load_config(write_config(tmp / f"{name}.yaml", cfg))
    train = prepare_data(cfg, load_tokenizer(cfg)).train
    return [*train.input_ids, *train.labels]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def chat_rows(chats: list[list[tuple[str, str]]]) -> list[dict]:
    return [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in chats]


def test_sharegpt_trains_on_the_tokens_of_the_same_chat(tmp_path: Path, models: dict) -> None:
    """`conversations` of {from, value} with human/gpt/system speakers = the chat rows, token for token (labels
    on the assistant turns only)."""
    sharegpt = [{"conversations": [{"from": SPEAKERS[r], "value": c} for r, c in chat]} for chat in CHATS]
    expected = tokens(tmp_path, models["llama"], chat_rows(CHATS), "chat", "chat")
    assert same(tokens(tmp_path, models["llama"], sharegpt, "sharegpt", "sharegpt"), expected)


@pytest.mark.parametrize(
    "fmt, theirs, columns",
    [
        ("chat", None, {"messages": "dialog", "role": "speaker", "content": "text"}),
        ("completion", {"prompt": "question", "completion": "answer"}, None),
        ("alpaca", {"instruction": "task", "output": "response"}, None),
        ("text", {"text": "body"}, None),
    ],
)
def test_columns_map_a_dataset_onto_the_fields_its_format_reads(
    tmp_path: Path, models: dict, toy_data: dict, fmt: str, theirs: dict | None, columns: dict | None
) -> None:
    """A file whose fields are named otherwise, with data.columns, gives the tokens of the file in ftl's names."""
    ours = [json.loads(line) for line in toy_data[fmt].read_text().splitlines()][:16]
    if fmt == "chat":
        renamed = [{"dialog": [{"speaker": m["role"], "text": m["content"]} for m in row["messages"]]} for row in ours]
    else:
        columns = theirs
        renamed = [{theirs.get(k, k): v for k, v in row.items()} for row in ours]
    assert renamed[0] != ours[0]
    expected = tokens(tmp_path, models["llama"], ours, fmt, "ours")
    assert same(tokens(tmp_path, models["llama"], renamed, fmt, "theirs", columns=columns), expected)


def test_system_prompt_goes_first_where_a_conversation_has_none(tmp_path: Path, models: dict) -> None:
    """data.system_prompt = writing that system turn into the rows that lack one; a row's own is kept."""
    given = CHATS  # the first has its own system turn (kept), the second has none
    explicit = [CHATS[0], [("system", "w9 w8"), *CHATS[1]]]
    expected = tokens(tmp_path, models["llama"], chat_rows(explicit), "chat", "explicit")
    got = tokens(tmp_path, models["llama"], chat_rows(given), "chat", "default", system_prompt="w9 w8")
    assert same(got, expected)
    assert not same(tokens(tmp_path, models["llama"], chat_rows(given), "chat", "none"), expected)


TOOL_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "{{ c['function']['name'] }} {% endfor %}{% else %}{{ m['content'] }} {% endif %}<eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
TOOL_CHAT = [
    {"from": "human", "value": "copy : w1"},
    {"from": "function_call", "value": json.dumps({"name": "w2", "arguments": {"x": 1}})},
    {"from": "observation", "value": "w3"},
    {"from": "gpt", "value": "w1"},
]


def test_a_tool_call_is_kept_where_the_template_renders_it_and_refused_where_not(tmp_path: Path, models: dict) -> None:
    """A ShareGPT function_call turn becomes an assistant tool call: its name is trained on (labels) with a
    template that renders tool calls; a template that cannot exits 2 naming the line, rather than dropping it."""
    tokenizer_dir = tmp_path / "tool_tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(tokenizer_dir)
    path = write_jsonl(tmp_path / "tools.jsonl", [{"conversations": TOOL_CHAT}] * 2)
    cfg = base_config(tmp_path / "kept", models["llama"], path, data={"format": "sharegpt"})
    cfg["model"]["tokenizer"] = str(tokenizer_dir)
    cfg = load_config(write_config(tmp_path / "kept.yaml", cfg))
    train = prepare_data(cfg, load_tokenizer(cfg)).train
    call_id = tokenizer.convert_tokens_to_ids("w2")
    assert call_id in train.labels[0].tolist()  # the call's name is an assistant token: it carries loss
    plain = base_config(tmp_path / "refused", models["llama"], path, data={"format": "sharegpt"})
    res = ftl("train", str(write_config(tmp_path / "refused.yaml", plain)), timeout=300)
    assert res.returncode == 2 and "line 1 has an assistant turn with tool_calls" in res.stderr, res.stderr[-2000:]
