"""The demo's task: reverse the order of a few common words. Generated from a seed, scored by exact match.

The prompt states the answer format, yet small instruct models answer in chatty sentences or lists and often
get the order wrong, so the base model scores near zero, while a few dozen LoRA steps teach the skill. Train and
eval prompts never share a word sequence, so the held-out score measures the skill, not memorisation.
No model code here (unit-testable).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

WORDS = (
    "apple",
    "river",
    "green",
    "house",
    "stone",
    "cloud",
    "table",
    "window",
    "garden",
    "yellow",
    "bread",
    "silver",
    "ocean",
    "forest",
    "candle",
    "mountain",
    "paper",
    "orange",
    "tiger",
    "winter",
    "summer",
    "pencil",
    "bottle",
    "rabbit",
    "music",
    "letter",
    "dinner",
    "castle",
    "bridge",
    "flower",
    "planet",
    "rocket",
    "violin",
    "jacket",
    "mirror",
    "basket",
    "island",
    "pillow",
    "carpet",
    "thunder",
    "shadow",
    "meadow",
    "horse",
    "kitten",
    "spoon",
    "ladder",
    "button",
    "cotton",
    "copper",
    "lemon",
    "marble",
    "needle",
    "pepper",
    "saddle",
    "tunnel",
    "wagon",
)
# The task instruction is the system turn (it replaces SmolLM2's default system prompt, keeping rows short); the
# user turn holds only the words.
INSTRUCTION = "Reverse the word order. Reply with the words only, separated by spaces."
Row = dict[str, list[dict[str, str]]]


def make_words(rng: random.Random, lo: int = 4, hi: int = 5) -> tuple[str, ...]:
    """lo..hi distinct common words, drawn with `rng`."""
    return tuple(rng.sample(WORDS, rng.randint(lo, hi)))


def prompt_of(words: tuple[str, ...]) -> list[dict[str, str]]:
    """The conversation the model answers: the instruction (system turn) and the words (user turn)."""
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": " ".join(words)}]


def answer_of(words: tuple[str, ...]) -> str:
    """The correct assistant turn: the same words, last first."""
    return " ".join(reversed(words))


def chat_row(words: tuple[str, ...]) -> Row:
    """One example in ftl's chat format."""
    return {"messages": [*prompt_of(words), {"role": "assistant", "content": answer_of(words)}]}


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Deterministic train and eval rows with no word sequence in both (nor twice in one split)."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    splits: list[list[Row]] = []
    for n in (n_eval, n_train):
        rows: list[Row] = []
        while len(rows) < n:
            words = make_words(rng)
            if words in seen:
                continue
            seen.add(words)
            rows.append(chat_row(words))
        splits.append(rows)
    eval_rows, train_rows = splits
    return train_rows, eval_rows


def normalize(text: str) -> str:
    """Lower-case, commas to spaces, whitespace collapsed, surrounding punctuation and quotes dropped."""
    text = text.strip().lower().replace(",", " ")
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .!\"'`")


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction is the answer, up to case, whitespace and surrounding punctuation."""
    return normalize(prediction) == normalize(answer)


def exact_match_rate(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions (0..1) that exactly match their answers."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(exact_match(p, a) for p, a in zip(predictions, answers)) / len(answers)


def write_jsonl(path: Path, rows: list[Row]) -> Path:
    """Write rows as JSON lines (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
