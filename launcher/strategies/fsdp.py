"""Native PyTorch FSDP2 (`fully_shard`): parameters, gradients and optimizer state are sharded across ranks.

Each transformer block (classes from the model's `_no_split_modules`, or `distributed.fsdp_wrap`) is one
all-gather / reduce-scatter group, then the root. Only rank 0 reads the weights: the other ranks build the
same architecture on the meta device, shard it, and receive their shards by broadcast from rank 0. QLoRA is
the exception: bitsandbytes quantises while loading, which has no meta path, so every rank loads the (small)
4-bit model and shards it; the 4-bit weights are stored in a float dtype so FSDP can shard them.

Gradients are SUMMED across ranks (divide factor 1): the trainer already normalises each rank's loss by the
global label count, so the sum is the gradient of the whole global batch.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from launcher.config import Config
from launcher.dist import DistEnv, backend_for
from launcher.errors import ConfigError
from launcher.methods import method_for, trainable_parameters
from launcher.metrics import log
from launcher.model import DTYPES, build_meta_model, build_model
from launcher.strategies.base import OptimizerFactory, quantized_linears
from launcher.strategies.torch_steps import TorchStepsStrategy

MP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHARDING_FILE = "sharding.json"
SCALER_FILE = "grad_scaler.json"


def ensure_process_group(env: DistEnv) -> None:
    """FSDP needs a process group even for one rank; ftl only starts one for several."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend_for(env.device), store=dist.HashStore(), rank=0, world_size=1)


def wrap_class_names(model: nn.Module, configured: list[str] | None) -> set[str]:
    """Module classes sharded as one unit each: the configured names, else the model's `_no_split_modules`,
    else the element class of its longest nn.ModuleList (the repeated transformer blocks)."""
    present = {type(m).__name__ for m in model.modules()}
    if configured:
        missing = sorted(set(configured) - present)
        if missing:
            raise ConfigError([f"distributed.fsdp_wrap: no module of class {missing} in this model"])
        return set(configured)
    names = set(getattr(model, "_no_split_modules", None) or []) & present
    if not names:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        names = {type(b).__name__ for b in max(lists, key=len)} if lists else set()
    if not names:
        raise ConfigError(
            [
                "distributed.fsdp_wrap: found no transformer block class in this model; "
                "set distributed.fsdp_wrap to its block class, e.g. [LlamaDecoderLayer]"
            ]
        )
    return names


def clip_by_global_norm(params: list[nn.Parameter], max_norm: float | None, comm_device: torch.device) -> float:
    """L2 norm of the whole gradient (every rank's shards); scales the shards down to max_norm when above.

    Computed from the local shards with one all-reduce on the device the process group talks on: with
    CPUOffloadPolicy the gradients live in CPU memory, where `clip_grad_norm_`'s DTensor all-reduce fails
    under NCCL. Equals `clip_grad_norm_` (same 1e-6 guard) otherwise.
    """
    grads = [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in params) if g is not None]
    squares = torch.zeros((), dtype=torch.float64, device=comm_device)
    for g in grads:
        squares += g.detach().double().square().sum().to(comm_device)
    dist.all_reduce(squares)
    norm = float(squares.sqrt())
    if max_norm and norm + 1e-6 > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


class FSDPStrategy(TorchStepsStrategy):
    """FSDP2 per transformer block + root; mixed precision by policy (no autocast), optional CPU offload."""

    name = "fsdp"

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.method = method_for(cfg)
        self._full_weights: dict[str, torch.Tensor] | None = None  # rank 0's weights, until broadcast
        self._on_meta = False
        self._reported = False
        # On a CPU run everything already lives in CPU memory (and CPUOffloadPolicy needs an accelerator).
        self._offload = cfg.distributed.fsdp_cpu_offload and env.device.type != "cpu"

    # --- building and wrapping -------------------------------------------------------------------------
    def quant_storage(self) -> torch.dtype:
        """Float container dtype for the packed 4-bit weights. It must be the mixed-precision param dtype
        when there is one (a cast would scramble the packed bits), else the QLoRA compute dtype."""
        return MP_DTYPES.get(self.cfg.train.precision) or DTYPES[self.cfg.method.qlora.compute_dtype]

    def build_model(self) -> nn.Module:
        """Rank 0 loads the weights (on CPU when the run uses CUDA); the other ranks build on meta."""
        ensure_process_group(self.env)
        if self.method.quantizes_base:  # bitsandbytes quantises while loading: no meta path, every rank loads
            return build_model(self.cfg, self.env.device, quant_storage=self.quant_storage())
        if self.env.rank != 0:
            self._on_meta = True
            return build_meta_model(self.cfg)
        model = build_model(self.cfg, torch.device("cpu"))
        if self.env.world_size > 1:
            self._full_weights = model.state_dict()
        return model

    def _shard_kwargs(self) -> dict[str, Any]:
        d, precision = self.cfg.distributed, self.cfg.train.precision
        mp = (
            MixedPrecisionPolicy(param_dtype=MP_DTYPES[precision], reduce_dtype=torch.float32)
            if (precision in MP_DTYPES)
            else MixedPrecisionPolicy()
        )
        return {
            "mesh": init_device_mesh(self.env.device.type, self.env.dims.shape, mesh_dim_names=self.env.dims.names),
            "reshard_after_forward": d.fsdp_reshard_after_forward,
            "mp_policy": mp,
            "offload_policy": CPUOffloadPolicy() if self._offload else OffloadPolicy(),
        }

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> nn.Module:
        """Shard every block, then the root; fill meta ranks from rank 0; optimizer over local shards."""
        if self.cfg.distributed.fsdp_cpu_offload and not self._offload and self.env.is_main:
            log("distributed.fsdp_cpu_offload: ignored, this run is on CPU (everything is in CPU memory already)")
        kwargs = self._shard_kwargs()
        names = wrap_class_names(model, self.cfg.distributed.fsdp_wrap)
        blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum, see the module docstring
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        if self.env.world_size > 1 and not self.method.quantizes_base:
            self._broadcast_from_rank0(model)
        self.model = model
        self.optimizer = make_optimizer(trainable_parameters(model))
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        self.scaler = self.make_scaler(ShardedGradScaler)
        return model

    def _broadcast_from_rank0(self, model: nn.Module) -> None:
        """Give meta ranks real storage, then rank 0's weights (parameters and all buffers)."""
        if self._on_meta:
            model.to_empty(device=torch.device("cpu") if self._offload else self.env.device)
            for module in model.modules():
                for key, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[key] = buf.to(self.env.device)
        # A module reachable under two names (PEFT prompt tuning's `word_embeddings` is the base model's
        # embedding) is loaded once, under its first name; any other missing key is still an error.
        aliases = second_names(model)
        full = {k: v for k, v in (self._full_weights or {}).items() if k not in aliases}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        result = set_model_state_dict(model, full, options=options)
        self._full_weights = None
        missing = set(result.missing_keys) - aliases
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"rank 0's weights do not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        for buf in model.buffers():  # non-persistent ones (rotary inv_freq) are in no state dict
            dist.broadcast(buf, src=0)

    # --- training --------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        """None: the MixedPrecisionPolicy already computes in bf16/fp16."""
        return contextlib.nullcontext()

    def no_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Gradients accumulate unsharded locally and are reduce-scattered on the last micro-step. The flag
        is set, not scoped: the trainer runs backward after leaving this context."""
        self.model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    def step(self, max_grad_norm: float | None) -> float:
        """Clip by the global grad norm (over all shards), step, zero grads; returns that norm."""
        norm = super().step(max_grad_norm)
        if not self._reported:
            self._reported = True
            self.report_sharding()
        return norm

    def clip_grad_norm(self, params: list[nn.Parameter], max_grad_norm: float | None) -> float:
        return clip_by_global_norm(params, max_grad_norm, self.env.device)

    def report_sharding(self) -> None:
        """Write every rank's held parameter and optimizer-state elements to OUTPUT_DIR/sharding.json
        (after the first step, when the optimizer state exists)."""
        params, state = self.local_numel()
        rows: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(rows, {"params": params, "optimizer_state": state})
        units = [name for name, m in self.model.named_modules() if isinstance(m, FSDPModule)]  # "" = the root
        out = Path(self.cfg.output_dir)
        if self.env.is_main and out.is_dir():
            report = {"strategy": self.name, "ranks": rows, "fsdp_units": units}
            report["linear4bit"] = quantized_linears(self.model)
            (out / SHARDING_FILE).write_text(json.dumps(report, indent=1))

    # --- state ---------------------------------------------------------------------------------------
    def _options(self, **kw: bool) -> StateDictOptions:
        """What a checkpoint holds of the model: the method says (the trained tensors)."""
        return StateDictOptions(ignore_frozen_params=not self.method.checkpoint_holds_frozen, **kw)

    def _checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model, optimizer) state of a checkpoint: the model's holds what the method declares."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        return self._declared(model_sd, self.method.checkpoint_parameters(self.model)), optim_sd

    def _declared(self, state: dict[str, Any], declared: list[tuple[str, nn.Parameter]]) -> dict[str, Any]:
        """`state` less every parameter the method does not declare: ignore_frozen_params drops a frozen tensor
        under its first name only (PEFT prompt tuning's `word_embeddings` is the base's embedding again)."""
        kept = {id(p) for _, p in declared}
        others = {n for n, p in self.model.named_parameters(remove_duplicate=False) if id(p) not in kept}
        return {k: v for k, v in state.items() if k not in others}

    def save_checkpoint(self, directory: Path) -> None:
        """Sharded DCP checkpoint of the model (what the method's checkpoints hold) and optimizer."""
        model_sd, optim_sd = self._checkpoint_state()
        with _dcp_errors_as_exceptions():
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))
        if self.scaler and self.env.is_main:  # plain numbers, the same on every rank
            (directory / SCALER_FILE).write_text(json.dumps(self.scaler.state_dict()))

    def load_checkpoint(self, directory: Path) -> None:
        """Load a DCP checkpoint into the current sharding (any world size: DCP reshards)."""
        model_sd, optim_sd = self._checkpoint_state()
        state = {"model": model_sd, "optimizer": optim_sd}
        with _dcp_errors_as_exceptions():
            dcp.load(state, checkpoint_id=str(directory))
        result = set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self._options(strict=False),  # frozen tensors are the base model's, already in place
        )
        params = self.model.named_parameters(remove_duplicate=False)
        absent = set() if self.method.checkpoint_holds_frozen else {n for n, p in params if not p.requires_grad}
        missing = set(result.missing_keys) - absent
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {directory} does not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        if self.scaler and (directory / SCALER_FILE).is_file():
            self.scaler.load_state_dict(json.loads((directory / SCALER_FILE).read_text()))

    def save_pretrained(self, directory: Path) -> None:
        """Gather on rank 0 what the method's final/ holds and write it there as the method stores it."""
        frozen_too = self.method.final_holds_frozen
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen_too)
        state = self._declared(
            get_model_state_dict(self.model, options=options), self.method.final_parameters(self.model)
        )
        if self.env.is_main:
            self.method.save_final(self.cfg, self.model, directory, state)


class DCPError(RuntimeError):
    """A DCP save/load failed on some rank; the message holds each rank's error (e.g. ENOSPC)."""


@contextlib.contextmanager
def _dcp_errors_as_exceptions() -> Iterator[None]:
    """DCP raises CheckpointException, a BaseException that `except Exception` (the checkpoint manager's
    disk-full handling, the CLI's error reporting) would let through as a traceback."""
    try:
        yield
    except CheckpointException as err:
        raise DCPError(str(err)) from None


def read_checkpoint_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors from an FSDP2 DCP checkpoint, in one process, no process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(model_dir))
    meta = reader.read_metadata().state_dict_metadata
    model = {
        k[len("model.") :]: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def second_names(model: nn.Module) -> set[str]:
    """State-dict names of tensors already reachable under an earlier name (a module shared twice)."""
    seen: set[int] = set()
    later: set[str] = set()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        if id(tensor) in seen:
            later.add(name)
        seen.add(id(tensor))
    return later
