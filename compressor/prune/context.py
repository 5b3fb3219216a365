"""What a pruning method's hooks see: the model, the training position, the optimizer, the last batch, and one way
to say "the structure changed" (`rebuild`). `compressor.Pruner` fills it from a user's loop; `fit` uses its
subclass TrainContext (train/loop.py), which adds the fine-tuning settings, DDP and the memory format."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]  # (model, inputs, targets) -> scalar loss


@dataclass
class PruneContext:
    """The state a method reads and changes.

    `model` is the bare module the method prunes in place. `step` counts completed optimizer steps, `epoch`
    completed epochs. `loss_fn` and `calibration` (n -> an iterable of n (inputs, targets) batches) let a host that
    scores with gradients run a few batches of its own before an event. `metrics` are the last epoch's, `history`
    one dict per finished epoch (`epoch`, `seconds`, metrics). A method that replaced parameters calls `rebuild()`.
    """

    model: nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    steps_per_epoch: int = 1
    total_steps: int = 0
    epoch: int = 0
    step: int = 0
    optimizer: Optional[torch.optim.Optimizer] = None
    inputs: Any = None
    targets: Any = None
    loss: Optional[torch.Tensor] = None
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_fn: Optional[LossFn] = None
    calibration: Optional[Callable[[int], Iterable[Any]]] = None
    structure_changed: Optional[Callable[[], None]] = field(default=None, repr=False)  # set by the Pruner

    def rebuild(self) -> None:
        """The model's structure changed (parameters were replaced): the handler the driver installed carries the
        optimizer over to the new parameters and lets the training loop follow (DDP wrapper, memory format)."""
        if self.structure_changed is not None:
            self.structure_changed()
