"""Planning: choose the channels that reach a target (remaining MACs, MAC speedup, channel ratio, or a latency
budget through a latency table's cost model) under round_to / max_layer_ratio, on a Snapshot (prune/snapshot.py).

MAC targets are met by bisection on the snapshot's per-layer cost model (Snapshot.macs_after), then single-group
steps towards the target. Plans are {root layer name: channel indices}; the model is only touched by
prune/removal.remove().
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from compressor.prune import heads as heads_mod
from compressor.prune.snapshot import Candidate, Plan, Snapshot

if TYPE_CHECKING:
    from compressor.prune.latency_cost import LatencyCost


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
    """Record each group's width the first time it is seen (the dense width, before any removal); a decoder LM's
    dense width of each kind (prune/decoder_plan.py)."""
    for cand in snap.candidates:
        store.setdefault(cand.root, cand.width)
    if snap.decoder is not None:
        from compressor.prune.decoder_plan import remember_dense

        remember_dense(store, snap)


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
    target is read as that fraction of the dense model's predicted latency and planned by importance per ms. A
    decoder LM's snapshot is planned by prune/decoder_plan.py."""
    if snap.decoder is not None:
        from compressor.prune import decoder_plan

        return decoder_plan.plan_for_macs(snap, target_macs, cons)
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
    if snap.decoder is not None:
        from compressor.prune import decoder_plan

        return decoder_plan.plan_for_target(snap, target, cons)
    remaining = target.remaining_macs()
    if remaining is not None:
        return plan_for_macs(snap, remaining * snap.total_macs, cons)
    return plan_for_channels(snap, target.channels, cons)


def plan_for_channels(snap: Snapshot, ratio: float, cons: Constraints) -> Plan:
    """Remove `ratio` of all prunable channels (globally ranked or uniformly per group); of a decoder LM, `ratio` of
    each kind's dense width."""
    if snap.decoder is not None:
        from compressor.prune import decoder_plan

        return decoder_plan.plan_for_fractions(snap, {kind: ratio for kind in snap.decoder.kinds}, cons)
    if cons.global_ranking:  # frozen (decaying) channels are still in the model and count towards the ratio
        total = sum(c.width for c in snap.candidates)
        frozen = sum(len(f) for f in cons.frozen.values())
        return plan_global(snap, max(0, int(round(total * ratio)) - frozen), cons)
    return plan_uniform(snap, ratio, cons)


def plan_size(plan: Plan) -> int:
    return sum(len(v) for v in plan.values())
