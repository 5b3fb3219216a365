"""The model's prunable groups and per-layer MAC costs at one moment (Snapshot), and the MAC cost model planners
use: each conv/linear/norm layer's counted MACs scale with the channels it keeps as prune/layer_cost.py says; the
small rest (activations, pooling) is held fixed, so the model never underestimates what remains. Plans are
{root layer name: channel indices}, so they survive across graph rebuilds (torch-pruning groups do not survive a
prune).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch_pruning as tp
from torch import nn

from compressor.errors import RecipeError
from compressor.models.attention import attention_modules, embed_linears, embed_tensors
from compressor.prune import graph as dg
from compressor.prune import heads as heads_mod
from compressor.prune import layer_cost
from compressor.prune.importance import Scorer
from compressor.prune.op_count import count_ops, counted_whole

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
    kind: Optional[str] = None  # a decoder LM's structure kind (prune/decoder_snapshot.py); None for channel groups

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
    layer_dims: dict[str, tuple[int, int, bool]]  # name -> LayerDims (out, in, out_only), prune/layer_cost.py
    fixed_macs: float
    total_macs: float
    params: int
    # the cost of a plan where the per-layer model does not apply: a decoder LM's analytic MACs (decoder_macs)
    cost: Optional[Callable[[Plan], float]] = None
    decoder: Optional[Any] = None  # a decoder LM's DecoderLayout: planning goes to prune/decoder_plan.py

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
        """MACs of the model after removing `plan`: exact for conv/linear/norm layers, an upper bound overall (a
        decoder LM: its analytic MACs, exact)."""
        if self.cost is not None:
            return self.cost(plan)
        removed = self.removed_after(plan)
        return self.fixed_macs + sum(
            macs * layer_cost.kept_fraction(self.layer_dims[name], removed.get((name, "out"), 0),
                                            removed.get((name, "in"), 0))
            for name, macs in self.layer_macs.items())

def snapshot(model: nn.Module, example: torch.Tensor, ignored_patterns: list[str], scorer: Scorer, *,
             normalize: bool = True, heads: bool = False, embed: bool = False, decoder: Any = None,
             layer_scores: Optional[torch.Tensor] = None) -> Snapshot:
    """Trace the current model, score every prunable group and record per-layer MAC costs.

    With normalize (the default) each group's scores are divided by their mean, so global ranking compares
    channels within their group's scale; scorers that are already comparable across layers pass False.
    With heads, every attention layer whose heads can be removed is one more candidate whose structures are its
    heads (prune/heads.py; root `<layer>:heads`). With embed, the residual stream's group, which runs through
    every attention layer's input and output, is a candidate too (graph.attention_layers); attention layers whose
    q/k/v width follows the embedding width refuse it (RecipeError naming the layer).
    A decoder language model (prune/decoder_snapshot.py) is not traced: its candidates are the decoder structures
    of `decoder` (a DecoderConfig; the default one when None), scored from their slices (its layers from
    `layer_scores` when given: prune/block_influence.py).
    """
    from compressor.prune.decoder_snapshot import decoder_arch, decoder_snapshot

    if decoder_arch(model) is not None:
        return decoder_snapshot(model, example, decoder, scorer, ignore=ignored_patterns, normalize=normalize,
                                heads=heads, embed=embed, layer_scores=layer_scores)
    with dg.quiet_eval(model):
        macs, params, per_layer, _ = count_ops(model, example, layer_wise=True)
    ignored = dg.resolve_ignored(model, ignored_patterns, example)
    if embed:
        check_embed(model)
    graph = dg.build_graph(model, example, ignored)
    groups = dg.prunable_groups(graph, ignored, embed=embed)
    dg.require_prunable(groups)
    names = dg.module_names(model)
    with dg.mapped_once(graph):  # nothing is removed while the groups are scored and their couplings probed
        candidates = [c for c in (_candidate(graph, group, names, scorer, normalize) for group in groups) if c is not None]
    layer_macs, layer_dims = {}, {}
    for module, name in names.items():
        # an attention layer only when the op counter counts it as one (else its children's MACs are counted)
        dims = layer_cost.layer_dims(module, attention=counted_whole(module))
        if dims is not None and per_layer.get(module):
            layer_macs[name], layer_dims[name] = float(per_layer[module]), dims
    if heads:
        candidates += _head_candidates(model, tuple(ignored), scorer, layer_macs, normalize)
    fixed = float(macs) - sum(layer_macs.values())
    return Snapshot(candidates, layer_macs, layer_dims, fixed, float(macs), int(params))


def _candidate(graph: tp.DependencyGraph, group, names: dict[nn.Module, str], scorer: Scorer,
               normalize: bool) -> Optional[Candidate]:
    """One torch-pruning group as a Candidate (None when the scorer has no scores for it)."""
    scores = scorer(group)
    if scores is None:
        return None
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
    return Candidate(root=names[root_module], width=len(group[0].idxs), scores=scores, members=members,
                     classes=classes)


def recipe_snapshot(model: nn.Module, example: torch.Tensor, recipe, scorer: Scorer, **kwargs) -> Snapshot:
    """snapshot() with the recipe's ignored layers, prune.attention.heads / embed and prune.decoder."""
    return snapshot(model, example, recipe.model.ignore, scorer, heads=recipe.prune.attention.heads,
                    embed=recipe.prune.attention.embed, decoder=recipe.prune, **kwargs)


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
