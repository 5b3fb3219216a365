"""Selection mechanics shared by every method: score the dependency groups, choose the channels that reach a
target (remaining MACs, MAC speedup or channel ratio) under round_to / max_layer_ratio, and remove them.

MAC targets are met by bisection on a per-layer cost model: a conv/linear layer's MACs scale with its kept output
and input fractions (depthwise convs with the output fraction only), a norm layer's with its kept channels; the
small rest (activations, pooling) is held fixed, so the model never underestimates what remains.
The model itself is only touched by `remove()`; plans are {root layer name: channel indices}, so they survive
across graph rebuilds (torch-pruning groups do not survive a prune).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch_pruning as tp
from torch import nn

from . import graph as dg
from .errors import NotPrunableError
from .importance import Scorer, _is_out

Plan = dict[str, list[int]]


@dataclass
class Candidate:
    """One prunable group of the current model: its root layer, scores and which layers it narrows."""

    root: str
    width: int
    scores: torch.Tensor  # per-channel importance (normalised to mean 1 unless snapshot(normalize=False))
    members: list[tuple[str, str, list[int]]]  # (layer, "out"|"in", root index of each member index)


@dataclass
class Snapshot:
    """The model's groups and per-layer MAC costs at one moment."""

    candidates: list[Candidate]
    layer_macs: dict[str, float]
    layer_dims: dict[str, tuple[int, int, bool]]  # name -> (out, in, depthwise)
    fixed_macs: float
    total_macs: float
    params: int

    def macs_after(self, plan: Plan) -> float:
        """MACs of the model after removing `plan`: exact for conv/linear/norm layers, an upper bound overall."""
        removed: dict[tuple[str, str], int] = {}
        for cand in self.candidates:
            chosen = plan.get(cand.root)
            if not chosen:
                continue
            chosen_set = set(chosen)
            for layer, side, roots in cand.members:
                key = (layer, side)
                removed[key] = removed.get(key, 0) + sum(1 for r in roots if r in chosen_set)
        total = self.fixed_macs
        for name, macs in self.layer_macs.items():
            out_ch, in_ch, depthwise = self.layer_dims[name]
            keep_out = 1 - removed.get((name, "out"), 0) / max(out_ch, 1)
            keep_in = 1.0 if depthwise else 1 - removed.get((name, "in"), 0) / max(in_ch, 1)
            total += macs * keep_out * keep_in
        return total


def snapshot_macs(model: nn.Module, example: torch.Tensor) -> tuple[float, int]:
    """(MACs, params) of the model as it is now, counted by torch-pruning."""
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return float(macs), int(params)


def _dims(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return module.out_channels, module.in_channels, depthwise
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, module.num_features, True
    return None


def snapshot(model: nn.Module, example: torch.Tensor, ignored_patterns: list[str], num_classes: int,
             scorer: Scorer, *, normalize: bool = True) -> Snapshot:
    """Trace the current model, score every prunable group and record per-layer MAC costs.

    With normalize (the default) each group's scores are divided by their mean, so global ranking compares
    channels within their group's scale; scorers that are already comparable across layers pass False.
    """
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macs, params, per_layer, _ = tp.utils.count_ops_and_params(model, example, layer_wise=True)
    model.train(was_training)
    ignored = dg.resolve_ignored(model, ignored_patterns, num_classes)
    graph = dg.build_graph(model, example, ignored)
    groups = dg.prunable_groups(graph, ignored)
    dg.require_prunable(groups)
    names = dg.module_names(model)
    candidates = []
    for group in groups:
        scores = scorer(group)
        if scores is None:
            continue
        scores = scores.detach().float().cpu()
        if normalize:
            scores = scores / scores.mean().clamp_min(1e-12)
        members = []
        for item in group:
            name = names.get(item.dep.target.module)
            if name is None or item.root_idxs is None or any(r is None for r in item.root_idxs):
                continue
            members.append((name, "out" if _is_out(item.dep.handler) else "in", list(item.root_idxs)))
        root = names[group[0].dep.target.module]
        candidates.append(Candidate(root=root, width=len(group[0].idxs), scores=scores, members=members))
    layer_macs, layer_dims = {}, {}
    for module, name in names.items():
        dims = _dims(module)
        if dims is not None and per_layer.get(module):
            layer_macs[name], layer_dims[name] = float(per_layer[module]), dims
    fixed = float(macs) - sum(layer_macs.values())
    return Snapshot(candidates, layer_macs, layer_dims, fixed, float(macs), int(params))


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class Constraints:
    round_to: Optional[int] = None
    max_layer_ratio: float = 0.8
    global_ranking: bool = True
    frozen: dict[str, set[int]] = field(default_factory=dict)  # already chosen (count as removed)
    excluded: dict[str, set[int]] = field(default_factory=dict)  # may not be chosen (cooldown)


def _count_allowed(width: int, wanted: int, cons: Constraints) -> int:
    """How many channels a group may lose given max_layer_ratio and round_to (kept widths rounded up)."""
    cap = min(int(math.floor(width * cons.max_layer_ratio)), width - 1)
    n = max(0, min(wanted, cap))
    if cons.round_to and cons.round_to > 1 and n > 0:
        keep = width - n
        keep = min(width, int(math.ceil(keep / cons.round_to) * cons.round_to))
        n = width - keep
    return n


def _plan_from_counts(snap: Snapshot, counts: dict[str, int], cons: Constraints) -> Plan:
    plan: Plan = {}
    for cand in snap.candidates:
        frozen = cons.frozen.get(cand.root, set())
        n = counts.get(cand.root, 0)
        if n <= 0 and not frozen:
            continue
        excluded = cons.excluded.get(cand.root, set()) | frozen
        order = [int(i) for i in torch.argsort(cand.scores, stable=True) if int(i) not in excluded]
        extra = max(0, n - len(frozen))
        plan[cand.root] = sorted(frozen | set(order[:extra]))
    return plan


def plan_global(snap: Snapshot, k: int, cons: Constraints) -> Plan:
    """Remove the k lowest normalised scores over all groups (frozen channels count first)."""
    entries = []
    for cand in snap.candidates:
        blocked = cons.excluded.get(cand.root, set()) | cons.frozen.get(cand.root, set())
        entries += [(float(cand.scores[i]), cand.root) for i in range(cand.width) if i not in blocked]
    entries.sort(key=lambda e: e[0])
    wanted: dict[str, int] = {c.root: len(cons.frozen.get(c.root, ())) for c in snap.candidates}
    for _, root in entries[:k]:
        wanted[root] += 1
    counts = {c.root: max(_count_allowed(c.width, wanted[c.root], cons), len(cons.frozen.get(c.root, ())))
              for c in snap.candidates}
    return _plan_from_counts(snap, counts, cons)


def plan_uniform(snap: Snapshot, ratio: float, cons: Constraints) -> Plan:
    """Remove the same fraction of every group (per-layer ranking)."""
    counts = {c.root: max(_count_allowed(c.width, int(round(c.width * ratio)), cons), len(cons.frozen.get(c.root, ())))
              for c in snap.candidates}
    return _plan_from_counts(snap, counts, cons)


def plan_for_macs(snap: Snapshot, target_macs: float, cons: Constraints) -> Plan:
    """The plan whose MACs are closest to, and not above, target_macs (bisection on the removal amount)."""
    if cons.global_ranking:
        free = sum(c.width - len(cons.excluded.get(c.root, set()) | cons.frozen.get(c.root, set()))
                   for c in snap.candidates)
        lo, hi = 0, free
        build = lambda k: plan_global(snap, int(k), cons)  # noqa: E731
        integer = True
    else:
        lo, hi = 0.0, 1.0
        build = lambda r: plan_uniform(snap, float(r), cons)  # noqa: E731
        integer = False
    best = build(hi)
    if snap.macs_after(best) > target_macs:
        return best  # the constraints (max_layer_ratio, ignored layers) do not allow the target: closest we can
    for _ in range(64):
        if (integer and hi - lo <= 1) or (not integer and hi - lo < 1e-4):
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        plan = build(mid)
        if snap.macs_after(plan) <= target_macs:
            hi, best = mid, plan
        else:
            lo = mid
    return best


def plan_for_channels(snap: Snapshot, ratio: float, cons: Constraints) -> Plan:
    """Remove `ratio` of all prunable channels (globally ranked or uniformly per group)."""
    if cons.global_ranking:
        total = sum(c.width for c in snap.candidates)
        return plan_global(snap, int(round(total * ratio)), cons)
    return plan_uniform(snap, ratio, cons)


def plan_size(plan: Plan) -> int:
    return sum(len(v) for v in plan.values())


# ---------------------------------------------------------------------------------------------- removal
def remove(model: nn.Module, example: torch.Tensor, plan: Plan) -> int:
    """Physically remove the planned channels (every coupled slice, through torch-pruning); returns the count."""
    plan = {root: idxs for root, idxs in plan.items() if idxs}
    if not plan:
        return 0
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = dg.trace(model, example)
        removed = 0
        for root, idxs in plan.items():
            module = model.get_submodule(root)
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(idxs))
            if not graph.check_pruning_group(group):
                raise NotPrunableError(f"removing {len(idxs)} channels of {root} would leave a layer without channels.")
            group.prune(record_history=False)
            removed += len(idxs)
    model.train(was_training)
    return removed


def structure_slices(model: nn.Module, example: torch.Tensor, roots: list[str], *, out_only: bool = True):
    """{root: [(Slice, root_idxs)]} for every member of each root's group (all channels of the group).

    out_only=True keeps the output-defining slices (producer rows and bias, norm affine); False adds the
    consumers' input columns. A channel c of the root is x_s = concatenation over slices of the rows whose
    root index is c.
    """
    from .importance import channel_slices

    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = dg.trace(model, example)
    model.train(was_training)
    result = {}
    for root in roots:
        module = model.get_submodule(root)
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
        result[root] = [pair for item in group for pair in
                        channel_slices(item.dep.target.module, item.dep.handler, list(item.idxs), item.root_idxs,
                                       out_only=out_only)]
    return result


def channel_norms(pairs, *, grad: bool = False) -> torch.Tensor:
    """Joint L2 norm of each channel's rows over a group's (Slice, root_idxs) pairs (of .grad when grad=True)."""
    width = max(max(r) for _, r in pairs) + 1
    total = torch.zeros(width, dtype=torch.float64)
    with torch.no_grad():
        for sl, roots in pairs:
            p = sl.param.grad if grad else sl.param
            if p is None:
                continue
            p = p.detach()
            sq = p.pow(2).transpose(0, sl.dim).reshape(p.shape[sl.dim], -1).sum(1) if p.ndim > 1 else p.pow(2)
            total.scatter_add_(0, torch.as_tensor(roots), sq[torch.as_tensor(sl.idxs)].double().cpu())
    return total.sqrt()


@torch.no_grad()
def scale_channels(pairs, factors: dict[int, float]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Multiply the rows of the given channels (root index -> factor) in place; returns (param, dim, rows) touched."""
    touched = []
    for sl, roots in pairs:
        rows = [(m, factors[r]) for m, r in zip(sl.idxs, roots) if r in factors]
        if not rows:
            continue
        index = torch.as_tensor([m for m, _ in rows], device=sl.param.device)
        shape = [1] * sl.param.ndim
        shape[sl.dim] = -1
        f = torch.as_tensor([v for _, v in rows], dtype=sl.param.dtype, device=sl.param.device).view(shape)
        sl.param.index_copy_(sl.dim, index, sl.param.index_select(sl.dim, index) * f)
        touched.append((sl.param, sl.dim, index))
    return touched
