"""The demo's task generator and exact-match scorer (pure Python; no model is loaded)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import demo_task as task


def _words(row: dict) -> list[str]:
    return row["messages"][1]["content"].split()


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    assert task.make_splits(50, 20, seed=3) == task.make_splits(50, 20, seed=3)
    assert task.make_splits(50, 20, seed=3) != task.make_splits(50, 20, seed=4)


def test_sizes_and_chat_shape() -> None:
    train, evals = task.make_splits(64, 16, seed=0)
    assert (len(train), len(evals)) == (64, 16)
    for row in train + evals:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == task.INSTRUCTION


def test_answers_are_the_words_reversed() -> None:
    train, evals = task.make_splits(200, 50, seed=1)
    for row in train + evals:
        words = _words(row)
        assert 4 <= len(words) <= 5
        assert len(set(words)) == len(words)
        assert set(words) <= set(task.WORDS)
        assert row["messages"][2]["content"] == " ".join(words[::-1])


def test_train_and_eval_are_disjoint_and_without_duplicates() -> None:
    train, evals = task.make_splits(400, 100, seed=0)
    train_seqs = [tuple(_words(r)) for r in train]
    eval_seqs = [tuple(_words(r)) for r in evals]
    assert len(set(train_seqs)) == len(train_seqs)
    assert len(set(eval_seqs)) == len(eval_seqs)
    assert not set(train_seqs) & set(eval_seqs)


def test_eval_rows_do_not_depend_on_train_size() -> None:
    """Asking for more training rows never changes the held-out set."""
    assert task.make_splits(10, 30, seed=2)[1] == task.make_splits(500, 30, seed=2)[1]


def test_answer_of_and_prompt_of() -> None:
    words = ("apple", "river", "green", "house")
    assert task.answer_of(words) == "house green river apple"
    system, user = task.prompt_of(words)
    assert system == {"role": "system", "content": task.INSTRUCTION}
    assert user == {"role": "user", "content": "apple river green house"}


@pytest.mark.parametrize(
    "prediction",
    [
        "house green river apple",
        "House green river apple.",
        "  house  green\nriver apple ",
        "house, green, river, apple",
    ],
)
def test_exact_match_accepts_formatting_variants(prediction: str) -> None:
    assert task.exact_match(prediction, "house green river apple")


@pytest.mark.parametrize(
    "prediction",
    [
        "apple river green house",
        "house green apple river",
        "house green river",
        "house green river apple tiger",
        "The reversed words are: house green river apple",
        "",
    ],
)
def test_exact_match_rejects_wrong_answers(prediction: str) -> None:
    assert not task.exact_match(prediction, "house green river apple")


def test_exact_match_rate() -> None:
    answers = ["a b", "c d", "e f", "g h"]
    assert task.exact_match_rate(["a b", "d c", "E F.", "x"], answers) == 0.5
    assert task.exact_match_rate([], []) == 0.0
    with pytest.raises(ValueError):
        task.exact_match_rate(["a b"], answers)


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    train, _ = task.make_splits(5, 1, seed=0)
    path = task.write_jsonl(tmp_path / "sub" / "train.jsonl", train)
    assert [json.loads(x) for x in path.read_text().splitlines()] == train


def test_minilm_data_is_deterministic_disjoint_and_labelled() -> None:
    import make_minilm_data as minilm

    train, evals = minilm.make_splits(300, 100, seed=0)
    assert (train, evals) == minilm.make_splits(300, 100, seed=0)
    texts = [r["text"] for r in train + evals]
    assert len(set(texts)) == len(texts)
    for row in train + evals:
        negated = " not " in row["text"]
        positive = any(f" {adj}" in row["text"] for adj in minilm.POSITIVE)
        assert row["label"] == int(positive != negated)
    assert 0.3 < sum(r["label"] for r in train) / len(train) < 0.7
