"""What each objective declares about itself without torch: the data formats it reads and whether its rows may be
packed. config_checks asks here (so `ftl validate` stays torch-free); the objectives' classes carry the same."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config import Config


@dataclass(frozen=True)
class ObjectiveTraits:
    """An objective's declaration."""

    name: str  # the implementation's name (a model.task, or an objective.kind of its own)
    formats: tuple[str, ...]  # the data.format values whose rows it reads
    packs: bool  # rows may be packed into one (their loss units stay separate)
    head: str  # what the loss is taken through, for messages
    tasks: tuple[str, ...] = ("causal_lm",)  # the model.task values whose model it trains
    replicated_only: bool = False  # it runs only where every rank holds the whole model (single, DDP) so far
    pairs: bool = False  # it reads preference pairs (a sample is a pair: two completions of one prompt)
    reference: bool = False  # it compares the policy with a reference model (objective.reference)
    settings: tuple[str, ...] = ()  # the objective.* fields it reads (beyond kind)
    num_labels: int | None = None  # the outputs its head must have (model.num_labels), where it fixes them
    margins: bool = False  # it reads preference rows' optional per-pair `margin`


TRAITS = {
    "causal_lm": ObjectiveTraits(
        "causal_lm", ("chat", "sharegpt", "alpaca", "completion", "text"), packs=True, head="LM head"
    ),
    "sequence_classification": ObjectiveTraits(
        "sequence_classification",
        ("classification",),
        packs=False,
        head="classification head",
        tasks=("sequence_classification",),
        settings=(),
    ),
    # preference pairs (issue 18): a packed row holds whole pairs; reward models run unpacked under single/DDP so far
    "dpo": ObjectiveTraits(
        "dpo",
        ("preference",),
        packs=True,
        head="LM head",
        pairs=True,
        reference=True,
        settings=("beta", "loss_type", "label_smoothing", "reference"),
    ),
    "simpo": ObjectiveTraits(
        "simpo",
        ("preference",),
        packs=True,
        head="LM head",
        pairs=True,
        settings=("beta", "gamma", "label_smoothing", "sft_weight"),
    ),
    "orpo": ObjectiveTraits("orpo", ("preference",), packs=True, head="LM head", pairs=True, settings=("beta",)),
    "reward": ObjectiveTraits(
        "reward",
        ("preference",),
        packs=False,
        head="one-output score head",
        tasks=("sequence_classification",),
        replicated_only=True,
        pairs=True,
        num_labels=1,
        settings=("center_rewards_coefficient",),
        margins=True,
    ),
}
KINDS = {  # objective.kind -> name
    "sft": "causal_lm",
    "classification": "sequence_classification",
    "dpo": "dpo",
    "simpo": "simpo",
    "orpo": "orpo",
    "reward": "reward",
}


@dataclass(frozen=True)
class MemoryNeeds:
    """What an objective adds to `ftl estimate`'s per-rank peak beyond one sequence per sample."""

    sequences: int = 1  # sequences per sample through the trained forward: scales activations and the loss
    reference_forwards: int = 0  # no-grad reference forwards per micro-batch: transient, nothing kept for backward
    reference_weight_bytes: float = 0.0  # a reference copy's weights held beside the policy (none: adapter off)


def memory_needs(cfg: Config, weight_bytes: float) -> MemoryNeeds:
    """What this run's objective costs `ftl estimate` (`weight_bytes`: the policy's weights per rank, what a
    resident reference copy would cost). Pair objectives push both completions of each pair through the model;
    an objective with a reference adds its no-grad forward (the adapter switched off, or a frozen copy), except
    with reference log-probs precomputed before training. A frozen copy's weights are counted by the estimate as
    their own row ("reference model": the copy is held unsharded, under single or DDP only)."""
    declared = objective_traits(objective_name(cfg))
    precomputed = cfg.objective is not None and cfg.objective.reference == "precomputed"
    forwards = int(declared.reference and not precomputed)
    return MemoryNeeds(sequences=2 if declared.pairs else 1, reference_forwards=forwards)


def objective_name(cfg: Config) -> str:
    """The implementation this run trains with: objective.kind when given, else what model.task implies."""
    kind = cfg.objective.kind if cfg.objective is not None else None
    return KINDS[kind] if kind else cfg.model.task


def chosen_by(cfg: Config) -> str:
    """Which setting picked the objective, for messages."""
    kind = cfg.objective.kind if cfg.objective is not None else None
    return f"objective.kind='{kind}'" if kind else f"model.task='{cfg.model.task}'"


def objective_traits(name: str) -> ObjectiveTraits:
    """The declaration of the objective implementation `name` (see objective_name)."""
    return TRAITS[name]


def format_problem(fmt: str, cfg: Config, where: str) -> str | None:
    """A message when rows of format `fmt` cannot train this run's objective (None when they can)."""
    declared = objective_traits(objective_name(cfg))
    if fmt in declared.formats:
        return None
    readers = [k for k, name in KINDS.items() if fmt in TRAITS[name].formats]
    hint = f"; {fmt} rows train objective.kind: {' or '.join(readers)}" if readers else ""
    return (
        f"{where}: '{fmt}' does not fit {chosen_by(cfg)}: its objective reads {', '.join(declared.formats)} rows "
        f"(one run trains one head, here the {declared.head}){hint}"
    )
