"""What each objective declares about itself without torch: the data formats it reads and whether its rows may be
packed. config_checks asks here (so `ftl validate` stays torch-free); the objectives' classes carry the same."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectiveTraits:
    """An objective's declaration."""

    name: str  # the model.task it trains
    formats: tuple[str, ...]  # the data.format values whose rows it reads
    packs: bool  # rows may be packed into one (their loss units stay separate)
    head: str  # what the loss is taken through, for messages


TRAITS = {
    "causal_lm": ObjectiveTraits("causal_lm", ("chat", "alpaca", "completion", "text"), packs=True, head="LM head"),
    "sequence_classification": ObjectiveTraits(
        "sequence_classification", ("classification",), packs=False, head="classification head"
    ),
}


def objective_traits(task: str) -> ObjectiveTraits:
    """The declaration of the objective that trains `model.task`."""
    return TRAITS[task]


def format_problem(fmt: str, task: str, where: str) -> str | None:
    """A message when rows of format `fmt` cannot train `model.task` (None when they can)."""
    declared = objective_traits(task)
    if fmt in declared.formats:
        return None
    return (
        f"{where}: '{fmt}' does not fit model.task='{task}': its objective reads {', '.join(declared.formats)} rows "
        f"(one run trains one head, here the {declared.head})"
    )
