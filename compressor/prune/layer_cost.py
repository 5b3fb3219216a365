"""How a layer's cost scales with the channels it keeps: the one rule the MAC planner (Snapshot.macs_after,
prune/snapshot.py), the latency-table cost model (prune/latency_cost.py) and the attention heads share.

A layer is described by LayerDims(out, inputs, out_only), its current widths:
- a conv or linear layer computes every kept output from every kept input: its cost is proportional to kept
  outputs x kept inputs. A grouped conv keeps its group count (torch-pruning removes channels group-wise), so each
  output's input slice shrinks with the kept inputs: the same rule;
- a depthwise conv's inputs are its outputs, removed together, and a norm layer has one side: their cost follows
  the kept outputs alone (out_only);
- an attention layer that the op counter counts as one layer (torch's MultiheadAttention, timm's Attention) has
  its inner width (heads x head_dim) as `out` and the embedding width as `inputs`: all its MACs scale with the heads
  it keeps (out_only).
The MAC planner applies this to a layer's counted MACs; the latency model to a measured curve, whose time at kept
outputs replaces the output factor (latency does not follow the width linearly), times the same input factor.

Importing this module does not import torch (the latency-table model is used beside the torch-free bench).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

if TYPE_CHECKING:
    from torch import nn


class LayerDims(NamedTuple):
    out: int
    inputs: int
    out_only: bool  # the cost follows the kept outputs alone (depthwise conv, norm, attention counted whole)


def input_factor(dims: tuple[int, int, bool], kept_in: float) -> float:
    """The fraction of the layer's cost that its kept inputs leave (1 where the cost follows the outputs alone)."""
    _, inputs, out_only = dims
    return 1.0 if out_only else max(kept_in, 0.0) / max(inputs, 1)


def kept_fraction(dims: tuple[int, int, bool], removed_out: float = 0.0, removed_in: float = 0.0) -> float:
    """The fraction of the layer's cost left after it loses `removed_out` outputs and `removed_in` inputs."""
    out, inputs, _ = dims
    return (1 - removed_out / max(out, 1)) * input_factor(dims, inputs - removed_in)


def channel_share(dims: tuple[int, int, bool], side: str) -> float:
    """The fraction of the layer's cost one channel of `side` ("out" or "in") carries: 1/out for an output, 1/in
    for an input, and 0 for an input of a layer whose cost follows its outputs alone (its output side prices it)."""
    out, inputs, out_only = dims
    if side == "out":
        return 1 / max(out, 1)
    return 0.0 if out_only else 1 / max(inputs, 1)


def layer_dims(module: "nn.Module", *, attention: bool = True) -> Optional[LayerDims]:
    """The LayerDims of a conv, linear or batch-norm layer, and with `attention` of an attention layer whose heads
    can be removed (models/attention.attention_family); None for any other module."""
    from torch import nn

    from compressor.models.layers import is_depthwise

    if isinstance(module, nn.modules.conv._ConvNd):
        return LayerDims(module.out_channels, module.in_channels, is_depthwise(module))
    if isinstance(module, nn.Linear):
        return LayerDims(module.out_features, module.in_features, False)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return LayerDims(module.num_features, module.num_features, True)
    return attention_dims(module) if attention else None


def attention_dims(module: "nn.Module") -> Optional[LayerDims]:
    """(inner width, embedding width, out_only) of a supported attention layer, None for any other module."""
    from compressor.models.attention import attention_family, head_layout

    family, _ = attention_family(module)
    if family is None:
        return None
    layout = head_layout(module, family)
    consumer = module.get_submodule(layout.consumer)
    return LayerDims(layout.heads * layout.head_dim, int(consumer.out_features), True)
