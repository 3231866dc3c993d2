"""The config sections about data and the objective: where rows come from and how they are read
(data.*), and what the loss is (objective.*). Part of the one run config (launcher/config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from launcher.config_section import Section as _Section

DataFormat = Literal["chat", "sharegpt", "alpaca", "completion", "text", "classification", "preference"]
COLUMNS_HELP = (
    "Your dataset's column names for the fields its format reads, {field: column}: e.g. {messages: conversations, "
    "role: from, content: value} for chat, {prompt: question, completion: answer}, {text: body}, {label: "
    "sentiment} (role/content rename the keys inside messages)."
)


class DataSource(_Section):
    """One source of rows given as a mapping: a local file, glob or directory, or a hub dataset with its split,
    subset and revision."""

    path: str = Field(
        description="A data file (JSONL, JSON, CSV, Parquet, Arrow), a glob or directory of such shards, a "
        "`save_to_disk` directory, or a hub dataset id (read through the Hugging Face cache)."
    )
    split: str | None = Field(
        None, description="Hub dataset, dataset directory or saved DatasetDict: the split (data.train: 'train')."
    )
    subset: str | None = Field(None, description="Hub dataset: its subset (the config name).")
    revision: str | None = Field(None, description="Hub dataset: a branch, tag or commit.")


class TaskSource(DataSource):
    """One task of a multi-task run (an item of data.train)."""

    format: DataFormat | None = Field(None, description="How its rows are rendered; defaults to data.format.")
    columns: dict[str, str] | None = Field(None, description=COLUMNS_HELP + " Defaults to data.columns.")
    weight: float = Field(1.0, gt=0, description="Its share of every global batch (weights are normalised).")
    name: str | None = Field(None, description="Name in metrics (`loss/<name>`); defaults to the file's stem.")


SOURCE_HELP = (
    "A data file (JSONL, JSON, CSV, Parquet, Arrow), a glob or directory of shards, a `save_to_disk` directory or "
    "a hub dataset id; or {path, split, subset, revision} (docs/data.md)."
)


class DataConfig(_Section):
    train: str | DataSource | list[str] | list[TaskSource] = Field(
        "",
        description="Training data. "
        + SOURCE_HELP
        + " A list of them is read as one split; a list of {path, split, subset, revision, format, weight, "
        "name, columns} is a multi-task mix: each global batch draws the tasks by weight, and each task's loss "
        "is logged.",
    )
    eval: str | DataSource | list[str] | None = Field(None, description="Optional held-out data. " + SOURCE_HELP)
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Split this share of train off as eval.")
    format: DataFormat = Field(
        "chat",
        description="How rows are rendered into tokens. sharegpt: chat rows written as `conversations` of "
        "{from, value} (human/gpt/system/observation/function_call speakers).",
    )
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_HELP)
    system_prompt: str | None = Field(
        None, description="chat/sharegpt: a system turn put first in every conversation that opens without one."
    )
    max_seq_len: int = Field(512, ge=8, description="Rows are truncated (or packed) to this many tokens.")
    packing: bool = Field(
        False, description="Pack samples into full rows (no cross-sample attention); preference pairs whole."
    )
    padding_free: bool = Field(
        True,
        description="Unpacked causal rows (both sides of preference pairs too): concatenate each micro-batch into "
        "one row (per-sample positions, no cross-sample attention) whenever that computes less than padding it; "
        "same loss, no padding work.",
    )
    mask_prompt: bool = Field(True, description="Only answer tokens carry loss.")
    reference: str | DataSource | None = Field(
        None,
        description="Forgetting: rows unrelated to the task (text or chat), given as data.train is; their loss "
        "is measured before training and at every eval (`reference_loss`), and its rise reported at the end.",
    )
    reference_format: Literal["text", "chat"] = Field("text", description="Format of data.reference rows.")
    max_dropped_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Rows whose every answer token is cut by max_seq_len are dropped (and "
        "reported); more than this share of a split is an error.",
    )

    def tasks(self) -> list[TaskSource] | None:
        """The tasks of a multi-task run (data.train given as {path, ...} items), else None."""
        if isinstance(self.train, list) and self.train and isinstance(self.train[0], TaskSource):
            return list(self.train)
        return None

    def task_names(self) -> list[str] | None:
        """Metric names of the tasks: `name`, else the file's stem (a glob's: its folder's name)."""
        tasks = self.tasks()
        return None if tasks is None else [t.name or _stem(t.path) for t in tasks]


def _stem(path: str) -> str:
    """A short name for a data source: a file's stem, a glob's folder, a hub id's dataset name."""
    p = Path(path.rstrip("/"))
    return p.parent.name if any(c in p.name for c in "*?[") else p.stem


class ObjectiveConfig(_Section):
    kind: Literal["sft", "classification", "dpo", "simpo", "orpo", "reward"] | None = Field(
        None,
        description="What the loss is: sft (next-token loss, model.task causal_lm), classification (model.task "
        "sequence_classification); on preference pairs (data.format preference): dpo (against a reference), simpo "
        "or orpo (no reference), reward (a reward model: Bradley-Terry, model.task sequence_classification, "
        "num_labels 1). null: from model.task.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo: strength of the pull toward the reference (TRL's beta; IPO's tau). simpo: scale of the "
        "length-normalised reward (the SimPO paper uses 2 to 10). orpo: weight of the odds-ratio term (TRL's beta).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="dpo: sigmoid (the DPO paper's), ipo (squared, on per-token-averaged log-ratios, as TRL) "
        "or hinge (SLiC).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo sigmoid and simpo: the assumed share of flipped preferences (conservative DPO, as TRL's "
        "CPOTrainer); 0: plain DPO / SimPO.",
    )
    reference: Literal["auto", "adapter_disabled", "model", "precomputed"] = Field(
        "auto",
        description="dpo: what the policy is compared with. adapter_disabled: the same network with its "
        "adapter switched off (no second model in memory; LoRA, QLoRA, prompt/prefix tuning); model: a frozen "
        "copy of the starting model beside the policy (full fine-tuning; single or ddp); precomputed: the "
        "starting model's log-probs of every pair, computed once in a pass before training and cached beside "
        "the tokenised data (no reference model while training; reused by later runs and on resume); auto: "
        "adapter_disabled with an adapter, else model when `ftl estimate` says the copy fits, else precomputed.",
    )
    gamma: float = Field(
        0.5,
        ge=0,
        description="simpo: the target reward margin γ between chosen and rejected (TRL's simpo_gamma).",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="simpo: weight of the chosen completions' mean next-token loss added to the SimPO loss (TRL's "
        "cpo_alpha, whose CPOTrainer default 1.0 gives CPO-SimPO); 0: the SimPO paper's loss.",
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="reward: adds this weight times the mean squared sum of each pair's two rewards, pulling "
        "rewards toward mean zero (TRL's center_rewards_coefficient; 0.01 is the usual value); null: off.",
    )
