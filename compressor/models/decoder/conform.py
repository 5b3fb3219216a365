"""A dense decoder LM made to hold a pruned copy's state dict (models/slim.conform_to_state_dict: a resumed run,
compressor.Pruner's resume): the layers the state lacks go first, the tensors are resized generically, then what
forward() and the config read follows the new widths.

A state dict does not say which layers were removed, only how many remain (their weights are the kept layers',
renumbered), so the dense model's last layers are the ones dropped: exact wherever the layers differ only by their
weights (Llama, Mistral, Phi-3, GPT-2 without scale_attn_by_inverse_layer_idx, Qwen2/3 without sliding-window
layers); per-layer attention types (Qwen2's max_window_layers, layer_types) follow the first layers.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import nn

from compressor.errors import NotPrunableError
from compressor.models.decoder.arch import Arch, arch_of, is_conv1d
from compressor.models.decoder.surgery import _rescale_rms_norms, remove_layers, sync_config


class DecoderConform:
    """The decoder LM's state before the generic resize (finish() makes its attributes follow)."""

    def __init__(self, model: nn.Module, arch: Arch) -> None:
        self.model, self.arch = model, arch
        self.tied, self.hidden = arch.tied(), arch.hidden()

    def finish(self) -> list[str]:
        """After the tensors took the state's shapes: re-tie a tied LM head, fix Conv1D widths, set the head
        counts, MLP and hidden widths forward() reads, the RMSNorm epsilon a hidden-size removal rescaled
        (surgery.remove_hidden_channels), and the config."""
        arch = self.arch
        if self.tied and arch.lm_head() is not None:
            arch.lm_head().weight = arch.embeddings().weight
        for module in self.model.modules():
            if is_conv1d(module):
                module.nx, module.nf = module.weight.shape
        for i in range(len(arch.layers)):
            arch.set_kv(i)
            arch.set_inter(i)
        changed = []
        if arch.hidden() != self.hidden:
            with torch.no_grad():  # the weights come from the state dict; only the epsilon stays
                _rescale_rms_norms(arch, self.hidden / arch.hidden())
            setattr(arch.config, arch.hidden_key, arch.hidden())
            arch.set_hidden()
            changed.append(f"{arch.prefix.rstrip('.')}:hidden")
        sync_config(arch)
        return changed


def start_conform(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[DecoderConform]:
    """None for a model that is no supported decoder LM; else drop the layers `state` lacks (the last ones) and
    return what finishes the conform after the tensors were resized."""
    try:
        arch = arch_of(model)
    except NotPrunableError:
        return None
    pattern = re.compile(re.escape(f"{arch.prefix}{arch.layers_path}.") + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state for m in [pattern.match(key)] if m}
    if indices and max(indices) + 1 < len(arch.layers):
        remove_layers(model, range(max(indices) + 1, len(arch.layers)))
    return DecoderConform(model, arch)
