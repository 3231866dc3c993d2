"""DeepSpeed ZeRO-1/2/3 (optionally CPU-offloaded) behind ftl's strategy interface.

ftl keeps the loop: it builds the optimizer (DeepSpeed wraps and shards it), sets the LR on it every step,
normalises the loss by the global label-token count, and accumulates micro-batches. DeepSpeed is driven in
its own managed-accumulation semantics with gradient_accumulation_steps = train.grad_accum: `backward`
un-does DeepSpeed's loss scalings (÷ accumulation steps in engine.backward, ÷ ranks in its gradient
averaging) and calls engine.step() after every micro-batch but the last, which the loop's `step` then
takes, so the applied gradient is exactly the single-process one. Clipping is DeepSpeed's
(gradient_clipping = train.max_grad_norm).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launcher.config import Config
from launcher.dist import DistEnv, backend_for
from launcher.methods import method_for, trainable_parameters
from launcher.metrics import log
from launcher.model import DTYPES, build_model
from launcher.optim import zero_inactive_gradients_in_backward
from launcher.strategies.base import (
    OptimizerFactory,
    Strategy,
    param_group_tensors,
    precision_autocast,
    quantized_linears,
)
from launcher.strategies.ds_config import build_ds_config, check_deepspeed_config, stage_and_offload
from launcher.world import free_port

CKPT_TAG = "state"
CKPT_META = "ftl_deepspeed.json"
SHARDING_FILE = "sharding.json"


def quiet_deepspeed_collective_warnings() -> None:
    """Silence torch's deprecation notice for the collectives DeepSpeed calls on every step.

    Something in the step re-arms Python's once-per-location warning registry, so each rank printed it
    ~9 times per ZeRO-3 step: megabytes of log in a long run, and nothing a user can act on."""
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        pattern = rf"`torch\.distributed\.{name}` is deprecated"
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


def init_deepspeed_dist(env: DistEnv, timeout_minutes: float) -> None:
    """Join (or, for a lone process, create) the process group DeepSpeed needs: gloo on CPU, nccl on CUDA.

    When ftl's launcher/dist.py already started the group, DeepSpeed wraps it."""
    import deepspeed

    quiet_deepspeed_collective_warnings()
    if not dist.is_initialized():
        defaults = {"RANK": env.rank, "WORLD_SIZE": env.world_size, "LOCAL_RANK": env.local_rank}
        for key, value in defaults.items():
            os.environ.setdefault(key, str(value))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    deepspeed.init_distributed(
        dist_backend=backend_for(env.device),
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        verbose=False,
    )


def quant_storage_dtype(cfg: Config) -> torch.dtype:
    """Float storage for 4-bit weights so ZeRO-3 can partition them: the dtype DeepSpeed casts the module
    to under bf16/fp16, else the QLoRA compute dtype."""
    if cfg.train.precision in ("bf16", "fp16"):
        return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return DTYPES[cfg.method.qlora.compute_dtype]


class DeepSpeedStrategy(Strategy):
    """ZeRO stage 1/2/3 through deepspeed.initialize, with ftl's own optimizer and loop."""

    name = "deepspeed"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        if env.device.type == "cpu":  # tell DeepSpeed, before it is imported, instead of letting it warn
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        check_deepspeed_config(cfg, env.world_size)  # cheap; before any model loads
        self.stage, self.offload = stage_and_offload(cfg)
        self.engine: Any = None
        self.ds_config: dict[str, Any] = {}
        self.method = method_for(cfg)
        self.adapters = self.method.adapters
        self._reported = False
        self._loaded_numel = 0

    def build_model(self) -> nn.Module:
        """The model for this stage. ZeRO-3 (not QLoRA) builds it under deepspeed.zero.Init through
        transformers' HfDeepSpeedConfig, so each rank only ever holds its partition; QLoRA under ZeRO-3 loads
        whole, 4-bit weights in float storage, and the engine partitions it in setup."""
        init_deepspeed_dist(self.env, self.cfg.distributed.timeout_minutes)
        if self.stage == 3 and not self.method.quantizes_base:
            from transformers import AutoConfig
            from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

            m = self.cfg.model
            model_cfg = AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code)
            hidden = getattr(model_cfg, "hidden_size", None)
            self.ds_config = build_ds_config(self.cfg, self.env.world_size, hidden)
            hf_zero3 = HfDeepSpeedConfig(self.ds_config)  # transformers keeps a weak reference while we hold it
            try:
                return build_model(self.cfg, self.env.device)
            finally:
                unset_hf_deepspeed_config()  # later model loads in this process are not ZeRO-3 ones
                del hf_zero3
        storage = quant_storage_dtype(self.cfg) if self.method.quantizes_base and self.stage == 3 else None
        return build_model(self.cfg, self.env.device, quant_storage=storage)

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        import deepspeed

        init_deepspeed_dist(self.env, self.cfg.distributed.timeout_minutes)
        if not self.ds_config:
            hidden = getattr(getattr(model, "config", None), "hidden_size", None)
            self.ds_config = build_ds_config(self.cfg, self.env.world_size, hidden)
        self._loaded_numel = sum(p.numel() for p in model.parameters())  # ZeRO-3 via zero.Init: ~0 of the base
        optimizer = make_optimizer(trainable_parameters(model))
        zero_inactive_gradients_in_backward(optimizer)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.engine = self.model = engine
        # ftl sets param_groups[i]["lr"] here: the torch optimizer DeepSpeed's ZeRO wrapper actually steps.
        self.optimizer = getattr(ds_optimizer, "optimizer", ds_optimizer)
        self._zero = ds_optimizer
        return engine

    def optimizer_tensors(self) -> list[tuple[dict, torch.Tensor]]:
        """ZeRO-3 hands its torch optimizer each flat fp32 partition only while stepping it: ask the wrapper."""
        flats = getattr(self._zero, "fp32_partitioned_groups_flat", None)
        if flats is None:
            return param_group_tensors(self.optimizer)
        groups = self.optimizer.param_groups
        return [(groups[self._zero.sub_group_to_group_id[i]], t) for i, t in enumerate(flats)]

    @property
    def unwrapped(self) -> nn.Module:
        return self.engine.module

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast for bf16/fp16 around the engine's forward, as for the other strategies."""
        return precision_autocast(self.cfg, self.env.device)

    def discard_step(self) -> None:
        """Zero the gradients (DeepSpeed drops overflowing fp16 steps itself; train.nonfinite=skip is refused)."""
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """DeepSpeed decides reductions from its own micro-step counter (see `backward`)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """engine.backward without its ÷accumulation-steps, × ranks against its gradient averaging; then
        engine.step() for every micro-batch but the last (DeepSpeed counts micro-steps there, no update).
        The factor is the data-parallel size: DeepSpeed averages gradients over the data-parallel replicas."""
        self.engine.backward(loss * self.env.dp_size, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self, max_grad_norm: float | None) -> float:
        """The boundary engine.step(): DeepSpeed clips (gradient_clipping = train.max_grad_norm) and updates.

        Returns the global grad norm before clipping."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "deepspeed: step() before the last micro-batch of the step; the loop must run exactly "
                f"train.grad_accum={self.cfg.train.grad_accum} backward() calls per step"
            )
        self.engine.step()
        if not self._reported:
            self._reported = True
            self.report_sharding()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def loss_scale(self) -> float | None:
        """DeepSpeed's own dynamic fp16 loss scale (it keeps and checkpoints its scaler)."""
        if self.cfg.train.precision != "fp16":
            return None
        return float(getattr(self.engine.optimizer, "loss_scale", 0.0)) or None

    def local_numel(self) -> tuple[int, int]:
        """(parameter elements this rank holds, optimizer-state elements this rank holds).

        ZeRO-3 counts each parameter's partition (persistent small parameters count in full)."""
        params = sum(_held(p) for p in self.unwrapped.parameters())
        state = sum(
            t.numel() for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0
        )
        return params, state

    def save_pretrained(self, directory: Path) -> None:
        """Rank 0 writes a Hugging Face directory (PEFT: the adapter only); every rank must call it."""
        state = self._gathered(trainable_only=not self.method.final_holds_frozen)
        if self.env.is_main:
            self.method.save_final(self.cfg, self.unwrapped, directory, state)

    def _gathered(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Parameters gathered one at a time onto rank 0. Trainable ones come from DeepSpeed's fp32 master copy
        (so bf16/fp16 runs export what single-process training would: adapters fp32, full weights in
        model.dtype); frozen ones as the module holds them (ZeRO-3: gathered)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        trained_dtype = torch.float32 if self.adapters else DTYPES[self.cfg.model.dtype]
        out: dict[str, torch.Tensor] = {}
        for name, p in self.unwrapped.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            full = safe_get_full_fp32_param(p) if p.requires_grad else None  # a collective
            if full is None:
                gather = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
                with gather:
                    full = p.detach().clone() if self.env.is_main else None
            elif self.env.is_main:
                full = full.detach().to(trained_dtype)
            if self.env.is_main:
                out[name] = full.cpu()
        if not trainable_only and self.env.is_main:
            for prefix, module in self.unwrapped.named_modules():
                for bname, buf in module.named_buffers(recurse=False):
                    if bname not in module._non_persistent_buffers_set:
                        out[f"{prefix}.{bname}" if prefix else bname] = buf.detach().cpu()
        return out

    def report_sharding(self) -> None:
        """Every rank's held parameter and optimizer-state elements (and the parameter elements it held in
        full when the model was handed over) → OUTPUT_DIR/sharding.json and the log, after the first step (when
        the optimizer state exists). Every rank must call it."""
        params, state = self.local_numel()
        mine = {"params": params, "optimizer_state": state, "materialised_at_load": self._loaded_numel}
        ranks: list[Any] = [mine]
        if dist.is_initialized() and self.env.world_size > 1:
            ranks = [None] * self.env.world_size
            dist.all_gather_object(ranks, mine)
        if not self.env.is_main:
            return
        numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in self.unwrapped.parameters()]
        total, trainable = sum(n for n, _ in numel), sum(n for n, t in numel if t)
        report = {**self._describe(), "total_params": total, "trainable_params": trainable, "ranks": ranks}
        report["linear4bit"] = quantized_linears(self.unwrapped)
        out = Path(self.cfg.output_dir)
        if out.is_dir():
            (out / SHARDING_FILE).write_text(json.dumps(report, indent=1) + "\n")
        held = " ".join(f"rank{i}: held={r['params']:,} optim={r['optimizer_state']:,}" for i, r in enumerate(ranks))
        log(f"deepspeed: zero_stage={self.stage} offload={self.offload} total={total:,} trainable={trainable:,} {held}")

    def _describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "zero_stage": self.stage, "offload": self.offload}

    def save_checkpoint(self, directory: Path) -> None:
        """DeepSpeed's own sharded checkpoint (frozen base weights excluded) + a small ftl metadata file.

        Every rank calls it with the same directory."""
        from deepspeed.checkpoint import constants as c

        directory = Path(directory)
        # ds_to_universal wants this marker in ZeRO-1/2 checkpoints to convert them for another world size.
        marker = {
            c.UNIVERSAL_CHECKPOINT_INFO: {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        }
        frozen_out = not self.method.checkpoint_holds_frozen
        self.engine.save_checkpoint(
            str(directory), tag=CKPT_TAG, client_state=marker, exclude_frozen_parameters=frozen_out
        )
        if self.env.is_main:
            meta = {"world_size": self.env.world_size, "zero_stage": self.stage, "tag": CKPT_TAG}
            (directory / CKPT_META).write_text(json.dumps(meta) + "\n")
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, directory: Path) -> None:
        """Restore a checkpoint written by `save_checkpoint`, on the same or a different world size.

        DeepSpeed checkpoints are pickles (torch.load with weights_only=False): load only directories this
        run wrote itself (OUTPUT_DIR/checkpoints), never a checkpoint from an untrusted source. A different
        world size is converted once by rank 0 with deepspeed.checkpoint.ds_to_universal into the sibling
        directory `.<name>.universal` and loaded as a universal checkpoint."""
        directory = Path(directory)
        meta = json.loads((directory / CKPT_META).read_text())
        if meta["world_size"] == self.env.world_size:
            self._engine_load(directory, universal=False)
            return
        self._engine_load(self._universal(directory), universal=True)

    def _engine_load(self, directory: Path, universal: bool) -> None:
        self.engine._config.load_universal_checkpoint = universal
        try:
            path, _ = self.engine.load_checkpoint(
                str(directory),
                tag=CKPT_TAG,
                load_module_strict=not self.adapters,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"deepspeed: no checkpoint '{CKPT_TAG}' in {directory}")

    def _universal(self, directory: Path) -> Path:
        """Rank 0 converts `directory` to a universal checkpoint (once); every rank gets its path."""
        out = directory.parent / f".{directory.name}.universal"
        done = out / "ftl_converted"
        error = ""
        if self.env.is_main and not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            try:
                convert_to_universal(directory / CKPT_TAG, out / CKPT_TAG)
                done.write_text("ok\n")
                log(f"deepspeed: converted {directory} to a universal checkpoint in {out}")
            except Exception as exc:  # every rank raises, none waits on a barrier forever
                error = f"{type(exc).__name__}: {exc}"
        if dist.is_initialized() and self.env.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise RuntimeError(f"deepspeed: converting {directory} to a universal checkpoint failed: {error}")
        return out


def convert_to_universal(src: Path, dst: Path) -> None:
    """deepspeed.checkpoint.ds_to_universal on one tag directory, in this process (its own defaults, 1 worker)."""
    from deepspeed.checkpoint import ds_to_universal

    argv = ["ds_to_universal", "--input_folder", str(src), "--output_folder", str(dst)]
    argv += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    saved, sys.argv = sys.argv, argv
    try:
        args = ds_to_universal.parse_arguments()
    finally:
        sys.argv = saved
    with contextlib.redirect_stdout(io.StringIO()):  # progress prints
        ds_to_universal.main(args)


def _held(p: nn.Parameter) -> int:
    """Elements of `p` this rank keeps between uses: its ZeRO-3 partition, or all of it."""
    if not hasattr(p, "ds_tensor"):
        return p.numel()
    return p.ds_numel if getattr(p, "ds_persist", False) else p.partition_numel()


def read_checkpoint_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights consolidated from DeepSpeed ZeRO shards (trainable parameters for adapter runs)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(model_dir), tag=CKPT_TAG, exclude_frozen_parameters=True)
