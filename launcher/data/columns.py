"""Rows as users have them, reshaped into the fields ftl's formats read, before any row is checked.

Three things happen here, per file: `data.columns` renames a dataset's columns to ftl's field names (and, inside
message lists, its role/content keys); `format: sharegpt` rows (`conversations` of `{from, value}`) become chat
rows with chat roles; `data.system_prompt` is put first in conversations that have no system turn. Every problem
names the file and line (or row), like the checks that follow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]

MESSAGE_KEYS = ("role", "content")  # the keys inside a message that data.columns may rename
FIELDS: dict[str, tuple[str, ...]] = {  # what each format reads: the names data.columns may map
    "chat": ("messages", *MESSAGE_KEYS),
    "sharegpt": ("messages", *MESSAGE_KEYS),
    "alpaca": ("instruction", "input", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected", *MESSAGE_KEYS),
}
OPTIONAL = ("input",)  # fields a row may lack (alpaca's input)
CONVERSATION_FORMATS = ("chat", "sharegpt")  # formats whose rows are conversations (data.system_prompt applies)
SHAREGPT_COLUMNS = {"messages": "conversations", "role": "from", "content": "value"}
SHAREGPT_ROLES = {  # ShareGPT's speaker names (FastChat, LLaMA-Factory, Vicuna sets) to chat roles
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
    "tool": "tool",
}


def rendered_as(fmt: str) -> str:
    """The format whose rendering a format's rows get once reshaped (ShareGPT rows are chat rows)."""
    return "chat" if fmt == "sharegpt" else fmt


@dataclass(frozen=True)
class RowShape:
    """How one source's rows are reshaped: its format, column names and default system prompt."""

    fmt: str
    columns: dict[str, str] = field(default_factory=dict)  # ftl field -> the dataset's column
    system_prompt: str | None = None

    def mapping(self) -> dict[str, str]:
        """The column mapping in force: ShareGPT's own names, overridden by data.columns."""
        return {**SHAREGPT_COLUMNS, **self.columns} if self.fmt == "sharegpt" else dict(self.columns)

    def reshape(self, rows: list[Row], where: list[str]) -> list[str]:
        """Reshape `rows` in place (`where[i]` names row i in messages); the problems found."""
        columns = self.mapping()
        top = {k: v for k, v in columns.items() if k not in MESSAGE_KEYS and k != v}
        keys = {k: columns.get(k, k) for k in MESSAGE_KEYS}
        problems: list[str] = []
        for row, place in zip(rows, where, strict=True):
            problems += _rename(row, top, place)
            for name in ("messages", "prompt", "chosen", "rejected"):
                if isinstance(row.get(name), list):
                    problems += self._messages(row, name, keys, place)
            if self.system_prompt is not None and isinstance(row.get("messages"), list):
                _add_system(row["messages"], self.system_prompt)
            if len(problems) >= 20:
                return [*problems, "... (stopping after 20 problems)"]
        return problems

    def _messages(self, row: Row, name: str, keys: dict[str, str], place: str) -> list[str]:
        """Rename each message's role/content keys (and ShareGPT's speakers) of the list `row[name]`."""
        out, problems = [], []
        for j, message in enumerate(row[name]):
            if not isinstance(message, dict):
                return []  # the format's own check names this
            m = dict(message)
            for ours, theirs in keys.items():
                if theirs != ours and theirs in m:
                    m[ours] = m.pop(theirs)
            if self.fmt == "sharegpt":
                problems += _sharegpt_turn(m, f"{place}: {name}[{j}]", keys["role"])
            out.append(m)
        row[name] = out
        return problems


def _rename(row: Row, top: dict[str, str], place: str) -> list[str]:
    """Move each mapped column to ftl's field name; a mapped column a row lacks is named with its setting."""
    problems = []
    for ours, theirs in top.items():
        if theirs in row:
            row[ours] = row.pop(theirs)
        elif row.get(ours) is None and ours not in OPTIONAL:
            problems.append(f"{place}: missing column '{theirs}' (data.columns.{ours})")
    return problems


def _sharegpt_turn(m: Row, where: str, role_key: str) -> list[str]:
    """A ShareGPT speaker as a chat role; a function_call turn whose value is a JSON call becomes a tool call."""
    speaker = m.get("role")
    if speaker not in SHAREGPT_ROLES:
        known = ", ".join(SHAREGPT_ROLES)
        return [f"{where}.{role_key}: {speaker!r} is not a ShareGPT speaker ({known})"]
    m["role"] = SHAREGPT_ROLES[speaker]
    if speaker == "function_call":
        call = _json_call(m.get("content"))
        if call is not None:
            m["tool_calls"] = [{"type": "function", "function": call}]
            m["content"] = ""
    return []


def _json_call(text: Any) -> dict | None:
    """{name, arguments} from a function_call turn's JSON text, else None (then it stays text)."""
    try:
        call = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
    if isinstance(call, dict) and isinstance(call.get("name"), str):
        return {"name": call["name"], "arguments": call.get("arguments", {})}
    return None


def _add_system(messages: list[Row], prompt: str) -> None:
    """Put `prompt` first unless the conversation already opens with a system turn."""
    if not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": prompt})


def column_problems(fmt: str, columns: dict[str, str], where: str) -> list[str]:
    """data.columns names a field `fmt` does not read, or maps two fields to one column."""
    problems = [
        f"{where}.{k}: format '{fmt}' reads no field '{k}' (it reads {', '.join(FIELDS[fmt])})"
        for k in columns
        if k not in FIELDS[fmt]
    ]
    taken = [v for k, v in columns.items() if k not in MESSAGE_KEYS]
    if len(set(taken)) < len(taken):
        problems.append(f"{where}: two fields map to the same column ({', '.join(sorted(taken))})")
    return problems
