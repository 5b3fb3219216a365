"""Slice: the rows of one parameter that belong to a pruning structure (a channel, an attention head, a decoder
layer's residual outputs). A plain record below every subpackage, so the model-side structure code
(models/decoder) and the planner's scorers (prune/importance.py) share it without models importing prune."""
from __future__ import annotations

import torch


class Slice:
    """Rows (`dim`, `idxs`) of one parameter that belong to a structure."""

    __slots__ = ("param", "dim", "idxs", "output")

    def __init__(self, param: torch.Tensor, dim: int, idxs: list[int], output: bool) -> None:
        self.param, self.dim, self.idxs, self.output = param, dim, idxs, output
