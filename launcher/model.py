"""Load a Hugging Face model and tokenizer, attach the run's method (launcher/methods/), set up checkpointing."""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launcher.attention import NAME as SEGMENT_ATTENTION
from launcher.config import Config
from launcher.loss import install_label_only_head
from launcher.methods import freeze, method_for
from launcher.params import param_numel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_library_noise() -> None:
    """Silence library messages about paths ftl does not take, which every user of every method would see:
    bitsandbytes (imported by peft whether or not QLoRA runs) tries to fetch an optional CPU kernel through
    `kernels` at import and warns when it cannot, offline or not (its own fallback is used); peft still asks
    transformers' deprecated `is_gradient_checkpointing`."""
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


quiet_library_noise()


def load_tokenizer(cfg: Config) -> Any:
    """The tokenizer, with a pad token (EOS when it has none); right padding for training."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        cfg.model.tokenizer or cfg.model.path, trust_remote_code=cfg.model.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def quantization_config(cfg: Config, quant_storage: torch.dtype | None = None) -> Any:
    """bitsandbytes 4-bit settings for QLoRA. Sharded strategies pass a float quant_storage."""
    from transformers import BitsAndBytesConfig

    q = cfg.method.qlora
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )


def load_base_model(
    cfg: Config, quantize: bool, device: torch.device, quant_storage: torch.dtype | None = None
) -> nn.Module:
    """The pre-trained model (4-bit when quantize) for the configured task."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.model.dtype],
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.model.task == "sequence_classification":
        cls = AutoModelForSequenceClassification
        kwargs["num_labels"] = cfg.model.num_labels
    else:
        cls = AutoModelForCausalLM
        kwargs["attn_implementation"] = SEGMENT_ATTENTION
    if quantize:
        kwargs["quantization_config"] = quantization_config(cfg, quant_storage)
        kwargs["device_map"] = {"": device}
    model = cls.from_pretrained(cfg.model.path, **kwargs)
    if quantize and device.type == "cpu":
        own_unquantized_weights(model)
    set_pad_token_id(model, cfg)
    return model


def own_unquantized_weights(model: nn.Module) -> None:
    """Copy the weights 4-bit loading left as views of the checkpoint's memory map into the process's own
    memory. While any view lives the map does, and with it every page the quantiser read: the whole file
    stays resident (SmolLM2-135M on CPU: 0.5 GB of peak memory for a 0.1 GB embedding)."""
    import bitsandbytes as bnb

    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if id(p) not in seen and not isinstance(p, bnb.nn.Params4bit):
                    seen.add(id(p))
                    p.data = p.data.clone()
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None:
                    module._buffers[name] = b.clone()


def set_pad_token_id(model: nn.Module, cfg: Config) -> None:
    """A classification (or reward) head takes each row's score at its last token that is not the pad id, so its
    pad id is the one the collator pads with: the tokenizer's (as TRL's RewardTrainer sets it), whatever the
    checkpoint's config says. Other models without a pad id pad with EOS."""
    if cfg.model.task == "sequence_classification":
        model.config.pad_token_id = model.config.get_text_config().pad_token_id = load_tokenizer(cfg).pad_token_id
        return
    if getattr(model.config, "pad_token_id", None) is None and hasattr(model.config, "eos_token_id"):
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos


def build_model(cfg: Config, device: torch.device, quant_storage: torch.dtype | None = None) -> nn.Module:
    """Base model + method + gradient checkpointing, ready to train."""
    method = method_for(cfg)
    torch.manual_seed(cfg.train.seed)  # new heads and LoRA init are seeded
    model = load_base_model(cfg, quantize=method.quantizes_base, device=device, quant_storage=quant_storage)
    model, checkpointing_done = method.prepare_base(model, cfg)
    model = attach_method(model, cfg, checkpointing_done=checkpointing_done)
    return method.place(model, device)


def attach_method(model: nn.Module, cfg: Config, checkpointing_done: bool = False) -> nn.Module:
    """Gradient checkpointing, the method (adapters in fp32), `method.freeze` and no KV cache: the same on real
    or meta weights."""
    method = method_for(cfg)
    if cfg.train.gradient_checkpointing is True and not checkpointing_done:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method.needs_input_grads:  # a frozen embedding: checkpointed blocks still need a grad path
            model.enable_input_require_grads()
    model = method.attach(model, cfg)
    freeze(model, cfg)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    install_label_only_head(model)
    return model


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count the elements they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = param_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def build_meta_model(cfg: Config) -> nn.Module:
    """The architecture `launcher.model.build_model` makes (full or LoRA), on the meta device: no weights read.

    It must match rank 0's model name for name; `set_model_state_dict(strict)` checks that it does.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    m = cfg.model
    classify = m.task == "sequence_classification"
    extra: dict[str, Any] = {"num_labels": m.num_labels} if classify else {}
    hf_config = AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code, **extra)
    cls = AutoModelForSequenceClassification if classify else AutoModelForCausalLM
    kwargs: dict[str, Any] = {} if classify else {"attn_implementation": SEGMENT_ATTENTION}
    with torch.device("meta"):
        model = cls.from_config(hf_config, dtype=DTYPES[m.dtype], trust_remote_code=m.trust_remote_code, **kwargs)
    set_pad_token_id(model, cfg)
    return attach_method(model, cfg)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def weights_fingerprint(path: str) -> str:
    """A cheap fingerprint of the model's weights: its resolved directory and each weight file's name, size and
    modification time (a hub id: its local snapshot; the id itself when none is found)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # no local snapshot: the id is all there is to key by
            return hashlib.sha256(path.encode()).hexdigest()
    h = hashlib.sha256(str(root.resolve()).encode())
    for f in sorted(root.iterdir()):
        if f.name.endswith(WEIGHT_SUFFIXES):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()
