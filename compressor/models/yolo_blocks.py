"""Ultralytics' split-and-concat blocks, rewritten so their channels prune (used by compressor.models.yolo).

C2f, C3k2, C2fCIB, C2fPSA, C2, C2PSA, PSA and RepNCSPELAN4/ELAN1 run one conv block (`cv1`) and cut its output in
two with `chunk(2, 1)` or `split((c, c), 1)`: the halves go to different consumers. The cut sizes live in
forward()'s code, so once pruning removed channels of cv1 unevenly, the halves would be cut at the wrong place
(compressor's graph code refuses groups that pass through such a split; see prune/graph._index_problem).

Here each such block is replaced by an equivalent one whose cv1 is a SplitConv: one conv block per half (the same
weights and batch-norm statistics, sliced), so each half is an ordinary layer with its own dependency group and
the concatenation that follows maps indices exactly. Before pruning the outputs are the same (asserted in
tests/test_yolo.py). The replacements keep Ultralytics' bookkeeping attributes (f, i, type, np) and child names,
so DetectionModel runs them unchanged, and the part conv blocks are Ultralytics' own Conv (fuse() folds them).
Blocks of other kinds that split a tensor stay as they are; their groups are left unpruned.
"""
from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn


class SplitConv(nn.Module):
    """Conv blocks that each compute a slice of what one conv block computed: returns their outputs, in order."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [part(x) for part in self.parts]


class SplitC2f(nn.Module):
    """C2f / C3k2 / C2fCIB / C2fPSA: y = [a, b]; each block of m takes the last of y; cv2 takes them all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SplitELAN(nn.Module):
    """RepNCSPELAN4 / ELAN1: the C2f pattern with the two stages cv2, cv3 and the output conv cv4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x))
        y.extend(m(y[-1]) for m in (self.cv2, self.cv3))
        return self.cv4(torch.cat(y, 1))


class SplitC2(nn.Module):
    """C2: a goes through m, b is carried over."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x)
        return self.cv2(torch.cat((self.m(a), b), 1))


class SplitC2PSA(nn.Module):
    """C2PSA: a is carried over, b goes through the PSA blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x)
        return self.cv2(torch.cat((a, self.m(b)), 1))


class SplitPSA(nn.Module):
    """PSA: a is carried over, b gets attention and a feed-forward block, each with a residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(torch.cat((a, b), 1))


def _replacements() -> dict:
    """{original forward function: replacement class}: a subclass that keeps its parent's forward is replaced too
    (C3k2 is a C2f with other inner blocks); one that overrides forward (C2fAttn) is not."""
    from ultralytics.nn.modules import block

    pairs = {"C2f": SplitC2f, "RepNCSPELAN4": SplitELAN, "C2": SplitC2, "C2PSA": SplitC2PSA, "PSA": SplitPSA}
    return {getattr(block, name).forward: cls for name, cls in pairs.items() if hasattr(block, name)}


def split_conv_block(conv: nn.Module, sizes: list[int]) -> SplitConv:
    """Cut an Ultralytics Conv (conv + batch norm + activation; or a fused conv with bias) into one Conv per
    consecutive slice of its output channels, each holding copies of its slice's weights and statistics."""
    width = conv.conv.out_channels
    if sum(sizes) != width:
        raise ValueError(f"slices {sizes} do not add up to the conv's {width} output channels")
    parts, start = [], 0
    for size in sizes:
        drop = [i for i in range(width) if not start <= i < start + size]
        part = copy.deepcopy(conv)
        tp.prune_conv_out_channels(part.conv, drop)
        if isinstance(getattr(part, "bn", None), nn.modules.batchnorm._BatchNorm):
            tp.prune_batchnorm_out_channels(part.bn, drop)
        parts.append(part)
        start += size
    return SplitConv(parts)


def _rebuild(block: nn.Module, cls: type) -> nn.Module:
    new = cls()
    skip = {"c", "forward"}  # c: the split size, stale once pruned (the replacement reads widths from its layers)
    new.__dict__.update({k: v for k, v in vars(block).items() if not k.startswith("_") and k not in skip})
    for name, child in block.named_children():
        setattr(new, name, child)
    width = block.cv1.conv.out_channels
    first = -(-width // 2)  # chunk(2) puts the odd channel in the first half; split((c, c)) has even widths
    new.cv1 = split_conv_block(block.cv1, [first, width - first])
    new.train(block.training)
    return new


def make_prunable(model: nn.Module) -> list[str]:
    """Replace, in place, every split-and-concat block of `model` (an Ultralytics DetectionModel) whose cv1 output
    is cut in two by one with a SplitConv (see the module docstring); returns the replaced blocks' names."""
    table = _replacements()
    replaced = []
    for name, module in list(model.named_modules()):
        cls = table.get(getattr(type(module), "forward", None))
        if cls is None or isinstance(module, cls) or not isinstance(getattr(module, "cv1", None), nn.Module):
            continue
        if not isinstance(getattr(module.cv1, "conv", None), nn.Conv2d):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _rebuild(module, cls))
        replaced.append(name)
    return replaced
