"""Dependency groups through torch-pruning (DepGraph): which channels are coupled, which layers are ignored, and
which parametrised layers cannot be pruned and why. We never trace dependencies ourselves."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn

from .errors import NotPrunableError, RecipeError
from .registry import did_you_mean

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def resolve_ignored(model: nn.Module, patterns: Iterable[str], num_classes: int | None = None) -> list[nn.Module]:
    """Modules never pruned: recipe names and re:patterns, plus the classifier (its outputs are the classes)."""
    names = {name: module for name, module in model.named_modules() if name}
    ignored: list[nn.Module] = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
            hits = [m for n, m in names.items() if regex.fullmatch(n)]
        else:
            hits = [names[pattern]] if pattern in names else []
        if not hits:
            hint = did_you_mean(pattern, tuple(names)) if not pattern.startswith("re:") else ""
            raise RecipeError(f"model.ignore: {pattern!r} matches no module of the model{hint}.",
                              hint="`compressor inspect` lists the module names.")
        ignored += [m for m in hits if m not in ignored]
    for module in output_layers(model, num_classes):
        if module not in ignored:
            ignored.append(module)
    return ignored


def output_layers(model: nn.Module, num_classes: int | None) -> list[nn.Module]:
    """Layers whose outputs are the model's outputs: Linear (or 1x1 conv) heads producing num_classes."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and (num_classes is None or m.out_features == num_classes)]
    if not heads:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes]
        heads = convs[-1:]
    return heads[-1:] if num_classes is None else heads


def build_graph(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module]) -> tp.DependencyGraph:
    """Trace the model once with torch-pruning; NotPrunableError when the model cannot be traced."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as exc:  # torch-pruning raises bare exceptions of many kinds on untraceable models
        raise NotPrunableError(
            f"torch-pruning could not trace the model ({type(exc).__name__}: {exc}).",
            hint="Check model.input_shape, and that forward() takes one tensor and returns tensors.",
        ) from None
    finally:
        model.train(was_training)
    return graph


@dataclass
class GroupInfo:
    """One prunable dependency group: the root layer, its width, and every coupled layer slice."""

    root: str
    width: int
    coupled: list[str] = field(default_factory=list)


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules()}


def prunable_groups(graph: tp.DependencyGraph, ignored: list[nn.Module]) -> list:
    """torch-pruning groups whose root is a conv/linear layer and that touch no ignored layer's outputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(graph.get_all_groups(ignored_layers=list(ignored), root_module_types=ROOT_TYPES))


def describe_group(group, names: dict[nn.Module, str]) -> GroupInfo:
    root = group[0].dep.target.module
    width = len(group[0].idxs)
    coupled = []
    for item in group:
        module = item.dep.target.module
        name = names.get(module)
        if name is None or name in coupled:
            continue
        kind = "out" if item.dep.handler.__name__.startswith("prune_out") else "in"
        coupled.append(f"{name}({kind})")
    return GroupInfo(root=names.get(root, "?"), width=width, coupled=coupled)


def unprunable_layers(model: nn.Module, graph: tp.DependencyGraph, groups: list,
                      ignored: list[nn.Module]) -> dict[str, str]:
    """Parametrised layers whose outputs no group can prune, each with the reason."""
    names = module_names(model)
    covered = {item.dep.target.module for group in groups for item in group}
    reasons: dict[str, str] = {}
    for module, name in names.items():
        own = list(module.parameters(recurse=False))
        if not name or not own or module in covered:
            continue
        if module in ignored:
            continue
        if module not in graph.module2node:
            reasons[name] = "not used in forward() of the traced model"
        elif graph.get_pruner_of_module(module) is None:
            reasons[name] = f"no torch-pruning handler for {type(module).__name__} (custom layer)"
        elif any(m in ignored for m in _coupled_modules(graph, module)):
            reasons[name] = "coupled to an ignored layer"
        else:
            reasons[name] = "only input-side coupling (its outputs are fixed by another constraint)"
    for param in getattr(graph, "unwrapped_parameters", []) or []:
        pname = graph._param_to_name.get(param.parameters, "?") if hasattr(param, "parameters") else "?"
        reasons[pname] = "bare nn.Parameter outside a standard layer (torch-pruning guesses its pruning dim)"
    return reasons


def _coupled_modules(graph: tp.DependencyGraph, module: nn.Module) -> list[nn.Module]:
    pruner = graph.get_pruner_of_module(module)
    if pruner is None or pruner.get_out_channels(module) is None:
        return []
    group = graph.get_pruning_group(module, pruner.prune_out_channels, [0])
    return [item.dep.target.module for item in group]


def require_prunable(groups: list, model_name: str = "the model") -> None:
    if not groups:
        raise NotPrunableError(
            f"{model_name} has no prunable dependency group: every conv/linear output is ignored, fixed or "
            "not traceable.",
            hint="Run `compressor inspect` to see why, and shorten model.ignore if it lists too much.",
        )
