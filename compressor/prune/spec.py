"""What a pruning method or host is built from: its prune section and a small model spec, not the app's Recipe.

`PruneSpec` duck-types the part of a recipe that methods and hosts read (`.prune`, `.model.ignore`,
`schedule_end_epoch()`), so the planners' helpers that take "a recipe" take a spec too. The app builds one with
`Recipe.prune_spec()`; `compressor.Pruner` builds one from the user's model, example inputs and prune section.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from compressor.prune.section import PruneConfig


@dataclass
class ModelSpec:
    """The model facts a method needs: one example batch (CPU) to trace the graph and count MACs, and the layer-name
    patterns never pruned (module names or `re:` patterns, as the recipe's model.ignore)."""

    example: "torch.Tensor"
    ignore: list[str] = field(default_factory=list)


@dataclass
class PruneSpec:
    """A method's or host's whole input: the prune section, the model spec, the training budget in epochs (the
    schedule's default end is half of it) and whether schedule warnings are errors (gates.strict_schedule)."""

    prune: "PruneConfig"
    model: ModelSpec
    epochs: int
    strict_schedule: bool = False

    def schedule_end_epoch(self) -> int:
        """The epoch the event schedule ends at: prune.schedule.end_epoch, or half of the training budget."""
        end = self.prune.schedule.end_epoch
        return end if end is not None else self.epochs // 2


def budget_problems(prune: Any, epochs: int, epochs_field: str = "finetune.epochs") -> list[str]:
    """What makes the prune section impossible within `epochs` of training (named `epochs_field`), one sentence
    each naming the fields (the recipe's cross-check and the Pruner's): a schedule ending after training, starting
    after its end, and a method that acts only during training given none."""
    from compressor.prune.methods import METHODS

    problems = []
    end = prune.schedule.end_epoch
    if end is not None and end > epochs:
        problems.append(f"prune.schedule.end_epoch ({end}) is after {epochs_field} ({epochs}); lower it or train "
                        "longer")
    if prune.schedule.start_epoch > (end if end is not None else epochs):
        problems.append("prune.schedule.start_epoch is after the schedule's end")
    if METHODS.get(prune.method).needs_training_budget(prune) and epochs == 0:
        problems.append(f"method {prune.method} prunes during training: {epochs_field} must be at least 1")
    return problems
