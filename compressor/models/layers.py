"""Facts about single layers that several stages ask."""
from __future__ import annotations

from torch import nn


def is_depthwise(module: nn.Module, *, with_multiplier: bool = True) -> bool:
    """A convolution whose every group sees one input channel (groups == in_channels > 1). with_multiplier=False
    also asks for as many outputs as inputs (no channel multiplier)."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups <= 1 or module.groups != module.in_channels:
        return False
    return with_multiplier or module.out_channels == module.in_channels
