"""The interface every fine-tuning method implements: what it attaches, which parameters train, what a
checkpoint and `final/` hold, how it loads, merges and exports, what `ftl estimate` counts, what it refuses.

Everything outside `launcher/methods/` asks a `Method` (from `method_for`) instead of comparing kind names.
Torch-free at import: `ftl estimate` and `ftl validate` ask methods without loading torch; what needs torch
or peft imports it inside the function.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from launcher.config import Config
from launcher.methods.freezing import trainable_parameters

if TYPE_CHECKING:  # torch-free at import (see the module docstring)
    from torch import nn

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelShape(Protocol):
    """What `ftl estimate` knows of a model from its config.json (launcher.estimate.Shape)."""

    hidden: int
    layers: int

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block, by module name."""


class Method:
    """A fine-tuning method's declaration and behaviour. Subclasses override what differs."""

    name: str = ""
    adapters: bool = False  # trains added tensors on a frozen base: final/ holds only those
    merges: bool = False  # `ftl export --merge` can fold the added tensors into the base weights
    concatenates: bool = True  # rows may share a sequence (packing, padding-free): it keeps 4D masks intact
    quantizes_base: bool = False  # the frozen base is loaded in 4 bits (bitsandbytes, while loading)
    # a checkpoint holds the trained tensors only: frozen ones are the base model's, rebuilt at resume
    checkpoint_holds_frozen: bool = False
    # with gradient checkpointing and a frozen embedding, checkpointed blocks need inputs that require grad
    needs_input_grads: bool = False
    exports_with_base: bool = False  # `ftl export` writes the base weights beside final/'s files
    # what it added can be switched off, giving back the network it started from (a preference reference)
    switches_off: bool = False
    starts_from_adapter: bool = False  # model.adapter: it can start from an adapter it trained earlier

    @property
    def final_holds_frozen(self) -> bool:
        """Whether final/ is the whole model (else only the tensors the method added and trained)."""
        return not self.adapters

    # --- building ------------------------------------------------------------------------------------
    def prepare_base(self, model: nn.Module, cfg: Config) -> tuple[nn.Module, bool]:
        """Adjust the loaded base model before attaching; returns (model, gradient checkpointing done)."""
        return model, False

    def attach(self, model: nn.Module, cfg: Config) -> nn.Module:
        """Add what the method trains and set requires_grad; `method.freeze` is applied afterwards."""
        return model

    def place(self, model: nn.Module, device: Any) -> nn.Module:
        """Move the built model to the run's device."""
        return model.to(device)

    def reference_view(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """While active, `model` (as the method built it) computes as the network the run started from, without
        what this run trained: a preference objective's reference (call it without gradients)."""
        raise NotImplementedError(f"method {self.name} cannot compute without what it trained")

    # --- saving, loading, export ---------------------------------------------------------------------
    def checkpoint_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what a checkpoint holds, names as the bare model has them."""
        if self.checkpoint_holds_frozen:
            return list(model.named_parameters())
        return trainable_parameters(model)

    def final_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what final/ holds, names as the bare model has them (files may rename them:
        PEFT drops its adapter names, prompt learning stores one `prompt_embeddings`)."""
        if self.final_holds_frozen:
            return list(model.named_parameters())
        return trainable_parameters(model)

    def save_final(self, cfg: Config, model: nn.Module, directory: Path, state: dict | None = None) -> None:
        """Write the final model as the method stores it. `state`: tensors gathered by a sharding strategy
        (exactly the ones `final_holds_frozen` declares)."""
        extra = {} if state is None else {"state_dict": state}
        model.save_pretrained(directory, safe_serialization=True, **extra)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        """The trained model from `final/` (or an export of it) on top of a freshly loaded base model."""
        from peft import PeftModel

        return PeftModel.from_pretrained(base, directory)

    def merge(self, cfg: Config, base: nn.Module, directory: Path) -> nn.Module:
        """The base model with the trained tensors in `directory` folded into its weights (`merges` only)."""
        raise NotImplementedError(f"method {self.name} does not merge")

    def merge_refusal(self) -> str | None:
        """Why `ftl export --merge` is refused for this method (None: it merges, or has nothing to merge)."""
        return None

    # --- what `ftl estimate` counts ------------------------------------------------------------------
    def added_elements(self, cfg: Config, shape: ModelShape) -> int:
        """Elements of the tensors the method adds to the model (they train, in fp32)."""
        return 0

    def weight_bytes(self, cfg: Config, linear: int, other: int) -> float:
        """Bytes of the base model's weights: `linear` elements in the blocks' linear layers, `other` the rest."""
        return (linear + other) * DTYPE_BYTES[cfg.model.dtype]

    def block_bytes(self, cfg: Config, block: int) -> float:
        """Bytes of one block's `block` linear-layer elements, as a sharding strategy gathers them."""
        return block * DTYPE_BYTES[cfg.model.dtype]

    def frozen_added_elements(self, cfg: Config, shape: ModelShape) -> int:
        """Elements of added tensors that stay frozen (fp32): a copy of the adapter the run started from."""
        return 0

    def activation_elements(self, cfg: Config, shape: ModelShape) -> int:
        """Elements per token and layer the method's added layers keep for backward."""
        return 0

    def lighter(self, cuda: bool) -> list[str]:
        """Methods to suggest when a run does not fit, lightest last."""
        return []

    def lighter_changes(self, cuda: bool) -> list[tuple[str, dict]]:
        """`lighter` as (label, config change) for `ftl estimate` to try."""
        return [(f"method.kind={name}", {"method": {"kind": name}}) for name in self.lighter(cuda)]

    # --- refusals -------------------------------------------------------------------------------------
    def problems(self, cfg: Config) -> list[str]:
        """What this method refuses in a validated config."""
        p: list[str] = []
        if cfg.data.packing and not self.concatenates:
            p.append(
                f"data.packing: method.kind {self.name} prepends virtual tokens to each row, which cannot "
                "follow a packed row's block-diagonal mask; set data.packing: false"
            )
        if cfg.train.l2sp.weight and self.adapters:
            p.append(
                f"train.l2sp: method.kind {self.name} trains no pre-trained weights (its adapters start new); "
                "L2-SP needs method.kind full"
            )
        return p

    def start_problems(self, cfg: Config) -> list[str]:
        """What is wrong with model.adapter as this method's starting point (`starts_from_adapter` only)."""
        return []

    def raw_problems(self, raw_method: dict[str, Any]) -> list[str]:
        """What this method refuses in the `method` section as written, before defaults fill it in."""
        return []
