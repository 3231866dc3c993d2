#!/usr/bin/env bash
# The CUDA path on one GPU in <= 8 minutes: bf16 full FT, LoRA, QLoRA, FSDP2, ZeRO-3 on a ~0.55B Llama.
# Prints a table of tokens/s, peak memory and MFU. Needs torch (CUDA), transformers, peft, bitsandbytes,
# deepspeed, pydantic (the image lacks the last ones: run scripts/gpu_wheels.sh here first and carry .whl);
# installs ftl itself from this checkout without touching the image's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels from scripts/gpu_wheels.sh (the image lacks them)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1
timeout 480 python3 scripts/gpu_check.py "$@"
