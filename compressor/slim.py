"""Physical slimming support: reshape a freshly built model to a pruned model's widths, save and reload slim models."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def _resize_tensors(module: nn.Module, prefix: str, state: Mapping[str, torch.Tensor]) -> bool:
    """Give the module's own parameters and buffers the shapes stored in `state`; True if any changed."""
    changed = False
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        key = f"{prefix}{name}"
        if tensor is None or key not in state or state[key].shape == tensor.shape:
            continue
        new = torch.empty(state[key].shape, dtype=tensor.dtype, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            module._buffers[name] = new
        changed = True
    return changed


def _fix_attributes(module: nn.Module) -> None:
    """Update the width attributes that forward() and repr() read, after the tensors were resized."""
    if isinstance(module, nn.modules.conv._ConvNd):
        out_ch, in_per_group = module.weight.shape[:2]
        transposed = module.transposed
        if transposed:
            in_per_group, out_ch = out_ch, in_per_group
        depthwise = module.groups > 1 and module.groups == module.in_channels
        if depthwise and not transposed and in_per_group == 1:
            module.groups = out_ch
        module.out_channels = out_ch * (module.groups if transposed else 1)
        module.in_channels = in_per_group * (1 if transposed else module.groups)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]


def conform_to_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Resize `model`'s layers in place so `state` (from a pruned copy of the same arch) loads strictly.

    Returns the names of the modules that changed width.
    """
    changed = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if _resize_tensors(module, prefix, state):
            _fix_attributes(module)
            changed.append(name)
    return changed
