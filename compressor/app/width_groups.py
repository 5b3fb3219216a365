"""Per-layer widths grouped by module-name prefix, so the report's widths plot stays readable for deep models.

A model with hundreds of conv / linear layers (a timm GhostNet, a YOLO11n, a torchvision detector) gives one bar
per layer and an illegible plot. group_widths groups the layers by module-name prefix, as shallow as reads well:
the name tree is split from the top, the branch with the most layers first, until there are enough groups and no
group holds most of the model, never past `max_groups` groups. A YOLO model is grouped by its numbered layers
(0 ... 23), a timm model by its blocks, a torchvision detector by its backbone stages, fpn and heads. Groups keep
the order in which their first layer appears; path parts that every name shares (a wrapper's "model." or a YOLO
wrapper's "model.model.") are left out of the labels; a flat model with more than `max_groups` top-level layers
gets runs of consecutive ones ("0–7"). A model with at most `max_groups` layers keeps one group per layer,
labelled with its full name.

Head counts of attention layers (`<layer>:heads` keys) are counted apart from channels: a count of heads is not
a count of channels, so adding it to a group's channel total would mix units.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Callable, Mapping, Optional, Sequence

from compressor.models.attention import HEAD_SUFFIX


@dataclass(frozen=True)
class Group:
    """One bar of the widths plot: layers under one module-name prefix (or one layer).

    dense / compressed: the sum of the members' output channels (0 for `dense` without a dense model);
    dense_heads / compressed_heads: the same for attention head counts; kept_min / kept_max: the smallest and
    largest kept fraction (compressed / dense) of one member, None without a dense model."""

    label: str
    members: tuple[str, ...]
    dense: int
    compressed: int
    dense_heads: int = 0
    compressed_heads: int = 0
    kept_min: Optional[float] = None
    kept_max: Optional[float] = None

    @property
    def kept(self) -> Optional[float]:
        """The group's kept fraction: compressed / dense channels (heads for a group of head counts only)."""
        if self.dense:
            return self.compressed / self.dense
        if self.dense_heads:
            return self.compressed_heads / self.dense_heads
        return None


def is_grouped(groups: Sequence[Group]) -> bool:
    """Whether any group holds more than one layer (the plot then says it is grouped by block)."""
    return any(len(g.members) > 1 for g in groups)


def group_widths(dense: Mapping[str, int], compressed: Mapping[str, int], max_groups: int = 40,
                 min_groups: Optional[int] = None, exclude: Optional[Callable[[str], bool]] = None) -> list[Group]:
    """The layers of `dense` (of `compressed` when there is no dense model) in at most `max_groups` groups.

    A model with at most `max_groups` layers gives one group per layer. Otherwise the module-name tree is split
    from the top, the branch with the most layers first, until there are at least `min_groups` groups (default a
    fifth of max_groups) and no group holds more than half of the layers: YOLO's numbered layers, a timm
    model's blocks, a torchvision detector's backbone stages, fpn and heads.
    exclude: names to leave out; None leaves out normalisation layers as the report does (their width follows the
    layer before them)."""
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, got {max_groups}")
    if exclude is None:
        from compressor.app.report import _is_norm as exclude
    names = _in_model_order([n for n in (dense or compressed) if not exclude(n)])
    if len(names) <= max_groups:
        return [_group(n, [n], dense, compressed) for n in names]
    parts = [_path(n) for n in names]
    strip = _common_depth(parts)
    min_groups = max(1, max_groups // 5) if min_groups is None else min(min_groups, max_groups)
    nodes = _cut(list(range(len(names))), parts, strip, max_groups, min_groups)
    return [_group(_label(node, parts, strip), [names[i] for i in node[1]], dense, compressed) for node in nodes]


def _path(name: str) -> list[str]:
    """A module name's path parts; an attention layer's head count `a.attn:heads` sits under the layer: a, attn,
    :heads."""
    if name.endswith(HEAD_SUFFIX):
        return name[:-len(HEAD_SUFFIX)].split(".") + [HEAD_SUFFIX]
    return name.split(".")


def _join(parts: Sequence[str]) -> str:
    return ".".join(parts).replace("." + HEAD_SUFFIX, HEAD_SUFFIX)


def _in_model_order(names: list[str]) -> list[str]:
    """The names with each head count moved to just before its attention layer's first sublayer (layer_widths
    lists the head counts first)."""
    def key(item: tuple[int, str]) -> tuple[int, int]:
        at, name = item
        if not name.endswith(HEAD_SUFFIX):
            return at, 1
        layer = name[:-len(HEAD_SUFFIX)]
        return next((i for i, n in enumerate(names) if n == layer or n.startswith(layer + ".")), at), 0

    return [name for _, name in sorted(enumerate(names), key=key)]


# a node of the name tree: (depth, indices of the names under it in order of appearance, merged-run label or "")
_Node = tuple[int, list[int], str]


def _common_depth(parts: list[list[str]]) -> int:
    """How many leading path parts every name shares, leaving every name at least one part of its own."""
    depth = 0
    shortest = min(len(p) for p in parts)
    while depth < shortest - 1 and len({p[depth] for p in parts}) == 1:
        depth += 1
    return depth


def _children(node: _Node, parts: list[list[str]]) -> list[_Node]:
    """The node's names split by their next path part, in order of first appearance; a name that ends at the
    node (a layer that also holds layers) is its own child."""
    depth, members, _ = node
    split: dict[Optional[str], list[int]] = {}
    for i in members:
        split.setdefault(parts[i][depth] if len(parts[i]) > depth else None, []).append(i)
    return [(depth if key is None else depth + 1, idx, "") for key, idx in split.items()]


def _expandable(node: _Node, parts: list[list[str]]) -> bool:
    return not node[2] and len(node[1]) > 1 and any(len(parts[i]) > node[0] for i in node[1])


def _cut(members: list[int], parts: list[list[str]], strip: int, max_groups: int, min_groups: int) -> list[_Node]:
    """Split the name tree below the stripped prefix, one branch at a time, the branch with the most layers first,
    while there are fewer than min_groups groups or one branch still holds more than half of the layers, and only
    while a split keeps the groups at most max_groups. When the first level alone has more than max_groups
    groups, runs of consecutive ones are merged."""
    nodes = _children((strip, members, ""), parts)
    if len(nodes) > max_groups:
        return _merge_runs(nodes, parts, strip, max_groups)
    while True:
        candidates = sorted((n for n in nodes if _expandable(n, parts)), key=lambda n: (-len(n[1]), n[1][0]))
        if not candidates or (len(nodes) >= min_groups and 2 * len(candidates[0][1]) <= len(members)):
            break
        for node in candidates if len(nodes) < min_groups else candidates[:1]:
            children = _children(node, parts)
            if len(nodes) - 1 + len(children) <= max_groups:
                at = nodes.index(node)
                nodes[at:at + 1] = children
                break
        else:
            break
    return sorted(nodes, key=lambda n: n[1][0])


def _merge_runs(nodes: list[_Node], parts: list[list[str]], strip: int, max_groups: int) -> list[_Node]:
    """Consecutive first-level groups merged into at most max_groups runs, labelled "first–last"."""
    size = ceil(len(nodes) / max_groups)
    runs = []
    for start in range(0, len(nodes), size):
        run = nodes[start:start + size]
        first, last = (parts[n[1][0]][strip] for n in (run[0], run[-1]))
        runs.append((strip + 1, [i for n in run for i in n[1]], first if len(run) == 1 else f"{first}–{last}"))
    return runs


def _label(node: _Node, parts: list[list[str]], strip: int) -> str:
    depth, members, merged = node
    return merged or _join(parts[members[0]][strip:depth])


def _group(label: str, members: list[str], dense: Mapping[str, int], compressed: Mapping[str, int]) -> Group:
    channels = [n for n in members if not n.endswith(HEAD_SUFFIX)]
    heads = [n for n in members if n.endswith(HEAD_SUFFIX)]
    kept = [compressed.get(n, 0) / dense[n] for n in members if dense.get(n)] if dense else []
    return Group(label=label, members=tuple(members),
                 dense=sum(dense.get(n, 0) for n in channels), compressed=sum(compressed.get(n, 0) for n in channels),
                 dense_heads=sum(dense.get(n, 0) for n in heads),
                 compressed_heads=sum(compressed.get(n, 0) for n in heads),
                 kept_min=min(kept) if kept else None, kept_max=max(kept) if kept else None)


def draw_widths(plt, groups: Sequence[Group], has_dense: bool):
    """The widths figure: per group, the kept fraction of channels (compressed / dense totals) with the range of
    its layers' own fractions as an error bar, above the groups' dense and compressed channel totals; without a
    dense model, the compressed totals alone. At most 16 x 6.5 inches whatever the number of groups.

    plt: anything with pyplot's `subplots(...)` returning a matplotlib Figure and axes (the report's _Figures)."""
    n, layers = len(groups), sum(len(g.members) for g in groups)
    grouped = is_grouped(groups)
    width = min(16.0, max(6.0, 0.38 * n + 1.5))
    x = list(range(n))
    if has_dense:
        fig, (ax_kept, ax) = plt.subplots(2, 1, figsize=(width, 6.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
        _draw_kept(ax_kept, groups, x)
        ax.bar(x, [g.dense for g in groups], color="#c8d6e5", label="dense")
    else:
        fig, ax = plt.subplots(figsize=(width, 4.5))
    ax.bar(x, [g.compressed for g in groups], color="#2e86de", label="compressed")
    ax.set_ylabel("output channels" + (" (sum)" if grouped else ""), fontsize=9)
    totals = [t for g in groups for t in (g.dense, g.compressed) if t > 0]
    if totals and max(totals) > 50 * min(totals):  # a stem of 16 channels beside a stage of thousands
        ax.set_yscale("log")
    ax.set_xticks(x, [g.label for g in groups], rotation=50, ha="right", rotation_mode="anchor",
                  fontsize=8 if n <= 30 else 7)
    ax.tick_params(axis="y", labelsize=8)
    if has_dense:
        ax.legend(fontsize=8)
    what = "Kept channels" if has_dense else "Compressed widths"
    fig.suptitle(f"{what}, grouped by block ({n} groups of {layers} layers)" if grouped
                 else ("Per-layer widths before and after pruning" if has_dense else "Per-layer widths"))
    fig.tight_layout()
    return fig


def _draw_kept(ax, groups: Sequence[Group], x: list[int]) -> None:
    kept = [g.kept or 0.0 for g in groups]
    ax.bar(x, kept, color="#2e86de", label="kept fraction of channels")
    ranged = [i for i, g in zip(x, groups) if len(g.members) > 1 and g.kept_min is not None]
    if ranged:  # a group's own fraction lies within its layers' range; one layer has no range to draw
        ax.errorbar(ranged, [kept[i] for i in ranged],
                    yerr=[[max(0.0, kept[i] - groups[i].kept_min) for i in ranged],
                          [max(0.0, groups[i].kept_max - kept[i]) for i in ranged]],
                    fmt="none", ecolor="#222222", elinewidth=1, capsize=2, label="range over the group's layers")
    dense = sum(g.dense for g in groups)
    if dense:
        ax.axhline(sum(g.compressed for g in groups) / dense, color="#e67e22", ls="--", lw=1,
                   label="all layers")
    ax.set_ylim(0, max(1.05, max(g.kept_max or 0.0 for g in groups) * 1.05))
    ax.set_ylabel("kept fraction", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False)
