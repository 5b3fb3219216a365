"""Removing decoder layers, key/value groups, MLP channels and hidden channels of a causal LM, in place.

Each removal keeps the model runnable, with and without the KV cache, and keeps `model.config` true where one value
describes every layer (sync_config): the layer count and per-layer lists always, the hidden size always, the head
counts and MLP width while every layer has the same ones. A layer whose widths differ from the config's holds them in
its own modules (Phi-3's attention, which reads num_attention_heads from its config, gets a LayerConfig view), so
per-layer widths run in memory; they do not reload with from_pretrained (reload.config_after says so).
Parameters are replaced through models/attention.keep_index, so prune/lineage follows them (the optimizer).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from compressor.errors import NotPrunableError
from compressor.models.attention import keep_index
from compressor.models.decoder.arch import Arch, Tensor, arch_of, is_conv1d
from compressor.models.slim import fix_attributes


class LayerConfig:
    """One layer's view of the model's shared config with some values of its own (its head counts): every other
    attribute, the attention implementation included, is read from the shared config as it is now."""

    def __init__(self, base, **own) -> None:
        self.__dict__.update(_base=base, _own=dict(own))

    def __getattr__(self, name: str):
        state = self.__dict__  # empty while copy / pickle rebuild the object: no recursion into _base
        if name in state.get("_own", {}):
            return state["_own"][name]
        if "_base" not in state:
            raise AttributeError(name)
        return getattr(state["_base"], name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self._base).__name__}, {self._own})"


def decoder_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(index, module) of every decoder layer, in order."""
    return list(enumerate(arch_of(model).layers))


def _indices(what: str, idxs: Iterable[int], width: int, unit: str) -> list[int]:
    drop = sorted({int(i) for i in idxs})
    if drop and (drop[0] < 0 or drop[-1] >= width):
        bad = drop[0] if drop[0] < 0 else drop[-1]
        raise NotPrunableError(f"{what} has {width} {unit}; cannot remove {unit} {bad}.")
    if len(drop) >= width:
        raise NotPrunableError(f"removing all {width} {unit} of {what} would leave it empty; keep at least one.")
    return drop


def _fix(module: nn.Module) -> None:
    if is_conv1d(module):
        module.nx, module.nf = module.weight.shape
    else:
        fix_attributes(module)


@torch.no_grad()
def _keep(tensors: list[Tensor], drop: list[int]) -> None:
    """Remove the indices whose structure is in `drop` from every tensor, then fix the owners' width attributes."""
    gone = set(drop)
    owners = []
    for owner, attr, dim, of, _ in tensors:
        keep_index(owner, attr, dim, torch.tensor([i for i, s in enumerate(of) if s not in gone], dtype=torch.long))
        if all(o is not owner for o in owners):
            owners.append(owner)
    for owner in owners:
        _fix(owner)


def remove_layers(model: nn.Module, indices: Iterable[int]) -> None:
    """Delete whole decoder layers. The remaining attention layers are renumbered (layer_idx: the KV cache keeps one
    entry per index) and the config follows: num_hidden_layers, layer_types, Qwen2/3's max_window_layers (the layers
    below it use full attention; it becomes the count of kept layers that were below it)."""
    arch = arch_of(model)
    layers = arch.layers
    drop = _indices(arch.layers_path, indices, len(layers), "layers")
    if not drop:
        return
    kept = [i for i in range(len(layers)) if i not in set(drop)]
    arch.layers = nn.ModuleList([layers[i] for i in kept])
    for new, layer in enumerate(arch.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = arch.config
    setattr(config, arch.layers_key, len(kept))
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == len(layers):
        config.layer_types = [types[i] for i in kept]
        if hasattr(arch.base, "has_sliding_layers"):
            arch.base.has_sliding_layers = "sliding_attention" in config.layer_types
    window_layers = getattr(config, "max_window_layers", None)
    if isinstance(window_layers, int):
        config.max_window_layers = sum(1 for i in kept if i < window_layers)
    sync_config(arch)


def remove_kv_groups(model: nn.Module, layer_index: int, groups: Iterable[int]) -> None:
    """Remove key/value groups of decoder layer `layer_index`: a group is one key/value head, its n_rep =
    num_attention_heads / num_key_value_heads query heads (q rows g*n_rep .. g*n_rep + n_rep - 1, in head units), their
    biases, and those query heads' o_proj columns. In a multi-head model (GPT-2, kv heads == heads) a group is a head.
    num_key_value_groups (n_rep) and head_dim do not change."""
    arch = arch_of(model)
    i = _layer(arch, layer_index)
    drop = _indices(f"{arch.layers_path}.{i}.{arch.attn_name}", groups, arch.kv_heads(i), "key/value groups")
    if drop:
        _keep(arch.kv_tensors(i), drop)
        arch.set_kv(i)
        sync_config(arch)


def remove_mlp_channels(model: nn.Module, layer_index: int, channels: Iterable[int]) -> None:
    """Remove intermediate channels of decoder layer `layer_index`'s MLP: gate and up rows (Phi-3: both halves of
    gate_up_proj), their biases, down_proj columns; GPT-2: c_fc columns and bias, c_proj rows (Conv1D, transposed)."""
    arch = arch_of(model)
    i = _layer(arch, layer_index)
    drop = _indices(f"{arch.layers_path}.{i}.{arch.mlp_name}", channels, arch.inter(i), "channels")
    if drop:
        _keep(arch.mlp_tensors(i), drop)
        arch.set_inter(i)
        sync_config(arch)


def remove_hidden_channels(model: nn.Module, channels: Iterable[int], *, rescale_norms: bool = True) -> None:
    """Remove channels of the residual stream: the token (and GPT-2's position) embedding columns, every norm's
    entries, every projection's input columns that read it, o_proj / down_proj rows (and biases) that write it, the
    LM head's columns (a tied head stays tied to the embedding).

    What changes beyond the widths: a norm over the hidden size normalises over the channels it has, so it is a
    different function with fewer of them. With rescale_norms (the default), every RMSNorm over the hidden size is
    rescaled so that removing channels that carry no signal (a channel DPM decayed to zero) is exact: for h of H
    channels kept, x / sqrt(sum(x^2)/h + eps') * w' equals x / sqrt(sum(x^2)/H + eps) * w when
    eps' = eps * H/h and w' = w * sqrt(H/h). The config's rms_norm_eps becomes eps' (what from_pretrained builds every
    norm with), so Qwen3's q_norm/k_norm over the head width take eps' too, a negligible change. Channels that do carry
    signal change every norm's output whatever is done; recovery training absorbs it. LayerNorm (GPT-2) also subtracts
    the mean over its channels, which no rescaling makes exact: removing GPT-2's hidden channels always changes the
    function. head_dim stays fixed (the config's explicit head_dim), so attention keeps its shapes; Llama's config
    requires hidden_size to be a multiple of num_attention_heads to load (reload.config_after checks it)."""
    arch = arch_of(model)
    width = arch.hidden()
    drop = _indices("the hidden size (residual stream)", channels, width, "channels")
    if not drop:
        return
    tied = arch.tied()
    _keep(arch.hidden_tensors(), drop)
    if tied:
        arch.lm_head().weight = arch.embeddings().weight
        _fix(arch.lm_head())
    kept = width - len(drop)
    if rescale_norms:
        _rescale_rms_norms(arch, width / kept)
    setattr(arch.config, arch.hidden_key, kept)
    arch.set_hidden()
    sync_config(arch)


def _rescale_rms_norms(arch: Arch, factor: float) -> None:
    config = arch.config
    old_eps = getattr(config, "rms_norm_eps", None)
    hidden_norms = [n for i in range(len(arch.layers)) for n in arch.layer_norms(i)] + [arch.final_norm()]
    with torch.no_grad():
        for norm in hidden_norms:
            if hasattr(norm, "variance_epsilon") and getattr(norm, "bias", None) is None:
                norm.weight.mul_(math.sqrt(factor))
                norm.variance_epsilon = norm.variance_epsilon * factor
    if isinstance(old_eps, float):
        config.rms_norm_eps = old_eps * factor
        for module in arch.lm.modules():  # other RMSNorms built with the config's eps (Qwen3's q_norm / k_norm)
            if all(module is not n for n in hidden_norms) and getattr(module, "variance_epsilon", None) == old_eps:
                module.variance_epsilon = config.rms_norm_eps


def _layer(arch: Arch, index: int) -> int:
    count = len(arch.layers)
    if not isinstance(index, int) or not 0 <= index < count:
        raise NotPrunableError(f"{arch.layers_path} has {count} decoder layers; there is no layer {index}.")
    return index


def sync_config(arch: Arch) -> None:
    """Write the widths every layer shares into the config; give a layer whose head counts differ from the config's
    a LayerConfig where its forward reads them from the config (Phi-3), and the shared config back otherwise."""
    config, count = arch.config, len(arch.layers)
    setattr(config, arch.hidden_key, arch.hidden())
    if arch.explicit_head_dim:  # Qwen2's and Phi-3's configs derive it from hidden / heads unless it is set
        config.head_dim = arch.head_dim(0)
    for key, values in ((arch.heads_key, [arch.q_heads(i) for i in range(count)]),
                        (arch.kv_key, [arch.kv_heads(i) for i in range(count)]),
                        (arch.inter_key, [arch.inter(i) for i in range(count)])):
        if key is not None and len(set(values)) == 1:
            setattr(config, key, values[0])
    if arch.family != "phi3":
        return
    for i in range(count):
        attn, heads, kv = arch.attn(i), arch.q_heads(i), arch.kv_heads(i)
        if heads == config.num_attention_heads and kv == config.num_key_value_heads:
            attn.config = config
        else:
            attn.config = LayerConfig(config, num_attention_heads=heads, num_key_value_heads=kv)


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: query heads, key/value heads, head width and MLP width (the report's widths)."""
    arch = arch_of(model)
    return [{"heads": arch.q_heads(i), "kv_heads": arch.kv_heads(i), "head_dim": arch.head_dim(i),
             "intermediate": arch.inter(i)} for i in range(len(arch.layers))]
