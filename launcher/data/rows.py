"""Check each row has the fields its format needs, and load a split: read (launcher/data/readers.py), reshape
(launcher/data/columns.py), check.

Every problem names the file and (for JSONL) the line, or the dataset, split and row, so a user can jump
straight to it.
"""

from __future__ import annotations

from typing import Any

from launcher.data.columns import RowShape, rendered_as
from launcher.data.readers import Row, Source, origin, read_source
from launcher.errors import ConfigError

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
}


def _where(p: str, row: Row, index: int) -> str:
    return f"{p} line {row['_line']}" if "_line" in row else f"{p} row {index + 1}"


def check_rows(rows: list[Row], fmt: str, path: str, field: str, num_labels: int = 2) -> list[str]:
    """Problems with rows' fields for `fmt` (at most 20 are listed)."""
    problems = []
    need = REQUIRED_FIELDS[fmt]
    for i, row in enumerate(rows):
        missing = [k for k in need if row.get(k) in (None, "")]
        if fmt == "preference":
            problems += check_pair(row, f"{field}: {_where(path, row, i)}")
        elif missing:
            problems.append(
                f"{field}: {_where(path, row, i)}: missing field(s) {', '.join(missing)} "
                f"(format '{fmt}' needs {', '.join(need)})"
            )
        elif fmt == "chat":
            problems += _check_messages(row["messages"], f"{field}: {_where(path, row, i)}")
        else:
            problems += _check_texts(row, fmt, f"{field}: {_where(path, row, i)}")
            if fmt == "classification":
                problems += _check_label(row["label"], num_labels, f"{field}: {_where(path, row, i)}")
        if len(problems) >= 20:
            problems.append("... (stopping after 20 problems)")
            break
    return problems + (check_margins(rows, path, field) if fmt == "preference" and len(problems) < 20 else [])


TEXT_FIELDS = {"alpaca": ("instruction", "input", "output"), "completion": ("prompt", "completion")}
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _check_texts(row: Row, fmt: str, where: str) -> list[str]:
    """Text fields must be strings: a number or a NaN (an empty CSV/Parquet cell) would train as 'nan'."""
    names = TEXT_FIELDS.get(fmt, ("text",))
    bad = [k for k in names if row.get(k) is not None and not isinstance(row[k], str)]
    return [f"{where}: field '{k}' must be text, got {type(row[k]).__name__} {row[k]!r}" for k in bad]


def implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a pair given without a prompt, as TRL's extract_prompt splits it: the longest
    shared prefix of the two message lists (or texts) is the prompt, what follows is each completion. In text, a
    split inside a word moves back to the word's start (so each completion tokenises as whole words; TRL reaches
    the same tokens by comparing token ids), and a space just before the split goes to the completions (as TRL)."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and idx < n:
        while idx > 0 and not chosen[idx - 1].isspace():
            idx -= 1
        if idx > 0 and chosen[idx - 1] == " ":
            idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def with_prompt(row: Row) -> Row:
    """The row with its prompt: given, or the shared prefix of `chosen` and `rejected` (see implicit_prompt)."""
    if row.get("prompt") is not None:
        return row
    prompt, chosen, rejected = implicit_prompt(row["chosen"], row["rejected"])
    return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _check_implicit(row: Row, where: str) -> list[str]:
    """A pair without a prompt: two texts or two message lists that share a prefix and differ after it."""
    chosen, rejected = row["chosen"], row["rejected"]
    kinds = {type(chosen), type(rejected)}
    if kinds not in ({str}, {list}):
        return [f"{where}: without a 'prompt', 'chosen' and 'rejected' must both be text or both message lists"]
    if kinds == {list}:
        problems = _check_messages(chosen, where, "chosen", needs_assistant=False)
        problems += _check_messages(rejected, where, "rejected", needs_assistant=False)
        if problems:
            return problems
    if chosen == rejected:
        return [f"{where}: 'chosen' equals 'rejected': the pair prefers nothing"]
    prompt, chosen_tail, rejected_tail = implicit_prompt(chosen, rejected)
    if not prompt:
        return [
            f"{where}: no 'prompt', and 'chosen' and 'rejected' share no prefix to take as one (nothing to "
            "condition on): give a 'prompt' field, or start both with the same turns"
        ]
    empty = [side for side, tail in (("chosen", chosen_tail), ("rejected", rejected_tail)) if not _text(tail).strip()]
    if empty:
        return [f"{where}: '{empty[0]}' is empty after the prefix it shares with the other side (the implicit prompt)"]
    return []


def _text(value: Any) -> str:
    """A completion's text: itself, or its messages' contents."""
    if isinstance(value, str):
        return value
    return "".join(str(m.get("content", "")) for m in value if isinstance(m, dict))


def check_pair(row: Row, where: str) -> list[str]:
    """A preference row: a prompt (text or messages), and two different, non-empty completions (text, or assistant
    messages after a message prompt). Without a prompt, the prefix `chosen` and `rejected` share is the prompt."""
    if row.get("prompt") is None and row.get("chosen") is not None and row.get("rejected") is not None:
        problems = _check_implicit(row, where)
        if problems:
            return problems
        row = with_prompt(row)
    missing = [k for k in REQUIRED_FIELDS["preference"] if row.get(k) is None]
    if missing:
        return [
            f"{where}: missing field(s) {', '.join(missing)} (format 'preference' needs prompt, chosen, rejected; "
            "or chosen and rejected alone, sharing the prompt as their prefix)"
        ]
    prompt = row["prompt"]
    if isinstance(prompt, list):
        problems = _check_messages(prompt, where, "prompt", needs_assistant=False)
    else:
        problems = [] if isinstance(prompt, str) else [f"{where}: 'prompt' must be text or a list of messages"]
    texts = {}
    for side in ("chosen", "rejected"):
        value = row[side]
        if isinstance(value, list) and isinstance(prompt, list):
            found = _check_messages(value, where, side, needs_assistant=False)
            if not found and any(m["role"] != "assistant" for m in value):
                found = [f"{where}: '{side}' messages must all be assistant turns"]
            problems += found
            texts[side] = _text(value)
        elif isinstance(value, str):
            texts[side] = value
        else:
            need = "text or assistant messages" if isinstance(prompt, list) else "text (messages need a message prompt)"
            problems.append(f"{where}: '{side}' must be {need}, got {type(value).__name__}")
            continue
        if not texts[side].strip():
            problems.append(f"{where}: '{side}' is an empty completion")
    if not problems and row["chosen"] == row["rejected"]:
        problems.append(f"{where}: 'chosen' equals 'rejected': the pair prefers nothing")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, int | float) or margin != margin):
        problems.append(f"{where}: 'margin' must be a number (how far chosen should score above rejected)")
    return problems


def check_margins(rows: list[Row], path: str, field: str) -> list[str]:
    """A preference file gives every pair a `margin` or none (TRL reads it as a column)."""
    given = [row.get("margin") is not None for row in rows]
    if not any(given) or all(given):
        return []
    i = given.index(False)
    return [
        f"{field}: {_where(path, rows[i], i)}: no 'margin', while other rows of the file give one (give all or none)"
    ]


def _check_messages(messages: Any, where: str, key: str = "messages", needs_assistant: bool = True) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{where}: '{key}' must be a non-empty list of {{role, content}}"]
    for j, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and bool(m.get("tool_calls"))
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            return [f"{where}: {key}[{j}] needs 'role' and 'content'"]
        if m["role"] not in CHAT_ROLES:
            return [f"{where}: {key}[{j}].role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}"]
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            return [f"{where}: {key}[{j}].content must be text, got {type(m['content']).__name__}"]
        if "tool_calls" in m and not (calls and isinstance(m["tool_calls"], list)):
            return [f"{where}: {key}[{j}].tool_calls must be a non-empty list on an assistant turn"]
    if needs_assistant and not any(m["role"] == "assistant" for m in messages):
        return [f"{where}: no assistant message (nothing to learn from)"]
    return []


def _check_label(label: Any, num_labels: int, where: str) -> list[str]:
    try:
        value = int(label)
        exact = float(label) == value and not isinstance(label, bool)
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact:
        return [f"{where}: label {label!r} is not an integer class id"]
    if not 0 <= value < num_labels:
        return [f"{where}: label {value} outside [0, model.num_labels={num_labels})"]
    return []


def load_split(sources: Source | list[str], shape: RowShape, field: str, num_labels: int = 2) -> list[Row]:
    """Read, reshape (data.columns, ShareGPT, system prompt) and check every piece of one split; raise once with
    all problems."""
    rows: list[Row] = []
    problems: list[str] = []
    for source in sources if isinstance(sources, list) else [sources]:
        try:
            pieces = read_source(source, field)
        except ConfigError as err:
            problems += err.problems
            continue
        for piece in pieces:
            where = [f"{field}: {_where(piece.name, r, i)}" for i, r in enumerate(piece.rows)]
            reshaped = shape.reshape(piece.rows, where)
            problems += reshaped or check_rows(piece.rows, rendered_as(shape.fmt), piece.name, field, num_labels)
            rows += piece.rows
    if problems:
        raise ConfigError(problems)
    if not rows:
        raise ConfigError([f"{field}: no rows in {origin(sources, field)}"])
    return rows
