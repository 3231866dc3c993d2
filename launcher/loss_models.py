"""Which models get ftl's label-only loss (launcher/loss.py), and its chunk size. Torch-free, so that
`ftl estimate` can read them without importing torch."""

from __future__ import annotations

CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MiB in fp32)
# model_type values whose *ForCausalLM.forward returns lm_head(hidden_states) as its logits, unchanged
PLAIN_HEAD_MODELS = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt_neox", "phi3", "olmo", "olmo2"}
)
