"""Attention heads as a structure kind beside channels (`prune.attention.heads`, docs/heads.md).

A head of an attention layer is its rows of the q, k and v projections and its columns of the output projection.
Removing whole heads leaves the layer's input and output (the embedding width) unchanged, so a head structure is
local to its layer: torch-pruning's dependency graph keeps treating the attention layer as one node whose widths
are fixed (prune/graph.py), and this module finds the heads, gives the planner their slices and MACs, and removes
them. Each layer keeps its own head count.

Layer families (models/attention.attention_family, which also knows each family's tensors, HeadLayout):
- `qkv`: one packed q/k/v Linear `qkv` (rows laid out [3, heads, head_dim]), an output Linear `proj`, integer
  `num_heads` and `head_dim`, and `attn_dim` when the inner width may differ from the embedding: timm's ViT,
  DeiT, BEiT-style Attention. An optional `norm` over the inner width and a `gate` Linear lose the head's entries.
- `mha`: torch's nn.MultiheadAttention with the packed projection (torchvision's ViT), replaced on removal by
  models/attention.HeadPrunedMultiheadAttention, which holds the same parameters with fewer heads.
- `sep`: Hugging Face layers with separate q/k/v projections (BERT, RoBERTa, DistilBERT, ViT, DeiT, and with
  their per-head position-bias entries BEiT, Data2Vec-Vision, Swin, Swin v2).
- `window`: timm's and torchvision's Swin window attention.
Attention layers of other shapes (grouped-query attention, a position bias shared by every layer) keep their heads;
`unsupported_sites` says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from compressor.errors import NotPrunableError
from compressor.models.attention import (HEAD_SUFFIX, HeadLayout, attention_family, attention_modules, head_count,
                                         head_layout, head_width, keep_index, replace_mha, set_head_count)
from compressor.prune.importance import Slice


def head_root(name: str) -> str:
    """The planner's root name of the heads of attention layer `name`."""
    return f"{name}{HEAD_SUFFIX}"


def is_head_root(root: Optional[str]) -> bool:
    return root is not None and root.endswith(HEAD_SUFFIX)


def layer_of(root: str) -> str:
    return root[: -len(HEAD_SUFFIX)]


@dataclass
class HeadSite:
    """One attention layer whose heads can be removed."""

    name: str
    module: nn.Module
    family: str  # "qkv" | "mha" | "sep" (models/attention.attention_family)

    @property
    def layout(self) -> HeadLayout:
        return head_layout(self.module, self.family)

    @property
    def num_heads(self) -> int:
        return head_count(self.module, self.family)

    @property
    def head_dim(self) -> int:
        return head_width(self.module, self.family)

    def inner_heads(self) -> list[int]:
        """The head of every inner channel (the output projection's columns)."""
        return [c // self.head_dim for c in range(self.num_heads * self.head_dim)]

    def slices(self, out_only: bool = True) -> list[tuple[Slice, list[int]]]:
        """(Slice, head of each row) pairs: the q/k/v rows and biases and the other per-head entries that define a
        head's output, and unless out_only the output projection's columns (as a channel's: producer rows first)."""
        return [(Slice(getattr(owner, attr), dim, list(range(len(heads))), output), heads)
                for owner, attr, dim, heads, output in self.layout.tensors if output or not out_only]

    def members(self, layer_macs: dict[str, float]) -> list[tuple[str, str, list[int], int]]:
        """The planner's members (layer, side, head of each index, count) for the MAC model: the layer itself where
        the op counter counts it as one (nn.MultiheadAttention, timm's Attention: all its MACs scale with the heads
        kept, layer_cost.attention_dims), else its q/k/v rows and output projection columns."""
        inner = self.inner_heads()
        if self.name in layer_macs:
            return [(self.name, "out", inner, len(inner))]
        layout = self.layout
        found = [(f"{self.name}.{rel}", "out", heads, len(heads)) for rel, heads in layout.producers]
        return found + [(f"{self.name}.{layout.consumer}", "in", inner, len(inner))]

    def remove(self, heads: list[int]) -> nn.Module:
        """Remove `heads` (indices into the current heads) in place; returns the module now in the model (an mha
        becomes a HeadPrunedMultiheadAttention)."""
        drop = sorted({int(h) for h in heads})
        if not drop:
            return self.module
        if drop[0] < 0 or drop[-1] >= self.num_heads:
            raise NotPrunableError(f"{self.name} has {self.num_heads} heads; cannot remove head {drop[-1]}.")
        if len(drop) >= self.num_heads:
            raise NotPrunableError(f"removing all {self.num_heads} heads of {self.name} would leave it empty.")
        gone = set(drop)
        module = self.module
        if self.family == "mha" and isinstance(module, nn.MultiheadAttention):
            module = replace_mha(module, self.num_heads)
        layout = head_layout(module, self.family)
        with torch.no_grad():
            for owner, attr, dim, of, _ in layout.tensors:
                keep_index(owner, attr, dim, torch.tensor([i for i, h in enumerate(of) if h not in gone]))
        set_head_count(module, self.family, layout.heads - len(gone))
        self.module = module
        return module


def head_sites(model: nn.Module, ignored: tuple[nn.Module, ...] = (), *, prunable: bool = True) -> list[HeadSite]:
    """Every attention layer of `model` whose heads can be removed, except those in `ignored` and (with
    prunable) those down to a single head."""
    return [HeadSite(name, module, family) for name, module, family, _ in attention_modules(model)
            if family is not None and module not in ignored and (not prunable or head_count(module, family) > 1)]


def unsupported_sites(model: nn.Module) -> dict[str, str]:
    """Attention layers whose heads stay, by name, with the reason (for `inspect` and the report)."""
    return {name: f"{type(module).__name__}: {reason}" for name, module, family, reason in attention_modules(model)
            if family is None}


def site_of(model: nn.Module, root: str) -> HeadSite:
    name = layer_of(root)
    module = model.get_submodule(name)
    # as attention_modules sees it: a position bias its parent keeps beside it is its own, a shared one refuses
    family, reason = next(((f, r) for _, m, f, r in attention_modules(model) if m is module), attention_family(module))
    if family is None:
        raise NotPrunableError(f"{name} ({type(module).__name__}) is not an attention layer whose heads can be "
                               f"removed: {reason or 'not an attention layer'}.")
    return HeadSite(name, module, family)


def remove_heads(model: nn.Module, root: str, heads: list[int]) -> None:
    """Remove `heads` of the attention layer of `root` (head_root(name)) in place, replacing the module in its
    parent where the family needs another class."""
    site = site_of(model, root)
    new = site.remove(heads)
    if new is not site.module or new is not model.get_submodule(site.name):
        parent_name, _, attr = site.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)


def head_counts(model: nn.Module) -> dict[str, int]:
    """Heads kept per supported attention layer, by head_root name (the report's widths)."""
    return {head_root(s.name): s.num_heads for s in head_sites(model, prunable=False)}
