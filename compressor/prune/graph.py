"""Dependency groups through torch-pruning (DepGraph): which channels are coupled, which layers are ignored, and
which parametrised layers cannot be pruned and why. We never trace dependencies ourselves."""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch_pruning as tp
from torch import nn

from compressor.errors import NotPrunableError, RecipeError
from compressor.models.attention import embed_tensors, prune_embed
from compressor.models.layers import is_depthwise
from compressor.prune.limits import LimitExceeded, default_memory_growth, limited
from compressor.registry import did_you_mean

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def resolve_ignored(model: nn.Module, patterns: Iterable[str], example: torch.Tensor) -> list[nn.Module]:
    """Modules never pruned: recipe names and re:patterns, the model's own `protected_modules()` (detector and
    segmenter predictors), plus the output layers (output_layers: the classifier, whose outputs are the classes)."""
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
    # a task model's predictors (box / class / mask heads, DFL: compressor/models' detector and segmenter wrappers)
    protected = getattr(model, "protected_modules", None)
    for name in protected() if callable(protected) else ():
        if name in names and names[name] not in ignored:
            ignored.append(names[name])
    for module in output_layers(model, example):
        if module not in ignored:
            ignored.append(module)
    return ignored


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The layers (ROOT_TYPES) whose outputs reach the model's outputs with no other such layer in between, found
    on one forward of `example` in eval mode: a classifier with whatever follows it (pooling, upsampling, a
    reshape, a sum of two heads), the main head of a segmentation model. A layer that only feeds an unused or
    training-only output (an auxiliary head) is not one; nor is a layer that merely has num_classes outputs."""
    produced: dict[object, nn.Module] = {}  # autograd node of each layer output -> the layer

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced[output.grad_fn] = module

    frozen = [p for p in model.parameters() if not p.requires_grad]  # every layer output needs an autograd node
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, ROOT_TYPES)]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with quiet_eval(model), torch.enable_grad():
            outputs = model(example.detach().requires_grad_(example.is_floating_point()))
    finally:
        for hook in hooks:
            hook.remove()
        for p in frozen:
            p.requires_grad_(False)
    found: set[nn.Module] = set()
    seen: set[object] = set()
    stack = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in produced:  # a layer's output: the layer is an output layer, and nothing before it
            found.add(produced[node])
            continue
        stack += [child for child, _ in node.next_functions if child is not None]
    return [m for m in model.modules() if m in found]


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, or those in a tuple, list or dict (or a dataclass-like output)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "to_tuple"):  # transformers' ModelOutput
        value = list(value.to_tuple())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


class _OpaqueAttention(tp.pruner.function.BasePruningFunc):
    """Makes a custom attention layer one node of the dependency graph, with its input and output widths.

    torch-pruning's index mapping does not terminate through the window partitions and torch.roll of torchvision's
    Swin and MaxViT; seen from outside, the layer is a width-C to width-C map, so it is traced as a leaf. Its widths
    stay (see attention_layers) unless prune.attention.embed unlocks the embedding width of a layer whose q/k/v
    width does not follow it (models/attention.EMBED_FAMILIES): then its q/k/v columns and its output rows (and
    a LayerNorm over its output) lose the residual stream's removed channels."""

    @staticmethod
    def _linears(layer: nn.Module) -> list[nn.Linear]:
        return [m for m in layer.modules() if isinstance(m, nn.Linear)]

    def get_in_channels(self, layer: nn.Module) -> int:  # a head-pruned MultiheadAttention names its width
        return getattr(layer, "embed_dim", None) or self._linears(layer)[0].in_features

    def get_out_channels(self, layer: nn.Module) -> int:
        return getattr(layer, "embed_dim", None) or self._linears(layer)[-1].out_features

    def prune_in_channels(self, layer: nn.Module, idxs):
        raise NotPrunableError(f"the widths of attention layer {type(layer).__name__} are not pruned.")

    def prune_out_channels(self, layer: nn.Module, idxs):
        raise NotPrunableError(f"the widths of attention layer {type(layer).__name__} are not pruned.")


class _ResidualAttention(_OpaqueAttention):
    """An attention layer whose embedding width can go (models/attention.embed_tensors): its input and output are
    one channel space, the residual stream (BERT adds the input inside the layer, before its LayerNorm; ViT and
    DistilBERT outside), so torch-pruning couples them as it couples a norm's (one function for both sides), and
    removing channels removes them from the q/k/v columns and the output rows (and that LayerNorm) at once."""

    def prune_out_channels(self, layer: nn.Module, idxs):
        prune_embed(layer, "in", idxs)
        prune_embed(layer, "out", idxs)
        return layer

    prune_in_channels = prune_out_channels


def _is_attention(module: nn.Module) -> bool:
    """nn.MultiheadAttention, a class named *Attention*, or a layer with `num_heads` and its own projections
    (EdgeNeXt's XCA, other head-split layers)."""
    if isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        return True
    return hasattr(module, "num_heads") and any(isinstance(c, (nn.Linear, nn.Conv2d)) for c in module.children())


def _opaque_attention(model: nn.Module) -> dict[type, tp.pruner.function.BasePruningFunc]:
    """Classes of the outermost custom attention layers with linears (nn.MultiheadAttention is left to
    torch-pruning, which handles it); torch-pruning takes customized pruners by class."""
    opaque: dict[type, tp.pruner.function.BasePruningFunc] = {}
    inside: set[nn.Module] = set()
    for module in model.modules():
        if module in inside or isinstance(module, nn.MultiheadAttention):
            continue
        if _is_attention(module) and _OpaqueAttention._linears(module):
            kind = _ResidualAttention if embed_tensors(module) is not None else _OpaqueAttention
            opaque.setdefault(type(module), kind())
            inside.update(module.modules())
    return opaque


class _WholeGroupNorm(tp.pruner.function.GroupNormPruner):
    """GroupNorm loses whole groups: torch-pruning slices the channels but keeps num_groups, so a 24-channel,
    3-group norm left with 16 channels fails at run time (16 is not divisible by 3). The planner removes channels
    in whole groups (snapshot.norm_group_classes); this pruner lowers num_groups to match."""

    def prune_out_channels(self, layer: nn.GroupNorm, idxs):
        if layer.num_groups == 1:  # one group over all channels (PoolFormer's LayerNorm-like norm): any channels go
            return super().prune_out_channels(layer, idxs)
        per_group = layer.num_channels // layer.num_groups
        lost = {int(i) // per_group for i in idxs}
        if len(lost) * per_group != len(set(int(i) for i in idxs)):
            raise NotPrunableError(f"removing {len(idxs)} channels of a GroupNorm with {layer.num_groups} groups of "
                                   f"{per_group} would split a group.")
        super().prune_out_channels(layer, idxs)
        layer.num_groups -= len(lost)
        return layer

    prune_in_channels = prune_out_channels


def trace(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model` (custom attention layers as leaves, GroupNorm in whole groups)."""
    custom: dict[type, tp.pruner.function.BasePruningFunc] = {
        type(m): _WholeGroupNorm() for m in model.modules() if isinstance(m, nn.GroupNorm)}
    custom.update(_opaque_attention(model))
    return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                 customized_pruners=custom)


@contextlib.contextmanager
def mapped_once(graph: tp.DependencyGraph):
    """Group lookups on an unchanged graph without recomputing its index mappings each time.

    torch-pruning's get_pruning_group recomputes every concat / split / reshape / slice index mapping of the whole
    graph before each lookup (index_mapping.update_index_mapping): on YOLO11n's graph that is about 8 ms of a 8.5 ms
    lookup, and a snapshot makes hundreds of lookups (every group, the coupling probes, the channel slices). The
    mappings only change when a layer's width does, so inside this block, where nothing is removed, they are
    computed once; lookups on any other graph recompute as before. Nothing may be pruned inside the block."""
    module = tp.dependency.index_mapping
    original = module.update_index_mapping
    original(graph)

    def update(other: tp.DependencyGraph) -> None:
        if other is not graph:
            original(other)

    module.update_index_mapping = update
    try:
        yield graph
    finally:
        module.update_index_mapping = original


@contextlib.contextmanager
def quiet_eval(model: nn.Module):
    """Eval mode (BatchNorm statistics do not move) with warnings silenced, for tracing and counting; the model's
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield model
    finally:
        model.train(was_training)


def build_graph(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module]) -> tp.DependencyGraph:
    """Trace the model once with torch-pruning; NotPrunableError when the model cannot be traced."""
    try:
        with quiet_eval(model):
            graph = trace(model, example)
    except Exception as exc:  # torch-pruning raises bare exceptions of many kinds on untraceable models
        raise NotPrunableError(
            f"torch-pruning could not trace the model ({type(exc).__name__}: {exc}).",
            hint="Check model.input_shape and that forward() takes one tensor and returns tensors; if both are "
                 "right, the model uses an op torch-pruning cannot trace (e.g. ShuffleNet's channel shuffle) and "
                 "cannot be pruned structurally (FGGP unstructured or 2:4 still can).",
        ) from exc
    return graph


@dataclass
class GroupInfo:
    """One prunable dependency group: the root layer, its width, and every coupled layer slice."""

    root: str
    width: int
    coupled: list[str] = field(default_factory=list)


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules()}


def attention_layers(model: nn.Module, embed: bool = False) -> dict[nn.Module, str]:
    """Every module inside an attention layer (nn.MultiheadAttention, or a class named *Attention*: torchvision's
    Swin and MaxViT, timm's ViT), mapped to that layer's name. Their widths are tied to the head layout (q/k/v are
    packed and split into heads by reshapes, torchvision's ViT keeps hidden_dim), so groups that touch them are
    not pruned; the rest of the network (MLP hidden widths, convolutions) is. With `embed`, the layer itself is
    left out where its embedding width can go (models/attention.embed_tensors): the residual stream's group, in
    which the layer is one node, becomes prunable; its insides stay locked (their other widths are its heads)."""
    locked: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        if _is_attention(module):
            for sub in module.modules():
                if not (embed and sub is module and module not in locked and embed_tensors(module) is not None):
                    locked.setdefault(sub, name)
    return locked


def grouped_convs(model: nn.Module) -> dict[nn.Module, str]:
    """Grouped convolutions that are not plain depthwise (RegNet, ResNeXt; depthwise with a channel multiplier),
    by name. Removing channels from them would have to keep every group the same size, which torch-pruning's
    channel indices do not (measured: RegNetX-800MF failed in index_select), so groups that touch them are not
    pruned."""
    return {m: name for name, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
            and not is_depthwise(m, with_multiplier=False)}  # depthwise with a multiplier is grouped too


STANDARD_PARAMS = {"weight", "bias"}
PER_CHANNEL_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def custom_layers(model: nn.Module) -> dict[nn.Module, str]:
    """Subclasses of conv / linear / norm layers that own parameters or buffers torch-pruning does not know (a
    weight-standardised conv's `gain`, as in timm's ScaledStdConv2d for NFNets): torch-pruning would slice weight
    and bias and leave the rest at the old width, so their groups are not pruned."""
    found = {}
    for m in model.modules():
        if not isinstance(m, PER_CHANNEL_TYPES) or type(m).__module__.startswith("torch.nn"):
            continue
        extra = sorted({n for n, _ in m.named_parameters(recurse=False)} - STANDARD_PARAMS |
                       {n for n, b in m.named_buffers(recurse=False) if b is not None and b.ndim > 0} -
                       {"running_mean", "running_var"})
        if extra:
            found[m] = (f"custom layer {type(m).__name__} with tensors torch-pruning does not slice "
                        f"({', '.join(extra)})")
    return found


def _locked(model: nn.Module, embed: bool = False) -> dict[nn.Module, str]:
    """Every module whose channels are never pruned (attention_layers, grouped_convs, custom_layers), with the
    reason."""
    reasons = {m: f"part of attention layer {name} (its embedding width stays unless prune.attention.embed; its "
                  "heads: prune.attention.heads)" for m, name in attention_layers(model, embed).items()}
    reasons.update({m: f"grouped convolution (groups={m.groups}; its groups would have to shrink together)"
                    for m in grouped_convs(model)})
    reasons.update({m: f"recurrent layer ({type(m).__name__} hidden widths are not pruned)"
                    for m in model.modules() if isinstance(m, nn.RNNBase)})
    reasons.update(custom_layers(model))
    return reasons


UNSUPPORTED_HINT = ("This architecture is not supported for structured pruning; use method fggp with granularity "
                    "unstructured or 2:4, or prune a convolutional model.")
GROUPING_TIMEOUT_S = 300.0  # ResNet-50 groups in about a second; MaxViT never finishes


def _all_groups(graph: tp.DependencyGraph, ignored: list[nn.Module]) -> list:
    try:
        with warnings.catch_warnings(), limited(GROUPING_TIMEOUT_S, default_memory_growth()):
            warnings.simplefilter("ignore")
            with mapped_once(graph):
                return list(graph.get_all_groups(ignored_layers=list(ignored), root_module_types=ROOT_TYPES))
    except LimitExceeded as exc:
        raise NotPrunableError(
            f"torch-pruning did not finish grouping the coupled channels of {type(graph.model).__name__} {exc}: "
            "its index mapping does not terminate through this architecture's reshapes "
            "(torchvision's MaxViT block and grid partitions are a known case).",
            hint=UNSUPPORTED_HINT) from None
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, RuntimeError, AttributeError,
            MemoryError) as exc:
        raise NotPrunableError(
            f"torch-pruning failed while grouping the coupled channels of {type(graph.model).__name__} "
            f"({type(exc).__name__}: {exc}): its index mapping does not follow this architecture's reshapes or "
            "channel reorderings.",
            hint=UNSUPPORTED_HINT) from None


def prunable_groups(graph: tp.DependencyGraph, ignored: list[nn.Module], *, embed: bool = False) -> list:
    """torch-pruning groups whose root is a conv/linear layer, that touch no ignored layer's outputs and no locked
    layer (see _locked; `embed`: prune.attention.embed), and whose index mapping can be trusted (see
    _index_problem). The layers of groups left out for the last reason are kept in graph.rejected_groups
    ({module: reason}) for `inspect`."""
    locked = _locked(graph.model, embed)
    names = module_names(graph.model)
    kept, rejected = [], {}
    for group in _all_groups(graph, ignored):
        lock = next((i.dep.target.module for i in group if i.dep.target.module in locked), None)
        problem = locked[lock] if lock is not None else _index_problem(graph, group, names)
        if problem is None:
            kept.append(group)
            continue
        if lock is not None:
            continue  # unprunable_layers words the locked couplings itself
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Module) and module not in locked and is_out_handler(item.dep.handler):
                rejected.setdefault(module, problem)
    graph.rejected_groups = rejected
    return kept


def is_out_handler(handler) -> bool:
    """Whether a torch-pruning handler removes output channels (prune_out_channels of any layer kind)."""
    return getattr(handler, "__name__", "").startswith("prune_out")


def _index_problem(graph: tp.DependencyGraph, group, names: dict[nn.Module, str]) -> str | None:
    """Why torch-pruning's channel indices of this group cannot be trusted: an index beyond a member layer's
    width, or a channel split on the way (torch.split / chunk: forward() splits at sizes that pruning does not
    update, as in CSPNet's cross-stage halves, so the branches would get the wrong channels)."""
    root = names.get(group[0].dep.target.module, "?")
    if any(isinstance(item.dep.target.module, tp.ops._SplitOp) for item in group):
        return (f"group {root} passes through a channel split (torch.split / chunk) whose sizes forward() computes "
                "itself; removing channels would hand the branches the wrong ones")
    for item in group:
        module = item.dep.target.module
        pruner = graph.get_pruner_of_module(module) if isinstance(module, nn.Module) else None
        if pruner is None or not list(module.parameters(recurse=False)):
            continue
        width = (pruner.get_out_channels if is_out_handler(item.dep.handler) else pruner.get_in_channels)(module)
        if width is None:
            continue
        idxs = [int(i) for i in item.idxs]
        if idxs and (max(idxs) >= width or min(idxs) < 0):
            return (f"torch-pruning maps the channels of group {root} to index {max(idxs)} of "
                    f"{names.get(module, '?')}, which has {width} (a split or concatenation it cannot follow)")
    return None


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
    covered = {item.dep.target.module for group in groups for item in group  # outputs pruned by a group (a layer
               if item.dep.handler.__name__.startswith("prune_out")}  # only on a group's input side is fixed)
    attention, grouped = attention_layers(model), grouped_convs(model)
    locked = _locked(model)
    rejected = getattr(graph, "rejected_groups", {})
    reasons: dict[str, str] = {}
    for module, name in names.items():
        own = list(module.parameters(recurse=False))
        if not name or not own or module in covered:
            continue
        if module in ignored:
            continue
        if module in locked:
            reasons[name] = locked[module]
            continue
        if module in rejected:
            reasons[name] = rejected[module]
            continue
        if module not in graph.module2node:
            reasons[name] = "not used in forward() of the traced model"
        elif graph.get_pruner_of_module(module) is None:
            reasons[name] = f"no torch-pruning handler for {type(module).__name__} (custom layer)"
        else:
            coupled = _coupled_modules(graph, module)
            lock = next((m for m in coupled if m in locked), None)
            if lock in attention:
                reasons[name] = (f"coupled to attention layer {attention[lock]} (the embedding width it shares "
                                 "stays; the layer's heads: prune.attention.heads)")
            elif lock in grouped:
                reasons[name] = f"coupled to grouped convolution {grouped[lock]} (groups={lock.groups})"
            elif lock is not None:
                reasons[name] = f"coupled to {names.get(lock, '?')}: {locked[lock]}"
            elif any(m in ignored for m in coupled):
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
