"""The bad-input corpus: every case exits 2 in seconds with a message naming the field, file or line, and no
traceback. Most go through `ftl validate` (no torch, no model; run in process for speed); the last few need
`ftl train` (real processes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import base_config, ftl, write_config

from launcher.cli import main

Setup = Callable[[Path], list[str]]  # writes what the case needs into a directory, returns CLI overrides


def _data(name: str, text: str | bytes) -> Setup:
    def setup(d: Path) -> list[str]:
        path = d / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return [f"data.train={path}"]

    return setup


def _rows(rows: list[object], fmt: str = "completion", name: str = "rows.jsonl") -> Setup:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    return lambda d: [*_data(name, text)(d), f"data.format={fmt}"]


def _parquet(rows: list[dict]) -> Setup:
    def setup(d: Path) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), d / "rows.parquet")
        return [f"data.train={d / 'rows.parquet'}"]

    return setup


def _yaml(text: str | bytes) -> Setup:
    """Replace the config file itself (its path is the first CLI argument)."""

    def setup(d: Path) -> list[str]:
        (d / "cfg.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
        return []

    return setup


def _set(*overrides: str) -> Setup:
    return lambda d: list(overrides)


def _model_dir_without_config(d: Path) -> list[str]:
    (d / "empty_model").mkdir()
    return [f"model.path={d / 'empty_model'}"]


def _file(name: str, key: str) -> Setup:
    def setup(d: Path) -> list[str]:
        (d / name).write_text("x")
        return [f"{key}={d / name}"]

    return setup


OK = {"prompt": "w1 w2", "completion": " w2 w1"}
CHAT = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w1"}]
VALIDATE_CASES: dict[str, tuple[Setup, str]] = {
    # the config file
    "yaml-syntax": (_yaml("model:\n  path: x\n train: [\n"), "cfg.yaml line"),
    "yaml-not-utf8": (_yaml(b"model:\n  path: \xff\xfe\n"), "not UTF-8"),
    "yaml-duplicate-key": (_yaml("train:\n  lr: 1\n  lr: 2\n"), "appears twice"),
    "yaml-top-level-list": (_yaml("- a\n- b\n"), "top level must be a mapping"),
    "override-without-equals": (_set("train.lr"), "expected dotted.key=value"),
    "unknown-key": (_set("train.lrr=1"), "train.lrr: unknown key"),
    "wrong-type": (_set("train.micro_batch_size=many"), "train.micro_batch_size"),
    "method-kind": (_set("method.kind=half"), "method.kind"),
    "lr-inf": (_set("train.lr=.inf"), "train.lr"),
    "lr-nan": (_set("train.lr=.nan"), "train.lr"),
    "lr-zero": (_set("train.lr=0"), "train.lr"),
    "lr-negative": (_set("train.lr=-1"), "train.lr"),
    "epochs-inf": (_set("train.max_steps=null", "train.epochs=.inf"), "train.epochs"),
    "epochs-zero": (_set("train.epochs=0"), "train.epochs"),
    "seed-negative": (_set("train.seed=-1"), "train.seed"),
    "max-grad-norm-negative": (_set("train.max_grad_norm=-1"), "train.max_grad_norm"),
    "max-steps-zero": (_set("train.max_steps=0"), "train.max_steps"),
    "no-steps-no-epochs": (_set("train.max_steps=null"), "train.max_steps / train.epochs"),
    "micro-batch-zero": (_set("train.micro_batch_size=0"), "train.micro_batch_size"),
    "grad-accum-zero": (_set("train.grad_accum=0"), "train.grad_accum"),
    "warmup-negative": (_set("train.warmup_steps=-1"), "train.warmup_steps"),
    "weight-decay-negative": (_set("train.weight_decay=-0.1"), "train.weight_decay"),
    "precision-unknown": (_set("train.precision=fp8"), "train.precision"),
    "fp16-scale-not-power-of-2": (_set("train.fp16_initial_scale=1000"), "train.fp16_initial_scale"),
    "fp16-deepspeed-on-cpu": (_set("train.precision=fp16", "distributed.strategy=deepspeed"), "train.precision"),
    "nonfinite-unknown": (_set("train.nonfinite=ignore"), "train.nonfinite"),
    "nonfinite-skip-deepspeed": (_set("train.nonfinite=skip", "distributed.strategy=deepspeed"), "train.nonfinite"),
    "stop-signal-sigkill": (_set("checkpoint.stop_signals=[SIGKILL]"), "cannot be caught"),
    "stop-signal-unknown": (_set("checkpoint.stop_signals=[SIGFOO]"), "unknown signal"),
    "keep-last-zero": (_set("checkpoint.keep_last=0"), "checkpoint.keep_last"),
    "every-steps-negative": (_set("checkpoint.every_steps=-1"), "checkpoint.every_steps"),
    "resume-missing": (_set("checkpoint.resume=/nonexistent/step-00000002"), "checkpoint.resume"),
    "max-minutes-zero": (_set("checkpoint.max_minutes=0"), "checkpoint.max_minutes"),
    "max-seq-len-tiny": (_set("data.max_seq_len=4"), "data.max_seq_len"),
    "eval-fraction-above-1": (_set("data.eval_fraction=1.5"), "data.eval_fraction"),
    "eval-and-eval-fraction": (lambda d: [f"data.eval={d / 'cfg.yaml'}", "data.eval_fraction=0.1"], "data.eval"),
    "format-unknown": (_set("data.format=xml"), "data.format"),
    "dropped-fraction-above-1": (_set("data.max_dropped_fraction=2"), "data.max_dropped_fraction"),
    "prefix-tuning-classification": (
        _set("method.kind=prefix_tuning", "data.format=classification", "model.task=sequence_classification"),
        "prefix_tuning feeds past key values",
    ),
    "packing-classification": (
        _set("data.packing=true", "data.format=classification", "model.task=sequence_classification"),
        "data.packing",
    ),
    "task-format-mismatch": (_set("model.task=sequence_classification"), "data.format"),
    "model-path-empty": (_set("model.path="), "model.path: required"),
    "model-path-missing": (_set("model.path=/nonexistent/model"), "model.path: no such directory"),
    "model-path-is-a-file": (_file("weights.bin", "model.path"), "is a file"),
    "model-path-without-config": (_model_dir_without_config, "has no config.json"),
    "model-path-hub-offline": (_set("model.path=someorg/somemodel"), "the hub is offline"),
    "tokenizer-missing": (_set("model.tokenizer=/nonexistent/tok"), "model.tokenizer"),
    "num-labels-zero": (_set("model.num_labels=0"), "model.num_labels"),
    "model-dtype-unknown": (_set("model.dtype=float8"), "model.dtype"),
    "lora-rank-zero": (_set("method.lora.r=0"), "method.lora.r"),
    "lora-dropout-one": (_set("method.lora.dropout=1.0"), "method.lora.dropout"),
    "lora-alpha-zero": (_set("method.lora.alpha=0"), "method.lora.alpha"),
    "qlora-settings-with-full": (_set("method.kind=full", "method.qlora.quant_type=fp4"), "method.qlora"),
    "strategy-unknown": (_set("distributed.strategy=tpu"), "distributed.strategy"),
    "zero-stage-4": (_set("distributed.zero_stage=4"), "distributed.zero_stage"),
    "offload-unknown": (_set("distributed.offload=disk"), "distributed.offload"),
    "logging-every-zero": (_set("logging.every_steps=0"), "logging.every_steps"),
    "wandb-mode-unknown": (_set("logging.wandb.mode=sometimes"), "logging.wandb.mode"),
    # the data
    "data-missing": (_set("data.train=/nonexistent/train.jsonl"), "data.train: file not found"),
    "data-empty-directory": (lambda d: (d / "empty").mkdir() or [f"data.train={d / 'empty'}"], "with no data files"),
    "data-directory-of-other-files": (lambda d: [f"data.train={d}"], "cfg.yaml: unsupported file type '.yaml'"),
    "data-glob-matches-nothing": (lambda d: [f"data.train={d}/shards/*.parquet"], "data.train: no file matches"),
    "data-split-on-a-file": (
        lambda d: [*_rows([OK])(d), f"data.train={{path: {d / 'rows.jsonl'}, split: train}}"],
        "`split` and `subset` apply to hub datasets and dataset directories",
    ),
    "data-revision-on-a-local-path": (
        lambda d: [f"data.train={{path: {d}, revision: main}}"],
        "is local: `revision` applies to hub datasets",
    ),
    "data-unsupported-type": (_data("rows.txt", "hello\n"), "unsupported file type"),
    "data-empty": (_data("rows.jsonl", "\n\n"), "no rows"),
    "jsonl-malformed-line": (_data("rows.jsonl", json.dumps(OK) + '\n{"prompt": \n'), "rows.jsonl line 2"),
    "jsonl-not-utf8": (_data("rows.jsonl", json.dumps(OK).encode() + b"\n\xff\xfe\n"), "line 2: not UTF-8"),
    "jsonl-holding-an-array": (_data("rows.jsonl", json.dumps([OK, OK], indent=1)), "holds a JSON array"),
    "jsonl-line-not-an-object": (_data("rows.jsonl", json.dumps(OK) + "\n[1, 2]\n"), "line 2: expected a JSON"),
    "json-not-a-list": (_data("rows.json", '{"a": 1}'), "expected a list of JSON objects"),
    "json-malformed": (_data("rows.json", '[{"a": 1},\n'), "rows.json line"),
    "csv-not-utf8": (_data("rows.csv", b"prompt,completion\n\xff,b\n"), "not UTF-8"),
    "parquet-corrupt": (_data("rows.parquet", b"PAR1 this is not parquet"), "not a readable Parquet"),
    "jsonl-nan-text": (_data("rows.jsonl", json.dumps(OK) + '\n{"prompt": NaN, "completion": " w1"}\n'), "'prompt'"),
    "parquet-null-text": (_parquet([OK, {"prompt": None, "completion": " w1"}]), "row 2: missing field(s) prompt"),
    "missing-field": (_rows([OK, {"prompt": "w1"}]), "line 2: missing field(s) completion"),
    "completion-is-a-number": (_rows([OK, {"prompt": "w1", "completion": 5}]), "'completion' must be text"),
    "alpaca-missing-output": (_rows([{"instruction": "w1"}], "alpaca"), "missing field(s) output"),
    "chat-no-assistant": (_rows([{"messages": CHAT[:1]}], "chat"), "no assistant message"),
    "chat-unknown-role": (_rows([{"messages": [{"role": "bot", "content": "w1"}, CHAT[1]]}], "chat"), "'bot'"),
    "chat-content-not-text": (_rows([{"messages": [CHAT[0], {"role": "assistant", "content": 3}]}], "chat"), "text"),
    "chat-messages-not-a-list": (_rows([{"messages": "w1"}], "chat"), "must be a non-empty list"),
    "chat-message-without-role": (_rows([{"messages": [{"content": "w1"}]}], "chat"), "needs 'role'"),
}
CLS = ["model.task=sequence_classification", "data.format=classification"]
VALIDATE_CASES |= {
    "label-fractional": (lambda d: [*_rows([{"text": "w1", "label": 1.7}])(d), *CLS], "label 1.7"),
    "label-out-of-range": (lambda d: [*_rows([{"text": "w1", "label": 5}])(d), *CLS], "outside [0"),
    "label-not-a-number": (lambda d: [*_rows([{"text": "w1", "label": "yes"}])(d), *CLS], "not an integer"),
}

QA = [{"question": "w1", "answer": " w2"}, {"question": "w3"}]
COLUMNS = ["data.columns.prompt=question", "data.columns.completion=answer"]
VALIDATE_CASES |= {
    "sharegpt-unknown-speaker": (
        _rows([{"conversations": [{"from": "narrator", "value": "w1"}]}], "sharegpt"),
        "line 1: messages[0].from: 'narrator' is not a ShareGPT speaker",
    ),
    "sharegpt-without-conversations": (_rows([{"messages": []}], "sharegpt"), "must be a non-empty list"),
    "columns-missing-column": (
        lambda d: [*_rows(QA)(d), *COLUMNS],
        "line 2: missing column 'answer' (data.columns.completion)",
    ),
    "columns-field-the-format-does-not-read": (
        _set("data.columns.messages=dialog"),
        "data.columns.messages: format 'completion' reads no field 'messages'",
    ),
    "columns-two-fields-one-column": (
        _set("data.columns.prompt=q", "data.columns.completion=q"),
        "two fields map to the same column",
    ),
    "system-prompt-without-conversations": (_set("data.system_prompt=w1"), "data.system_prompt: applies to"),
}

PAIR = {"prompt": "w1 w2", "chosen": " w2 w1", "rejected": " w1 w2"}
DPO = ["objective.kind=dpo", "method.kind=lora"]


def _pairs(rows: list[object], *overrides: str) -> Setup:
    return lambda d: [*_rows(rows, "preference")(d), *DPO, *overrides]


VALIDATE_CASES |= {
    "pair-missing-field": (_pairs([PAIR, {"prompt": "w1", "chosen": " w2"}]), "line 2: missing field(s) rejected"),
    "pair-chosen-equals-rejected": (_pairs([PAIR, {**PAIR, "rejected": " w2 w1"}]), "line 2: 'chosen' equals"),
    "pair-empty-completion": (_pairs([{**PAIR, "chosen": " "}, PAIR]), "line 1: 'chosen' is an empty completion"),
    "pair-messages-after-text-prompt": (
        _pairs([{**PAIR, "rejected": [{"role": "assistant", "content": "w1"}]}]),
        "line 1: 'rejected' must be text (messages need a message prompt)",
    ),
    "pair-completion-not-assistant": (
        _pairs([{"prompt": CHAT[:1], "chosen": [CHAT[0]], "rejected": " w1"}]),
        "line 1: 'chosen' messages must all be assistant turns",
    ),
    "pair-implicit-no-shared-prefix": (
        _pairs([PAIR, {"chosen": "w1 w2", "rejected": "w3 w2"}]),
        "line 2: no 'prompt', and 'chosen' and 'rejected' share no prefix",
    ),
    "pair-implicit-identical": (_pairs([{"chosen": CHAT, "rejected": CHAT}]), "line 1: 'chosen' equals 'rejected'"),
    "pair-implicit-empty-after-prefix": (
        _pairs([{"chosen": CHAT, "rejected": [*CHAT, CHAT[1]]}]),
        "line 1: 'chosen' is empty after the prefix it shares with the other side",
    ),
    "pair-implicit-text-and-messages": (
        _pairs([{"chosen": CHAT, "rejected": "w1"}]),
        "line 1: without a 'prompt', 'chosen' and 'rejected' must both be text or both message lists",
    ),
    "pair-rows-without-dpo": (_rows([PAIR], "preference"), "preference rows train objective.kind: dpo"),
    "dpo-on-completion-rows": (_set(*DPO), "'completion' does not fit objective.kind='dpo'"),
    "dpo-full-adapter-disabled": (
        _pairs([PAIR], "method.kind=full", "objective.reference=adapter_disabled"),
        "objective.reference: adapter_disabled needs a method that switches its adapter off",
    ),
    "dpo-lora-model-copy": (_pairs([PAIR], "objective.reference=model"), "use adapter_disabled (or auto)"),
    "dpo-model-copy-fsdp": (
        _pairs([PAIR], "method.kind=full", "objective.reference=model", "distributed.strategy=fsdp"),
        "objective.reference: model holds an unsharded frozen copy, which runs under single or ddp, not "
        "distributed.strategy fsdp; use objective.reference: precomputed",
    ),
    "dpo-classification-model": (_pairs([PAIR], "model.task=sequence_classification"), "objective.kind: "),
    "dpo-loss-type-unknown": (_pairs([PAIR], "objective.loss_type=kto"), "objective.loss_type"),
    "dpo-beta-zero": (_pairs([PAIR], "objective.beta=0"), "objective.beta"),
    "dpo-gamma": (_pairs([PAIR], "objective.gamma=1.0"), "objective.gamma: 1.0 is not read by objective.kind='dpo'"),
    "simpo-loss-type": (
        _pairs([PAIR], "objective.kind=simpo", "objective.loss_type=ipo"),
        "objective.loss_type: 'ipo' is not read by objective.kind='simpo' (it applies to dpo;",
    ),
    "simpo-reference": (
        _pairs([PAIR], "objective.kind=simpo", "objective.reference=adapter_disabled"),
        "objective.reference: 'adapter_disabled' is not read by objective.kind='simpo'",
    ),
    "orpo-label-smoothing": (
        _pairs([PAIR], "objective.kind=orpo", "objective.label_smoothing=0.1"),
        "objective.label_smoothing: 0.1 is not read by objective.kind='orpo' (it applies to dpo, simpo;",
    ),
    "orpo-sft-weight": (
        _pairs([PAIR], "objective.kind=orpo", "objective.sft_weight=1"),
        "objective.sft_weight: 1.0 is not read by objective.kind='orpo'",
    ),
    "sft-beta": (_set("objective.kind=sft", "objective.beta=0.5"), "objective.beta: 0.5 is not read by"),
    "simpo-gamma-negative": (_pairs([PAIR], "objective.kind=simpo", "objective.gamma=-1"), "objective.gamma"),
    "dpo-precomputed-packing": (
        _pairs([PAIR], "method.kind=full", "objective.reference=precomputed", "data.packing=true"),
        "data.packing: precomputed reference log-probs are stored per pair",
    ),
    "dpo-reward-setting": (
        _pairs([PAIR], "objective.center_rewards_coefficient=0.01"),
        "objective.center_rewards_coefficient: 0.01 is not read by objective.kind='dpo'",
    ),
}
REWARD = ["objective.kind=reward", "model.task=sequence_classification", "model.num_labels=1"]


def _reward(rows: list[object], *overrides: str) -> Setup:
    return lambda d: [*_rows(rows, "preference")(d), *REWARD, *overrides]


VALIDATE_CASES |= {
    "classification-num-labels-one": (
        lambda d: [*_rows([{"text": "w1", "label": 0}])(d), *CLS, "model.num_labels=1"],
        "model.num_labels: model.task='sequence_classification' needs at least 2 classes (got 1); one output is a "
        "reward model's score: objective.kind: reward",
    ),
    "reward-num-labels-two": (
        _reward([PAIR], "model.num_labels=2"),
        "model.num_labels: objective.kind='reward' scores each completion with 1 output; set model.num_labels: 1",
    ),
    "reward-causal-lm-model": (
        _reward([PAIR], "model.task=causal_lm"),
        "objective.kind: objective.kind='reward' trains a sequence_classification model, not model.task=causal_lm",
    ),
    "reward-on-completion-rows": (
        lambda d: [*_rows([OK])(d), *REWARD],
        "data.format: 'completion' does not fit objective.kind='reward': its objective reads preference rows",
    ),
    "reward-on-classification-rows": (
        lambda d: [*_rows([{"text": "w1", "label": 0}], "classification")(d), *REWARD],
        "data.format: 'classification' does not fit objective.kind='reward'",
    ),
    "reward-dpo-setting": (
        _reward([PAIR], "objective.beta=0.5"),
        "objective.beta: 0.5 is not read by objective.kind='reward'",
    ),
    "sft-dpo-setting": (
        _set("objective.kind=sft", "objective.loss_type=ipo"),
        "objective.loss_type: 'ipo' is not read by",
    ),
    "pair-rows-on-a-classifier": (
        lambda d: [*_rows([PAIR], "preference")(d), "model.task=sequence_classification"],
        "preference rows train objective.kind: dpo or simpo or orpo or reward",
    ),
    "reward-center-negative": (_reward([PAIR], "objective.center_rewards_coefficient=-1"), "center_rewards"),
    "reward-packing": (_reward([PAIR], "data.packing=true"), "data.packing: the objective of objective.kind='reward'"),
    "reward-fsdp": (_reward([PAIR], "distributed.strategy=fsdp"), "runs under single or ddp for now"),
    "reward-mask-prompt-off": (_reward([PAIR], "data.mask_prompt=false"), "data.mask_prompt: reward"),
    "reward-margin-not-a-number": (_reward([PAIR, {**PAIR, "margin": "big"}]), "line 2: 'margin' must be a number"),
    "reward-margin-on-some-rows": (
        _reward([{**PAIR, "margin": 1.0}, PAIR]),
        "line 2: no 'margin', while other rows of the file give one",
    ),
    "dpo-margin-column": (
        _pairs([{**PAIR, "margin": 1.0}]),
        "data.train: the rows give a per-pair 'margin', which objective.kind='dpo' does not read (objective.kind "
        "reward does)",
    ),
}


@pytest.fixture
def cfg_dir(tmp_path: Path, models: dict, toy_data: dict) -> Path:
    write_config(tmp_path / "cfg.yaml", base_config(tmp_path, models["llama"], toy_data["completion"]))
    return tmp_path


def _assert_clean_exit_2(res, expected: str) -> None:
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-2000:]
    assert expected in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("case", sorted(VALIDATE_CASES))
def test_validate_refuses(cfg_dir: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In process (the CLI's own `main`, as `ftl validate` runs it): an uncaught exception fails the test."""
    setup, expected = VALIDATE_CASES[case]
    overrides = setup(cfg_dir)
    code = main(["validate", str(cfg_dir / "cfg.yaml"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err[-2000:]
    assert err.startswith("ftl: invalid input:")


def test_negative_nproc_is_refused(cfg_dir: Path) -> None:
    _assert_clean_exit_2(ftl("train", "--nproc", "-3", str(cfg_dir / "cfg.yaml"), timeout=60), "--nproc")


TRAIN_CASES: dict[str, tuple[Setup, str]] = {
    "output-dir-is-a-file": (_file("out", "output_dir"), "output_dir:"),
    "lora-target-module-missing": (
        _set("method.kind=lora", "method.lora.target_modules=[no_such_proj]"),
        "target_modules",
    ),
    "answers-truncated-away": (
        _rows([{"prompt": " ".join(["w1"] * 60), "completion": " w2"}, OK, OK]),
        "lost every answer token",
    ),
    "pairs-truncated-away": (
        _pairs([{**PAIR, "prompt": " ".join(["w1"] * 60)}, PAIR, PAIR]),
        "data.train: 1 of 3 pairs (33%) lost a completion to truncation at data.max_seq_len=32",
    ),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses(cfg_dir: Path, case: str) -> None:
    setup, expected = TRAIN_CASES[case]
    res = ftl("train", str(cfg_dir / "cfg.yaml"), *setup(cfg_dir), "data.max_seq_len=32", timeout=120)
    _assert_clean_exit_2(res, expected)
