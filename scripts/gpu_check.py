"""The CUDA path end to end: bf16 full FT, LoRA, QLoRA (real bitsandbytes kernels), FSDP2 and ZeRO-3 (nccl)
on a ~0.55B Llama-architecture model built from a config. Prints tokens/s, peak memory and MFU per run.

    bash scripts/gpu_check.sh            # on a GPU machine (<= 8 minutes on one H100)
    python scripts/gpu_check.py --tiny   # the same script on CPU with a tiny model (smoke test)

MFU = 6 × trained-model parameters × tokens/s ÷ peak bf16 dense FLOP/s (989 TFLOP/s for H100/H200 SXM);
for LoRA/QLoRA the backward skips weight gradients of the frozen base, so 6N over-counts a little.
The estimate column is `ftl estimate` for the same config on this GPU; the measured peak is torch's max
allocated, which leaves out what the estimate adds for the CUDA context (0.75 GiB) and allocator slack (10%).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PEAK_FLOPS = 989e12
PEAK_MEM = re.compile(r"rank (\d+): peak memory (\d+) MiB")

RUNS = [  # name, method, strategy, extra distributed settings, nproc
    ("bf16 full FT", "full", "single", {}, 0),
    ("bf16 LoRA", "lora", "single", {}, 0),
    ("QLoRA nf4", "qlora", "single", {}, 0),
    ("FSDP2 full", "full", "fsdp", {}, 1),
    ("ZeRO-3 full", "full", "deepspeed", {"zero_stage": 3}, 1),
]
EXTRA_RUNS = [("fp16 ZeRO-2 full", "full", "deepspeed", {"zero_stage": 2}, 1, "fp16")]  # DeepSpeed's own scaler


def build(root: Path, tiny: bool) -> tuple[Path, int]:
    import torch
    import transformers as tf
    from helpers import build_tokenizer

    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        if tiny
        else dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12)
    )
    cfg = tf.LlamaConfig(
        vocab_size=32000,
        num_key_value_heads=size["num_attention_heads"],
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        max_position_embeddings=2048,
        **size,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "model")
    build_tokenizer(root / "model")
    return root / "model", sum(p.numel() for p in model.parameters())


def data(root: Path, seq_words: int) -> Path:
    from helpers import WORDS

    rows = [{"text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(seq_words))} for i in range(4096)]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_for(root: Path, model: Path, data_path: Path, spec: tuple, tiny: bool, **train: int) -> tuple[Path, Path]:
    """Write the run's YAML; returns (config path, output dir). A 6th spec element names the precision."""
    name, kind, strategy, dist, _nproc, *precision = spec
    out = root / name.replace(" ", "_")
    cfg = {
        "output_dir": str(out),
        "model": {"path": str(model), "dtype": "float32" if tiny else "bfloat16"},
        "method": {"kind": kind, "qlora": {"compute_dtype": "bfloat16"}},
        "data": {"train": str(data_path), "format": "text", "max_seq_len": 64 if tiny else 1024},
        "train": {
            "max_steps": 3 if tiny else 12,
            "micro_batch_size": 2 if tiny else 8,
            "lr": 1e-4,
            "precision": precision[0] if precision and not tiny else "bf16",
            "gradient_checkpointing": True,
            **train,
        },
        "distributed": {"strategy": strategy, **dist},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path, out


def run(root: Path, model: Path, data_path: Path, spec: tuple, tiny: bool, n_params: int) -> dict:
    name, nproc = spec[0], spec[4]
    path, out = config_for(root, model, data_path, spec, tiny)
    args = [sys.executable, "-m", "launcher", "train", str(path)] + (["--nproc", str(nproc)] if nproc else [])
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        return {"run": name, "error": res.stderr.strip().splitlines()[-1][:120]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = statistics.median([r["tokens_per_s"] for r in rows if "loss" in r][1:])
    peak = max(int(m.group(2)) for m in PEAK_MEM.finditer(res.stderr))
    return {
        "run": name,
        "tokens_per_s": tps,
        "peak_mib": peak,
        "estimate_mib": estimated_mib(path, nproc),
        "mfu": 6 * n_params * tps / PEAK_FLOPS,
        "loss": rows[-1].get("loss"),
    }


def estimated_mib(path: Path, nproc: int) -> float | None:
    """`ftl estimate`'s per-rank peak for this run on this GPU (its CUDA path: --gpu-mem from the device);
    with --tiny on CPU, its CPU estimate (against max RSS)."""
    import torch

    args = [sys.executable, "-m", "launcher", "estimate", str(path), "--nproc", str(max(nproc, 1))]
    if torch.cuda.is_available():
        args += ["--gpu-mem", f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}"]
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    found = re.search(r"\*\*peak\*\* \| \*\*([\d.]+)\*\*", res.stdout)
    return float(found.group(1)) * 1024 if found else None


def resume_check(root: Path, model: Path, data_path: Path, tiny: bool) -> str:
    """bf16 LoRA on the GPU: 8 steps straight vs SIGKILL after step 5 (parked in step 6's save) + resume."""
    from resume_utils import finish, kill_after, losses, start

    spec = ("resume LoRA", "lora", "single", {}, 0)
    cfg, out = config_for(root, model, data_path, spec, tiny, max_steps=8, micro_batch_size=2)
    straight, killed, every = out.with_name("straight"), out.with_name("killed"), "checkpoint.every_steps=2"
    code, log = finish(start(cfg, f"output_dir={straight}", every))
    kill_after(cfg, killed, every, step=5)
    code2, log2 = finish(start(cfg, f"output_dir={killed}", every))
    if code or code2:
        return f"resume check failed: {(log if code else log2).strip().splitlines()[-1][:160]}"
    a, b = losses(straight), losses(killed)
    diff = max(abs(a[s] - b[s]) / abs(a[s]) for s in range(5, 9))
    at4 = "at step 4" in log2
    return f"resume (LoRA, killed after step 5): resumed at step 4: {at4}; max rel loss diff steps 5-8: {diff:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny model, for a CPU smoke test of this script")
    ap.add_argument("--extra", action="store_true", help="also fp16 under ZeRO-2 and a kill/resume check (~3 min)")
    args = ap.parse_args()
    resumed = ""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, n_params = build(root, args.tiny)
        data_path = data(root, 40 if args.tiny else 1200)
        specs = RUNS + (EXTRA_RUNS if args.extra else [])
        results = [run(root, model, data_path, spec, args.tiny, n_params) for spec in specs]
        if args.extra:
            resumed = resume_check(root, model, data_path, args.tiny)
    print(f"\nmodel: Llama, {n_params / 1e6:.0f}M parameters")
    print("| run | tokens/s | peak memory (MiB) | ftl estimate (MiB) | error | MFU | last loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['run']} | failed: {r['error']} | | | | | |")
        else:
            est = r["estimate_mib"]
            error = f"{(est - r['peak_mib']) / r['peak_mib']:+.0%}" if est else "-"
            print(
                f"| {r['run']} | {r['tokens_per_s']:.0f} | {r['peak_mib']} | {est or 0:.0f} | {error} "
                f"| {r['mfu']:.1%} | {r['loss']:.3f} |"
            )
    if resumed:
        print(resumed)


if __name__ == "__main__":
    main()
