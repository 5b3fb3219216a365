"""Facts about single layers that several stages ask."""
from __future__ import annotations

import itertools

import torch
from torch import nn


def is_depthwise(module: nn.Module, *, with_multiplier: bool = True) -> bool:
    """A convolution whose every group sees one input channel (groups == in_channels > 1). with_multiplier=False
    also asks for as many outputs as inputs (no channel multiplier)."""
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups <= 1 or module.groups != module.in_channels:
        return False
    return with_multiplier or module.out_channels == module.in_channels


def set_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model's 4-D parameters and buffers (Conv2d weights) in channels-last, or back in contiguous memory;
    tensors of other ranks stay as they are. `model.to(memory_format=torch.channels_last)` raises "required rank 4
    tensor to use channels_last format" on a Conv3d's 5-D weight, which models such as timm's lambda_resnet26t
    hold beside their Conv2d layers. Returns the model."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.dim() == 4 or (not channels_last and tensor.dim() == 5):  # the ranks Module.to converts
                tensor.data = tensor.data.contiguous(memory_format=fmt)
    return model
