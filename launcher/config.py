"""The one typed run config: sections with a docstring per field, YAML reading and dotted overrides.

Loading with every check (launcher/config_loading.py) collects all problems and raises one `ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from launcher.config_data import DataConfig, DataFormat, DataSource, ObjectiveConfig, TaskSource
from launcher.config_section import Section as _Section
from launcher.errors import ConfigError

__all__ = ["Config", "DataConfig", "DataFormat", "DataSource", "ObjectiveConfig", "TaskSource"]


class ModelConfig(_Section):
    path: str = Field("", description="Local Hugging Face model directory or hub id.")
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm", description="causal_lm: next-token loss; sequence_classification: encoder + new head."
    )
    num_labels: int = Field(
        2, ge=1, description="Classes, for sequence_classification (at least 2); 1: a reward model's one score."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the (non-quantised) weights are loaded in."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory.")
    tokenizer: str | None = Field(None, description="Tokenizer directory or id; defaults to model.path.")
    adapter: str | None = Field(
        None,
        description="Start from a trained LoRA/QLoRA adapter: a run's OUTPUT_DIR/final or an `ftl export` of it "
        "(a PEFT adapter directory, trained on model.path with the same method.lora r and alpha). Its weights "
        "are the starting point; a preference objective's reference is then that adapter's model, never the bare "
        "base. null: a new adapter.",
    )


class LoraSettings(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or a list of module-name suffixes.")


class QLoraSettings(_Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype 4-bit weights are dequantised to for matmuls."
    )


class AdapterSettings(_Section):
    size: int = Field(64, ge=1, description="Bottleneck width of each adapter.")
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only."
    )
    activation: Literal["gelu", "relu", "silu", "tanh"] = Field("gelu", description="Adapter nonlinearity.")
    init_scale: float = Field(1e-3, gt=0, description="Std of the down-projection init (up starts at zero).")
    train_layer_norms: bool = Field(False, description="Also train the model's norm layers.")


class PromptTuningSettings(_Section):
    num_virtual_tokens: int = Field(20, ge=1, description="Trained embeddings prepended to every input.")
    init_text: str | None = Field(None, description="Initialise them from this text's token embeddings (else random).")


class PrefixTuningSettings(_Section):
    num_virtual_tokens: int = Field(20, ge=1, description="Trained key/value prefixes per layer.")


class FreezeSettings(_Section):
    embeddings: bool = Field(False, description="Freeze the input embeddings (and an output layer tied to them).")
    bottom_layers: int = Field(0, ge=0, description="Freeze transformer blocks 0..N-1 (0 = the one nearest the input).")
    patterns: list[str] = Field(default_factory=list, description="Regexes over parameter names to freeze.")


class MethodConfig(_Section):
    kind: Literal["full", "lora", "qlora", "adapter", "prompt_tuning", "prefix_tuning"] = Field(
        "lora", description="What is trained (adapter: bottleneck adapters; prompt/prefix tuning: PEFT's)."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    qlora: QLoraSettings = Field(default_factory=QLoraSettings)
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    prompt_tuning: PromptTuningSettings = Field(default_factory=PromptTuningSettings)
    prefix_tuning: PrefixTuningSettings = Field(default_factory=PrefixTuningSettings)
    freeze: FreezeSettings = Field(
        default_factory=FreezeSettings, description="Frozen on top of the method (full, or LoRA's adapters)."
    )


class StlrSettings(_Section):
    cut_frac: float = Field(0.1, gt=0, lt=1, description="Share of the steps over which the LR rises.")
    ratio: float = Field(32, ge=1, description="How much smaller the lowest LR is than the peak.")


class GradualUnfreezeSettings(_Section):
    every_steps: int = Field(0, ge=0, description="Unfreeze one more block from the top every N steps (0: off).")
    every_epochs: float = Field(0, ge=0, description="The same, every N epochs (0: off).")


class L2spSettings(_Section):
    weight: float = Field(
        0.0,
        ge=0,
        description="L2-SP (Li et al. 2018): adds weight/2 · Σ‖θ − θ_pre‖² over the trained pre-trained weights.",
    )


class TrainConfig(_Section):
    seed: int = Field(0, ge=0, lt=2**32, description="Seeds the data order, init of new layers, dropout.")
    max_steps: int | None = Field(100, ge=1, description="Optimizer steps; wins over epochs when both set.")
    epochs: float | None = Field(None, gt=0, description="Epochs over train, used when max_steps is unset.")
    micro_batch_size: int = Field(4, ge=1, description="Rows per rank per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    schedule: Literal["cosine", "linear", "constant", "stlr"] = Field(
        "cosine", description="LR after warmup; stlr: ULMFiT's slanted triangular (its own warmup, train.stlr)."
    )
    stlr: StlrSettings = Field(default_factory=StlrSettings, description="Slanted triangular LR (schedule: stlr).")
    gradual_unfreeze: GradualUnfreezeSettings = Field(
        default_factory=GradualUnfreezeSettings,
        description="ULMFiT: first only the head (and adapters) train, then one more block from the top per "
        "period, the embeddings last. Scheduled-frozen weights get LR 0 and their gradients are dropped.",
    )
    l2sp: L2spSettings = Field(default_factory=L2spSettings, description="Pull toward the pre-trained weights.")
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Discriminative LRs: block l of L gets lr × decay^(L-1-l); embeddings decay^L; head lr "
        "(ULMFiT: 1/2.6 ≈ 0.385). 1.0: one LR.",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global grad norm; null: no clipping.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Compute precision.")
    fp16_initial_scale: float = Field(
        65536.0, gt=0, description="fp16: the loss scale to start from, a power of two (halved on overflow)."
    )
    fp16_growth_interval: int = Field(
        2000, ge=1, description="fp16: steps without overflow after which the loss scale doubles."
    )
    nonfinite: Literal["abort", "skip"] = Field(
        "abort",
        description="A NaN/inf loss or gradient: abort (exit 4, naming the step and its samples; nothing "
        "non-finite is saved) or skip (no update for that step, counted; not under DeepSpeed).",
    )
    max_skipped_steps: int = Field(10, ge=1, description="skip: abort after this many skipped steps in a row.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward (non-reentrant): far less memory, 25–40% more compute. "
        "auto: on only when the estimated peak without it (`ftl estimate`) exceeds half the device's memory.",
    )
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only at the end).")
    eval_batches: int | None = Field(None, ge=1, description="Cap on eval batches per evaluation.")


class DistributedConfig(_Section):
    strategy: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="auto: single for one process, else what the launcher asked, else ddp."
    )
    timeout_minutes: float = Field(30, gt=0, description="Collective timeout.")
    hang_timeout_minutes: float = Field(
        5,
        gt=0,
        description="No step completed in this long (and in 20 median step times; 3x during checkpoint writes "
        "and evaluation): every live rank logs its stack, names the stopped rank and exits 5 (hung).",
    )
    fsdp_wrap: list[str] | None = Field(
        None, description="FSDP: module classes sharded as one unit each; null: the model's _no_split_modules."
    )
    fsdp_reshard_after_forward: bool = Field(
        True, description="FSDP: free gathered block weights after forward, re-gather in backward (less memory)."
    )
    fsdp_cpu_offload: bool = Field(
        False, description="FSDP: keep sharded parameters, gradients and optimizer state in CPU memory."
    )
    zero_stage: Literal[1, 2, 3] | None = Field(
        None,
        description="DeepSpeed ZeRO stage (1: optimizer state, 2: + grads, 3: + params sharded); "
        "null: the deepspeed_config's stage, else 2.",
    )
    offload: Literal["none", "optimizer", "params", "all"] | None = Field(
        None, description="DeepSpeed CPU offload (params/all need ZeRO-3); null: as deepspeed_config says, else none."
    )
    deepspeed_config: str | None = Field(
        None,
        description="A DeepSpeed JSON to start from instead of ds_configs/ presets; 'auto' values are filled "
        "from this config, a value that contradicts it is an error.",
    )


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0, description="Save every N optimizer steps (0: off).")
    every_minutes: float | None = Field(None, gt=0, description="Also save when this much time has passed.")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints kept (the newest is never deleted).")
    keep_every: int | None = Field(None, ge=1, description="Also keep every checkpoint whose step is a multiple.")
    resume: str = Field("auto", description="auto: latest complete checkpoint, else fresh | never | PATH.")
    dir: str | None = Field(None, description="Checkpoint root; defaults to OUTPUT_DIR/checkpoints.")
    max_minutes: float | None = Field(
        None, gt=0, description="Wall-clock guard: save and stop (exit 3) once a run has trained this long."
    )
    run_lock: Literal["auto", "flock", "file"] = Field(
        "auto",
        description="How rank 0 holds OUTPUT_DIR: flock, or a lock file with a heartbeat (for NFS/Lustre mounts "
        "where flock is unsupported or only node-local); auto: the lock file on network file systems.",
    )
    allow_data_change: bool = Field(
        False,
        description="Resume even when the tokenised data differ from the checkpoint's (the samples of step k are "
        "then not those the run trained on); logged. False: such a resume exits 2 naming the split.",
    )
    stop_signals: list[str] = Field(
        ["SIGTERM", "SIGUSR1", "SIGINT"],
        description="Signals that mean: save a checkpoint at the next step, exit 3 (a second Ctrl-C aborts at once).",
    )


class WandbConfig(_Section):
    enabled: bool = Field(False, description="Log to Weights & Biases (rank 0).")
    project: str = Field("ftl", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    name: str | None = Field(None, description="Run name; defaults to the output_dir name.")
    mode: Literal["online", "offline", "disabled"] = Field("offline", description="W&B mode.")


class LoggingConfig(_Section):
    every_steps: int = Field(1, ge=1, description="Write a metrics row every N steps.")
    sample_ids: bool = Field(False, description="Add each step's global-batch sample ids to metrics rows (audit).")
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class Config(_Section):
    """A whole run. Defaults < YAML file < dotted CLI overrides."""

    output_dir: str = Field("runs/run", description="Run directory: config, metrics, checkpoints, final.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig | None = Field(
        None, description="The training objective; absent: the one model.task implies (docs/preference.md)."
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def to_yaml(self) -> str:
        """The resolved config as YAML (it holds no secrets: keys come from the environment)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Set `a.b.c=value` pairs into `raw` (value parsed as YAML). Returns problems found."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override '{item}': expected dotted.key=value")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return problems


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; problems name the file (and line for syntax errors)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config: file not found: {p}"])
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config: {p}: not UTF-8 text (byte {exc.start})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([f"config: {p}{where}: invalid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"config: {p}: the top level must be a mapping"])
    return raw


def pydantic_problems(err: ValidationError) -> list[str]:
    """pydantic's validation errors as `field.path: reason` lines."""
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-", "literal[")))
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "extra_forbidden":
            msg += " (check the spelling; `ftl validate` prints every known key's default)"
        out.append(f"{loc}: {msg}")
    return out
