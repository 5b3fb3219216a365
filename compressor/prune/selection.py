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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter

from compressor.errors import NotPrunableError, RecipeError
from compressor.models.attention import HeadPrunedMultiheadAttention, attention_modules, embed_linears, embed_tensors
from compressor.models.layers import is_depthwise
from compressor.prune import heads as heads_mod
from compressor.prune.importance import Scorer
from compressor.prune import graph as dg

if TYPE_CHECKING:
    from compressor.prune.latency_cost import LatencyCost

Plan = dict[str, list[int]]


@dataclass
class Candidate:
    """One prunable group of the current model: its root layer, scores and which layers it narrows."""

    root: str
    width: int
    scores: torch.Tensor  # per-channel importance (normalised to mean 1 unless snapshot(normalize=False))
    # (layer, "out"|"in", root index of each member index, or None where torch-pruning's index mapping lost the
    # root (through a concatenation followed by a slice, e.g. GhostNet's ghost modules): such a member loses the
    # same fraction of its indices as the root)
    members: list[tuple[str, str, Optional[list[int]], int]]
    # root indices torch-pruning removes together (None: each index alone). GhostNet's ghost module feeds its primary
    # conv's channel i through a depthwise "cheap" conv into channel i + width/2 of the same concatenation, so
    # removing one of them removes both; planning counts and chooses such classes whole.
    classes: Optional[list[list[int]]] = None

    def partners(self) -> dict[int, list[int]]:
        return {i: cls for cls in self.classes for i in cls} if self.classes else {}

    @property
    def unit(self) -> int:
        """Channels removed together: the class size when every index is in a class of that size, else 1."""
        sizes = {len(cls) for cls in self.classes or ()}
        if len(sizes) == 1 and sum(len(cls) for cls in self.classes) == self.width:
            return sizes.pop()
        return 1


@dataclass
class Snapshot:
    """The model's groups and per-layer MAC costs at one moment."""

    candidates: list[Candidate]
    layer_macs: dict[str, float]
    layer_dims: dict[str, tuple[int, int, bool]]  # name -> (out, in, depthwise)
    fixed_macs: float
    total_macs: float
    params: int

    def removed_after(self, plan: Plan) -> dict[tuple[str, str], float]:
        """Channels each layer loses on each side ("out" / "in") when `plan` is removed."""
        removed: dict[tuple[str, str], float] = {}
        for cand in self.candidates:
            chosen = plan.get(cand.root)
            if not chosen:
                continue
            chosen_set = set(chosen)
            for layer, side, roots, count in cand.members:
                key = (layer, side)
                lost = (sum(1 for r in roots if r in chosen_set) if roots is not None
                        else count * len(chosen_set) / max(cand.width, 1))
                removed[key] = removed.get(key, 0) + lost
        return removed

    def macs_after(self, plan: Plan) -> float:
        """MACs of the model after removing `plan`: exact for conv/linear/norm layers, an upper bound overall."""
        removed = self.removed_after(plan)
        total = self.fixed_macs
        for name, macs in self.layer_macs.items():
            out_ch, in_ch, depthwise = self.layer_dims[name]
            keep_out = 1 - removed.get((name, "out"), 0) / max(out_ch, 1)
            keep_in = 1.0 if depthwise else 1 - removed.get((name, "in"), 0) / max(in_ch, 1)
            total += macs * keep_out * keep_in
        return total


def count_ops(model: nn.Module, example: torch.Tensor, layer_wise: bool = False):
    """torch-pruning's op counter, also for subclasses of the layers it knows: it looks hooks up by exact type, so
    a conv subclass with its own forward (timm's StdConv2d in BiT ResNets) counted 0 MACs and the MAC targets of
    such models were computed on the few layers it did count."""
    known = op_counter.MODULES_MAPPING
    op_counter.CUSTOM_MODULES_MAPPING = {
        type(m): known[base] for m in model.modules() if type(m) not in known
        for base in type(m).__mro__[1:] if base in known and isinstance(m, nn.Module)}
    op_counter.CUSTOM_MODULES_MAPPING.update({type(m): _rnn_macs for m in model.modules() if isinstance(m, nn.RNNBase)})
    op_counter.CUSTOM_MODULES_MAPPING[HeadPrunedMultiheadAttention] = _pruned_mha_macs
    return tp.utils.count_ops_and_params(model, example, layer_wise=layer_wise)


def counted_whole(module: nn.Module) -> bool:
    """Whether count_ops counts `module` as one layer (its children are not added up)."""
    return type(module) in op_counter.MODULES_MAPPING or isinstance(module, HeadPrunedMultiheadAttention)


def _pruned_mha_macs(module: HeadPrunedMultiheadAttention, inputs, output) -> None:
    """torch-pruning's nn.MultiheadAttention count with the inner width (heads x head_dim) in place of embed_dim
    where heads were removed: q scaling, the q/k/v projections and biases, per head QK^T, softmax and AV, and the
    output projection."""
    query, key = inputs[0], inputs[1]
    batch_first = module.batch_first and query.dim() == 3
    batch = (query.shape[0] if batch_first else query.shape[1]) if query.dim() == 3 else 1
    length, source = (query.shape[1], key.shape[1]) if batch_first else (query.shape[0], key.shape[0])
    embed, inner, heads = module.embed_dim, module.inner_dim, module.num_heads
    macs = length * inner + (length + 2 * source) * embed * inner
    if module.in_proj_bias is not None:
        macs += (length + 2 * source) * inner
    macs += heads * (length * source * module.head_dim * 2 + length * source)
    macs += length * inner * embed + length * embed
    module.__flops__ += int(macs * batch)


def _rnn_macs(module: nn.RNNBase, inputs, output) -> None:
    """MACs of an RNN/LSTM/GRU: its weight matrices once per token, layer and direction. torch-pruning's own hook
    reads batch and sequence length from the first sample's shape (the sequence length and the feature width), so
    timm's Sequencer (batch-first LSTMs over 14x14 tokens) counted 73.6 GMACs instead of about 8."""
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        tokens = x.data.shape[0]
    else:
        tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    per_token = sum(w.numel() for name, w in module.named_parameters() if name.startswith(("weight_ih", "weight_hh")))
    module.__flops__ += int(per_token * tokens)  # named_parameters holds both directions' weights already


def snapshot_macs(model: nn.Module, example: torch.Tensor) -> tuple[float, int]:
    """(MACs, params) of the model as it is now, counted by torch-pruning (see count_ops)."""
    with dg.quiet_eval(model):
        macs, params = count_ops(model, example)
    return float(macs), int(params)


def _dims(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    """(out, in, MACs scale with out alone) of a layer the MAC model follows; an attention layer's out is its inner
    width (heads x head_dim), which all its MACs scale with, when the op counter counts it as one layer (else its
    MACs are the sum of its children's, which are counted there)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, module.in_channels, is_depthwise(module)
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, module.num_features, True
    return heads_mod.site_dims(module) if counted_whole(module) else None


def snapshot(model: nn.Module, example: torch.Tensor, ignored_patterns: list[str], scorer: Scorer, *,
             normalize: bool = True, heads: bool = False, embed: bool = False) -> Snapshot:
    """Trace the current model, score every prunable group and record per-layer MAC costs.

    With normalize (the default) each group's scores are divided by their mean, so global ranking compares
    channels within their group's scale; scorers that are already comparable across layers pass False.
    With heads, every attention layer whose heads can be removed is one more candidate whose structures are its
    heads (prune/heads.py; root `<layer>:heads`). With embed, the residual stream's group, which runs through
    every attention layer's input and output, is a candidate too (graph.attention_layers); attention layers whose
    q/k/v width follows the embedding width refuse it (RecipeError naming the layer).
    """
    with dg.quiet_eval(model):
        macs, params, per_layer, _ = count_ops(model, example, layer_wise=True)
    ignored = dg.resolve_ignored(model, ignored_patterns, example)
    if embed:
        check_embed(model)
    graph = dg.build_graph(model, example, ignored)
    groups = dg.prunable_groups(graph, ignored, embed=embed)
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
            if name is None:
                continue
            roots = None if item.root_idxs is None or any(r is None for r in item.root_idxs) else list(item.root_idxs)
            side = "out" if dg.is_out_handler(item.dep.handler) else "in"
            members += [(layer, own, roots, len(item.idxs))  # an attention layer on the residual stream is
                        for layer, own in _mac_layers(item.dep.target.module, name, side)  # reached from both sides
                        if not any(m[0] == layer and m[1] == own for m in members)]
        root_module = group[0].dep.target.module
        classes = merge_classes(coupled_classes(graph, root_module, group[0].dep.handler, len(group[0].idxs)),
                                norm_group_classes(group))
        if classes:
            for cls in classes:
                scores[cls] = scores[cls].mean()
        candidates.append(Candidate(root=names[root_module], width=len(group[0].idxs), scores=scores, members=members,
                                    classes=classes))
    layer_macs, layer_dims = {}, {}
    for module, name in names.items():
        dims = _dims(module)
        if dims is not None and per_layer.get(module):
            layer_macs[name], layer_dims[name] = float(per_layer[module]), dims
    if heads:
        candidates += _head_candidates(model, tuple(ignored), scorer, layer_macs, normalize)
    fixed = float(macs) - sum(layer_macs.values())
    return Snapshot(candidates, layer_macs, layer_dims, fixed, float(macs), int(params))


def recipe_snapshot(model: nn.Module, example: torch.Tensor, recipe, scorer: Scorer, **kwargs) -> Snapshot:
    """snapshot() with the recipe's ignored layers and prune.attention.heads / embed."""
    return snapshot(model, example, recipe.model.ignore, scorer, heads=recipe.prune.attention.heads,
                    embed=recipe.prune.attention.embed, **kwargs)


def check_embed(model: nn.Module) -> None:
    """prune.attention.embed on a model with an attention layer whose q/k/v width is the embedding width."""
    for name, module, _, _ in attention_modules(model):
        if embed_tensors(module) is None:
            raise RecipeError(
                f"prune.attention.embed: attention layer {name} ({type(module).__name__}) cannot lose embedding "
                "channels: its q/k/v width follows the embedding width (packed projections, torch's "
                "MultiheadAttention, window attention). Only layers with separate q/k/v projections (Hugging Face "
                "BERT, RoBERTa, DistilBERT, ViT, DeiT) take it.",
                hint="Set prune.attention.embed: false and prune the heads (prune.attention.heads: true) and the "
                     "MLP widths instead.")


def _mac_layers(module: nn.Module, name: str, side: str) -> list[tuple[str, str]]:
    """(layer, side) pairs whose MACs a group member's channels scale: the member itself, or for an attention layer
    on the residual stream (one node of the graph, both of whose sides prune.attention.embed narrows at once) its
    q/k/v inputs and its output projection's outputs, which the op counter counts."""
    if embed_tensors(module) is None:
        return [(name, side)]
    reads, writes = embed_linears(module)
    return [(f"{name}.{rel}", "in") for rel in reads] + [(f"{name}.{rel}", "out") for rel in writes]


def _head_candidates(model: nn.Module, ignored: tuple[nn.Module, ...], scorer: Scorer, layer_macs: dict[str, float],
                     normalize: bool) -> list[Candidate]:
    """One candidate per attention layer whose heads can be removed: its heads, scored from their slices."""
    found = []
    for site in heads_mod.head_sites(model, ignored):
        scores = scorer.slices(site.slices(out_only=False), site.num_heads)
        if scores is None:
            raise RecipeError(f"prune.attention.heads: the importance {type(scorer).__name__} cannot score the heads of "
                              f"{site.name} (it ranks batch-norm scales, which attention heads do not have).",
                              hint="Use prune.importance.kind magnitude, taylor, saliency or random with heads, or "
                                   "set prune.attention.heads: false.")
        scores = scores.detach().float().cpu()
        if normalize:
            scores = scores / scores.mean().clamp_min(1e-12)
        found.append(Candidate(root=heads_mod.head_root(site.name), width=site.num_heads, scores=scores,
                               members=site.members(layer_macs)))
    return found


def coupled_classes(graph: tp.DependencyGraph, root: nn.Module, handler, width: int) -> Optional[list[list[int]]]:
    """Classes of root indices that torch-pruning removes together, or None when every index goes alone.

    Asking torch-pruning for the group of one index shows which other indices of the root it drags along; three
    probes decide whether the group has such coupling at all (a group lookup takes about a millisecond), and only
    then is every index probed."""
    def partners(i: int) -> list[int]:
        group = graph.get_pruning_group(root, handler, [i])
        return sorted({int(idx) for item in group if item.dep.target.module is root and dg.is_out_handler(item.dep.handler)
                       for idx in item.idxs} | {i})

    if width < 2 or all(partners(i) == [i] for i in {0, width // 2, width - 1}):
        return None
    classes, seen = [], set()
    for i in range(width):
        if i not in seen:
            cls = partners(i)
            seen.update(cls)
            classes.append(cls)
    return classes


def norm_group_classes(group) -> Optional[list[list[int]]]:
    """Root indices of each GroupNorm group in the dependency group: they are removed whole (graph._WholeGroupNorm)."""
    classes = []
    for item in group:
        norm = item.dep.target.module
        if not isinstance(norm, nn.GroupNorm) or norm.num_groups <= 1 or item.root_idxs is None:
            continue
        per_group = norm.num_channels // norm.num_groups
        by_group: dict[int, list[int]] = {}
        for idx, root in zip(item.idxs, item.root_idxs):
            if root is not None:
                by_group.setdefault(int(idx) // per_group, []).append(int(root))
        classes += [sorted(set(members)) for members in by_group.values()]
    return classes or None


def merge_classes(*parts: Optional[list[list[int]]]) -> Optional[list[list[int]]]:
    """Union of overlapping classes (indices coupled by any rule end up in one class)."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for part in parts:
        for cls in part or ():
            for j in cls[1:]:
                parent[find(j)] = find(cls[0])
            find(cls[0])
    merged: dict[int, list[int]] = {}
    for i in parent:
        merged.setdefault(find(i), []).append(i)
    classes = [sorted(c) for c in merged.values() if len(c) > 1]
    return sorted(classes) or None


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class Constraints:
    round_to: Optional[int] = None
    clamp: bool = False  # round_to: auto: narrow groups keep the largest power of two they can still lose
    max_layer_ratio: float = 0.8
    global_ranking: bool = True
    frozen: dict[str, set[int]] = field(default_factory=dict)  # already chosen (count as removed)
    excluded: dict[str, set[int]] = field(default_factory=dict)  # may not be chosen (cooldown)
    dense_widths: dict[str, int] = field(default_factory=dict)  # group widths before any removal (round_to)
    # a latency table's cost model (prune/latency_cost.py): MAC budgets are read as fractions of the dense model's
    # predicted latency, groups are ranked by importance per millisecond and keep the widths its curves step at
    cost: Optional["LatencyCost"] = None


def remember_widths(store: dict[str, int], snap: Snapshot) -> None:
    """Record each group's width the first time it is seen (the dense width, before any removal)."""
    for cand in snap.candidates:
        store.setdefault(cand.root, cand.width)


def constraints_from(recipe, **extra) -> Constraints:
    """The recipe's planning constraints (prune.round_to already resolved to a number, see hardware.py; a resolved
    `auto` lets narrow groups keep a smaller power of two; a latency table's cost model once the latency target is
    resolved), with extra fields (frozen, excluded, overrides)."""
    prune = recipe.prune
    fields = {"round_to": prune.round_to, "clamp": prune._round_to_auto, "cost": prune._latency_cost,
              "max_layer_ratio": prune.max_layer_ratio, "global_ranking": prune.global_ranking, **extra}
    return Constraints(**fields)


MISS_TOLERANCE = 0.02  # a MAC result more than 2% (relative) from its plan or target is reported


def relative_miss(achieved: float, expected: float) -> float:
    return (achieved - expected) / expected if expected else 0.0


def plan_mismatch(planned: float, achieved: float, removed: int) -> Optional[str]:
    """A note when torch-pruning's removal left MACs more than MISS_TOLERANCE away from what the plan predicted."""
    miss = relative_miss(achieved, planned)
    if abs(miss) <= MISS_TOLERANCE:
        return None
    return (f"MACs after removing {removed} channels are {achieved:.3f} of dense, the plan predicted {planned:.3f} "
            f"({miss:+.1%}): torch-pruning removed {'more' if miss < 0 else 'fewer'} coupled channels than the "
            "planner's cost model counted; the later events and the final report use the measured value.")


def layer_round_to(width: int, cons: Constraints) -> int:
    """The channel multiple a group of (dense) `width` channels keeps: round_to, or with cons.clamp the largest
    power of two that still lets the group lose channels (a 16-wide layer under round_to 16 keeps multiples of 8)."""
    step = cons.round_to or 1
    if cons.clamp and step > 1:
        while step > 1 and step > width // 2:
            step //= 2
    return max(step, 1)


def allowed_removals(width: int, cons: Constraints, root: Optional[str] = None, unit: int = 1) -> list[int]:
    """Every channel count a group of `width` channels may lose now: a multiple of `unit` (channels that go
    together), the kept width a multiple of its round_to, or the dense width (a group pruned earlier may not stay
    at an unaligned width); at least (1 - max_layer_ratio) of the dense width kept over all events, and one channel."""
    dense = cons.dense_widths.get(root, width) if root is not None else width
    cap = min(width - int(math.ceil(dense * (1 - cons.max_layer_ratio) - 1e-9)), width - 1)
    steps = cons.cost.kept_widths.get(root) if cons.cost is not None and root is not None else None
    if steps is not None:  # the widths the latency table's curve steps down at replace round_to
        return [n for n in range(0, cap + 1) if n % unit == 0 and (width - n in steps or (n == 0 and width == dense))]
    step = 1 if heads_mod.is_head_root(root) else layer_round_to(dense, cons)  # whole heads keep head_dim multiples
    return [n for n in range(0, cap + 1)
            if n % unit == 0 and ((width - n) % step == 0 or (n == 0 and width == dense))]


def allowed_count(cand: Candidate, floor: int, cons: Constraints) -> int:
    """The smallest removal count the constraints allow for the group that covers `floor` channels."""
    return _count_allowed(cand, floor, cons, floor)


def _count_allowed(cand: Candidate, wanted: int, cons: Constraints, floor: int = 0) -> int:
    """The largest allowed removal count not above `wanted` (kept widths rounded up), but never below `floor`
    (channels already decaying): then the smallest allowed count that covers them."""
    blocked = len(cons.excluded.get(cand.root, set()) - cons.frozen.get(cand.root, set()))
    every = allowed_removals(cand.width, cons, cand.root, cand.unit)
    allowed = [a for a in every if a <= cand.width - blocked]
    if not any(a >= floor for a in allowed) and any(a >= floor for a in every):
        # the excluded (cooling) channels leave no aligned count that covers the decaying ones, or the group is
        # already off its widths with nothing decaying (DPM: the rest of its channels released): an unaligned width
        # (9 or 13 of 16, 37 of 64) runs outside the runtime's blocked layout, so alignment wins and _choose takes
        # the lowest-scored excluded channels to fill the count
        return min(a for a in every if a >= floor)
    if not allowed:  # no aligned width within max_layer_ratio (and the channels not excluded): keep what is decaying
        return floor
    below = [a for a in allowed if a <= max(wanted, 0)]
    n = max(below) if below else min(allowed)
    if n < floor:
        n = min((a for a in allowed if a >= floor), default=floor)
    return n


def _choose(cand: Candidate, n: int, cons: Constraints, fill: bool = False) -> list[int]:
    """The group's `n` channels to remove: its frozen ones first, then the lowest scores (coupled classes whole);
    excluded channels only with `fill`, for a count _count_allowed could align only with them."""
    frozen = cons.frozen.get(cand.root, set())
    excluded = cons.excluded.get(cand.root, set()) | frozen
    partners = cand.partners()
    chosen = set(frozen)
    order = [int(i) for i in torch.argsort(cand.scores, stable=True)]
    for i in order:
        if len(chosen) >= n:
            break
        cls = partners.get(i, [i])
        if i not in excluded and not any(j in excluded for j in cls):
            chosen.update(cls)
    for i in order if fill else ():  # a count only reachable with excluded channels: the lowest of them
        if len(chosen) >= n:
            break
        cls = partners.get(i, [i])
        if not any(j in chosen for j in cls):
            chosen.update(cls)
    return sorted(chosen)


def plan_counts(snap: Snapshot, counts: dict[str, int], cons: Constraints) -> Plan:
    """The plan removing counts[root] channels of each group (see _choose)."""
    plan: Plan = {}
    for cand in snap.candidates:
        n = counts.get(cand.root, 0)
        if n > 0 or cons.frozen.get(cand.root):
            plan[cand.root] = _choose(cand, n, cons, fill=True)
    return plan


def _refine(snap: Snapshot, plan: Plan, target: float, cons: Constraints, cost: Callable[[Plan], float]) -> Plan:
    """Move single groups by one allowed step (one round_to multiple) while that brings the cost (MACs or
    predicted latency) closer to the target: a global or uniform plan moves all groups together and can overshoot
    by a whole step of a wide layer."""
    best, error = plan, abs(cost(plan) - target)
    for _ in range(4 * len(snap.candidates)):
        trials = []
        for cand in snap.candidates:
            n = len(best.get(cand.root, ()))
            allowed = allowed_removals(cand.width, cons, cand.root, cand.unit)
            floor = len(cons.frozen.get(cand.root, ()))
            for m in (min((a for a in allowed if a > n), default=None),
                      max((a for a in allowed if floor <= a < n), default=None)):
                if m is not None:
                    trials.append({**best, cand.root: _choose(cand, m, cons)})
        scored = [(abs(cost(t) - target), t) for t in trials]
        if not scored:
            break
        trial_error, trial = min(scored, key=lambda e: e[0])
        if trial_error >= error:
            break
        best, error = trial, trial_error
    return {root: idxs for root, idxs in best.items() if idxs}


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
    counts = {c.root: _count_allowed(c, wanted[c.root], cons, len(cons.frozen.get(c.root, ())))
              for c in snap.candidates}
    return plan_counts(snap, counts, cons)


def plan_uniform(snap: Snapshot, ratio: float, cons: Constraints) -> Plan:
    """Remove the same fraction of every group (per-layer ranking)."""
    counts = {c.root: _count_allowed(c, int(round(c.width * ratio)), cons, len(cons.frozen.get(c.root, ())))
              for c in snap.candidates}
    return plan_counts(snap, counts, cons)


def plan_for_macs(snap: Snapshot, target_macs: float, cons: Constraints) -> Plan:
    """The plan whose MACs are closest to target_macs, from either side, as the granularity allows (bisection on
    the removal amount, then the nearer of the two plans around the target). With a latency table (cons.cost) the
    target is read as that fraction of the dense model's predicted latency and planned by importance per ms."""
    if cons.cost is not None:
        budget = cons.cost.budget(target_macs / cons.cost.dense_macs)
        return plan_for_cost(cons.cost.weighted(snap), budget, cons, lambda p: cons.cost.predict(snap, p))
    return plan_for_cost(snap, target_macs, cons, snap.macs_after)


def plan_for_cost(snap: Snapshot, target: float, cons: Constraints, cost: Callable[[Plan], float]) -> Plan:
    """The plan whose cost is closest to `target` (see plan_for_macs); removing more never costs more."""
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
    below = build(hi)
    if cost(below) > target:
        return below  # the constraints (max_layer_ratio, ignored layers) do not allow the target: closest we can
    above = build(lo)
    if cost(above) <= target:
        return above
    for _ in range(64):
        if (integer and hi - lo <= 1) or (not integer and hi - lo < 1e-4):
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        plan = build(mid)
        if cost(plan) <= target:
            hi, below = mid, plan
        else:
            lo, above = mid, plan
    nearest = min((below, above), key=lambda p: abs(cost(p) - target))
    return _refine(snap, nearest, target, cons, cost)


def plan_for_target(snap: Snapshot, target, cons: Constraints) -> Plan:
    """The plan for the recipe's final target (prune.target: remaining MACs, MAC speedup or channel ratio)."""
    remaining = target.remaining_macs()
    if remaining is not None:
        return plan_for_macs(snap, remaining * snap.total_macs, cons)
    return plan_for_channels(snap, target.channels, cons)


def plan_for_channels(snap: Snapshot, ratio: float, cons: Constraints) -> Plan:
    """Remove `ratio` of all prunable channels (globally ranked or uniformly per group)."""
    if cons.global_ranking:  # frozen (decaying) channels are still in the model and count towards the ratio
        total = sum(c.width for c in snap.candidates)
        frozen = sum(len(f) for f in cons.frozen.values())
        return plan_global(snap, max(0, int(round(total * ratio)) - frozen), cons)
    return plan_uniform(snap, ratio, cons)


def plan_size(plan: Plan) -> int:
    return sum(len(v) for v in plan.values())


# ---------------------------------------------------------------------------------------------- removal
def remove(model: nn.Module, example: torch.Tensor, plan: Plan) -> int:
    """Physically remove the planned channels (every coupled slice, through torch-pruning); returns the count."""
    plan = {root: idxs for root, idxs in plan.items() if idxs}
    if not plan:
        return 0
    with dg.quiet_eval(model):
        removed = 0
        for root in [r for r in plan if heads_mod.is_head_root(r)]:  # local to their layer: no graph needed
            heads_mod.remove_heads(model, root, list(plan[root]))
            removed += len(plan.pop(root))
        graph = dg.trace(model, example) if plan else None
        for root, idxs in plan.items():
            module = model.get_submodule(root)
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(idxs))
            if not graph.check_pruning_group(group):
                raise NotPrunableError(f"removing {len(idxs)} channels of {root} would leave a layer without channels.")
            try:
                group.prune(record_history=False)
            except Exception as exc:  # torch-pruning fails with bare IndexError/RuntimeError on layers it mis-maps
                raise NotPrunableError(
                    f"torch-pruning failed while removing {len(idxs)} channels of {root} and the layers coupled to it "
                    f"({type(exc).__name__}: {exc}).",
                    hint=f"Add {root!r} to model.ignore to keep that group whole (`compressor inspect` lists the "
                         "coupled layers), or use FGGP unstructured / 2:4, which does not change shapes.") from exc
            removed += len(idxs)
        check_forward(model, example, list(plan) or ["attention heads"])
    return removed


def check_forward(model: nn.Module, example: torch.Tensor, roots: list[str]) -> None:
    """Run the pruned model once; a failure names the layer it failed in (torch-pruning followed a channel mapping
    this architecture does not have) instead of surfacing later as a traceback in training or export."""
    names = dg.module_names(model)
    running: list[nn.Module] = []

    def enter(module, _inputs) -> None:
        running.append(module)

    def leave(_module, _inputs, _output) -> None:  # a forward hook that returned a value would replace the output
        running.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # any op can be the one whose shapes no longer fit
        where = names.get(running[-1], "?") if running else "?"
        raise NotPrunableError(
            f"after removing channels of {', '.join(roots)}, the model fails in layer {where} "
            f"({type(running[-1]).__name__ if running else '?'}: {type(exc).__name__}: {exc}); torch-pruning did not "
            "follow this architecture's channel mapping there.",
            hint=f"Add the layers feeding {where} to model.ignore (`compressor inspect` lists the groups and what "
                 "each couples), or use FGGP unstructured / 2:4, which does not change shapes.") from exc
    finally:
        for hook in hooks:
            hook.remove()


def structure_slices(model: nn.Module, example: torch.Tensor, roots: list[str], *, out_only: bool = True):
    """{root: [(Slice, root_idxs)]} for every member of each root's group (all channels of the group).

    out_only=True keeps the output-defining slices (producer rows and bias, norm affine); False adds the
    consumers' input columns. A channel c of the root is x_s = concatenation over slices of the rows whose
    root index is c.
    """
    from compressor.prune.importance import channel_slices

    result = {root: heads_mod.site_of(model, root).slices(out_only) for root in roots if heads_mod.is_head_root(root)}
    roots = [root for root in roots if root not in result]
    if not roots:
        return result
    with dg.quiet_eval(model):
        graph = dg.trace(model, example)
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
