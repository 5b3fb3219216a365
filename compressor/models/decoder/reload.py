"""Whether a pruned decoder LM is an ordinary Hugging Face model again (config_after), and which head counts keep it
one (allowed_head_counts, check_head_ratio).

`save_pretrained` writes one config for all layers, and `AutoModelForCausalLM.from_pretrained` builds every layer
from it, so only a model whose layers share their widths (prune.decoder.uniform: true) reloads there, in vLLM or TensorRT-LLM.
A model with per-layer widths runs in memory; saving it needs a per-layer format of its own (not written yet).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from compressor.errors import RecipeError
from compressor.models.decoder.arch import FAMILIES, Arch, arch_of
from compressor.models.decoder.surgery import sync_config


def config_after(model: nn.Module):
    """The model's config, made consistent with its widths (num_hidden_layers, hidden_size, num_attention_heads,
    num_key_value_heads, intermediate_size, an explicit head_dim) and checked to rebuild exactly this model: what
    `type(model)(config)` builds (on the meta device) has the same tensor shapes and the same attention settings
    (head width, scaling, layer_idx). Then save_pretrained + AutoModelForCausalLM.from_pretrained, in a process that
    never imports compressor, gives the same logits.

    RecipeError when it cannot: layers with different widths (per-layer widths do not reload with from_pretrained;
    prune.decoder.uniform: true keeps them equal), a config the family's own validation refuses (Llama: hidden_size must be a
    multiple of num_attention_heads), or a family whose config cannot express the widths (GPT-2 derives the head width
    as n_embd / n_head, so heads or hidden channels removed alone do not reload)."""
    arch = arch_of(model)
    sync_config(arch)
    _check_uniform(arch)
    config = arch.config
    problem = config_problem(config)
    if problem:
        raise RecipeError(f"the pruned {type(arch.lm).__name__} does not reload with from_pretrained: its config "
                          f"is invalid for transformers ({problem}).",
                          hint=_hint(arch))
    _check_rebuild(arch)
    return config


def _check_uniform(arch: Arch) -> None:
    count = len(arch.layers)
    widths = {"query heads": [arch.q_heads(i) for i in range(count)],
              "key/value heads": [arch.kv_heads(i) for i in range(count)],
              "MLP width": [arch.inter(i) for i in range(count)]}
    differ = {what: values for what, values in widths.items() if len(set(values)) > 1}
    if differ:
        listed = "; ".join(f"{what} per layer {values}" for what, values in differ.items())
        raise RecipeError(
            f"the pruned {type(arch.lm).__name__} has layers of different widths ({listed}). A Hugging Face config "
            "holds one width per kind for every layer, so save_pretrained + from_pretrained (and vLLM, TensorRT-LLM) "
            "cannot rebuild it.",
            hint="Set prune.decoder.uniform: true (the default) to remove the same number of heads and channels from every "
                 "layer; per-layer widths stay usable in memory and in compressor's own checkpoints.")


def config_problem(config, **changes) -> Optional[str]:
    """The family's own config validation of `config` with `changes` applied (a copy): the message, or None."""
    probe = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(probe, key, value)
    validate = getattr(probe, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as exc:  # transformers raises ValueError wrapped in huggingface_hub's StrictDataclass errors
        return " ".join(str(exc).split())
    return None


def _check_rebuild(arch: Arch) -> None:
    lm, config = arch.lm, arch.config
    try:
        with torch.device("meta"):
            fresh = type(lm)(copy.deepcopy(config))
    except Exception as exc:  # the modeling code refuses the config (GPT-2: n_embd not a multiple of n_head)
        raise RecipeError(f"the pruned {type(lm).__name__}'s config does not build the model again "
                          f"({type(exc).__name__}: {exc}).", hint=_hint(arch)) from None
    ours = {name: tuple(t.shape) for name, t in lm.state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            raise RecipeError(
                f"the pruned {type(lm).__name__} does not reload with from_pretrained: its config builds {name} with "
                f"shape {theirs.get(name)}, the pruned model has {ours.get(name)}.", hint=_hint(arch))
    fresh_arch = type(arch)(fresh)
    for i in range(len(arch.layers)):
        for attr in ("head_dim", "scaling", "num_key_value_groups", "layer_idx", "sliding_window", "split_size"):
            a, b = getattr(arch.attn(i), attr, None), getattr(fresh_arch.attn(i), attr, None)
            if a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-12 * abs(a)):
                raise RecipeError(
                    f"the pruned {type(lm).__name__} does not reload with from_pretrained: its config gives layer "
                    f"{i}'s attention {attr} = {b}, the pruned model has {a}.", hint=_hint(arch))


def _hint(arch: Arch) -> str:
    if arch.family == "gpt2":
        return ("GPT-2's config has no head_dim: from_pretrained derives the head width as n_embd / n_head and "
                "recomputes scale_attn_by_inverse_layer_idx from each layer's new index. Prune GPT-2's layers (without "
                "scale_attn_by_inverse_layer_idx) and MLP width when it must reload; heads or hidden size only where "
                "n_embd / n_head stays the head width.")
    return ("Choose head and hidden counts the config accepts (reload.allowed_head_counts lists the head counts) and "
            "keep prune.decoder.uniform: true.")


# ---------------------------------------------------------------------------------------------- head counts
def _heads(config) -> tuple[int, int, int, int]:
    """(query heads, key/value heads, head width, hidden size) of a config."""
    heads, hidden = int(config.num_attention_heads), int(config.hidden_size)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv, int(head_dim), hidden


def allowed_head_counts(config, hidden_size: Optional[int] = None) -> list[tuple[int, int]]:
    """(key/value groups, query heads) every layer may keep, fewest first: whole key/value groups (a key/value head
    goes with its num_attention_heads / num_key_value_heads query heads), at least one, that the config's own
    validation accepts (Llama: hidden_size a multiple of num_attention_heads) and whose head width the config can
    express (GPT-2: n_embd / n_head must stay the head width, so only the unpruned count). hidden_size: the hidden
    size the model will have (when the plan also removes hidden channels; the config's by default)."""
    heads, kv, head_dim, hidden = _heads(config)
    hidden = hidden if hidden_size is None else int(hidden_size)
    rep = heads // kv
    family = FAMILIES.get(getattr(config, "model_type", None))
    allowed = []
    for k in range(1, kv + 1):
        if family == "gpt2":
            if k * head_dim == hidden:
                allowed.append((k, k))
            continue
        changes = {"num_attention_heads": k * rep, "head_dim": head_dim, "hidden_size": hidden}
        if getattr(config, "num_key_value_heads", None) is not None:
            changes["num_key_value_heads"] = k
        if config_problem(config, **changes) is None:
            allowed.append((k, k * rep))
    return allowed


def check_head_ratio(config, ratio: float, *, field: str = "the attention heads' prune ratio",
                     hidden_size: Optional[int] = None) -> int:
    """The key/value groups each layer keeps when `ratio` of the heads are removed; RecipeError naming the nearest
    allowed counts when ratio x key/value groups is not a whole number of groups that allowed_head_counts accepts."""
    heads, kv, _, _ = _heads(config)
    rep = heads // kv
    allowed = allowed_head_counts(config, hidden_size)
    keep = kv * (1.0 - float(ratio))
    if abs(keep - round(keep)) < 1e-6 and any(k == round(keep) for k, _ in allowed):
        return int(round(keep))
    below = [a for a in allowed if a[0] < keep]
    above = [a for a in allowed if a[0] > keep]
    nearest = ([below[-1]] if below else []) + ([above[0]] if above else [])
    options = " or ".join(f"keep {k} key/value group{'s' if k > 1 else ''} ({q} query heads; ratio {1 - k / kv:g})"
                          for k, q in nearest)
    why = (f"{ratio:g} of {kv} key/value groups is {kv * float(ratio):g} groups, not a whole number"
           if abs(keep - round(keep)) >= 1e-6 else
           f"keeping {round(keep)} of {kv} key/value groups is not a head count this config accepts")
    layout = (f"{kv} key/value heads with {rep} query heads each (grouped-query attention: a key/value head and its "
              f"query heads are removed together)" if rep > 1 else f"{heads} heads")
    raise RecipeError(
        f"{field} {ratio:g} cannot be met on {getattr(config, 'model_type', 'this model')}: each layer has {layout}, "
        f"and {why}. The nearest allowed: {options or 'none (the model keeps all its heads)'}.",
        hint="Set the ratio to one of those, or prune the MLP width or layers instead.")
