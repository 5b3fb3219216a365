"""Planning a decoder LM's structures (a Snapshot from prune/decoder_snapshot.py): how many of each kind go, and
which.

Fractions are of the dense model's widths (Constraints.dense_widths["decoder:<kind>"], remembered at the first
snapshot): a fraction f of a kind of dense width d leaves round(d x (1 - f)) per layer (kv_groups, mlp), of the layers,
or of the hidden size, whatever earlier events removed already (they count towards it).
- `prune.decoder.uniform: true`: every layer loses the same count of each kind (so the config describes every layer):
  the count of one layer is the count of all, chosen in each layer by its own scores. Key/value group counts are
  those allowed_head_counts accepts (at the hidden size the plan leaves), MLP and hidden widths keep multiples of
  round_to, the hidden size one the config accepts with the heads it will have.
- `uniform: false`: a kind's total is ranked across layers (scores normalised per kind), each layer's count then
  aligned to round_to; any key/value group count of at least one per layer.
- `layers` and `hidden` are single candidates: round(count x f) of them.
Every layer keeps at least (1 - max_layer_ratio) of each dense width and one structure; structures of layers that
model.ignore holds are never chosen. A channel target (prune.target.channels, or prune.decoder.ratios per kind)
gives the fractions directly; a MAC target is met by one common fraction over the kinds without a ratio, found by
bisection on the analytic cost (Snapshot.macs_after: decoder_macs), then each kind's own fraction bisected in turn
with the others held, where that brings the MACs closer (some kinds move in coarse steps: 1 of 4 key/value groups,
a layer; the finer ones make up the difference), starting from the common fraction and from the finest kind alone.
Decaying (frozen) structures count first; cooling (excluded) ones are taken only to fill an aligned count.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from compressor.errors import RecipeError
from compressor.prune.decoder_snapshot import DecoderLayout, round_half
from compressor.prune.planning import Constraints, layer_round_to
from compressor.prune.snapshot import Candidate, Plan, Snapshot

BISECTION_STEPS = 40
PER_LAYER = ("kv_groups", "mlp")


def dense_key(kind: str) -> str:
    """Constraints.dense_widths key of a kind's dense width (per layer for kv_groups and mlp)."""
    return f"decoder:{kind}"


def remember_dense(store: dict[str, int], snap: Snapshot) -> None:
    """Record each kind's dense width the first time it is seen (the widest layer's for per-layer kinds)."""
    layout = snap.decoder
    for kind in layout.kinds:
        widths = [c.width for c in snap.candidates if c.kind == kind]
        if kind == "layers":
            widths.append(layout.layer_count)
        elif kind == "hidden":
            widths.append(layout.hidden)
        else:
            widths += layout.widths[kind]
        if widths:
            store.setdefault(dense_key(kind), max(widths))


class _Planner:
    """Counts and choices for one snapshot under one set of constraints."""

    def __init__(self, snap: Snapshot, cons: Constraints) -> None:
        if cons.cost is not None:
            raise RecipeError("prune.target.table: a latency table plans channel groups; a decoder language model's "
                              "structures are planned by their analytic MACs.",
                              hint="Remove prune.target.table (a latency target is resolved to a MAC fraction).")
        self.snap, self.cons = snap, cons
        self.layout: DecoderLayout = snap.decoder
        self.by_kind: dict[str, list[Candidate]] = {}
        self._allowed: dict[tuple[str, Any], list[int]] = {}
        # the bisections ask for the same (candidate, count) choices again and again; scores, held and excluded
        # structures do not change within one planner (a 1.5 B model's 28 x 8960 MLP channels took minutes unmemoised)
        self._orders: dict[str, list[int]] = {}
        self._chosen: dict[tuple[str, int], list[int]] = {}
        for cand in snap.candidates:
            self.by_kind.setdefault(cand.kind, []).append(cand)

    # ------------------------------------------------------------------ widths and counts
    def dense(self, cand: Candidate) -> int:
        return max(self.cons.dense_widths.get(dense_key(cand.kind), cand.width), cand.width)

    def floor(self, cand: Candidate) -> int:
        return len(self.cons.frozen.get(cand.root, ()))

    def held(self, cand: Candidate) -> set[int]:
        return self.layout.held.get(cand.root, set())

    def allowed(self, cand: Candidate, hidden_kept: int) -> list[int]:
        """Every count the candidate may lose now (ascending)."""
        key = (cand.root, hidden_kept if cand.kind == "kv_groups" else None)
        if key not in self._allowed:
            self._allowed[key] = self._allowed_now(cand, hidden_kept)
        return self._allowed[key]

    def _allowed_now(self, cand: Candidate, hidden_kept: int) -> list[int]:
        width, dense = cand.width, self.dense(cand)
        keep = max(int(math.ceil(dense * (1 - self.cons.max_layer_ratio) - 1e-9)), 1) + len(self.held(cand))
        cap = max(width - keep, 0)
        if cand.kind == "layers":
            return list(range(cap + 1))
        if cand.kind == "kv_groups":
            if not self.layout.uniform:
                return list(range(cap + 1))
            kept = set(self.layout.kv_kept_allowed(hidden_kept))
            return [n for n in range(cap + 1) if width - n in kept]
        step = layer_round_to(dense, self.cons)
        return [n for n in range(cap + 1) if (width - n) % step == 0 or (n == 0 and width == dense)]

    @staticmethod
    def pick(allowed: list[int], wanted: int, floor: int, valid=None) -> int:
        """The largest allowed count not above `wanted`, at least `floor`; else the smallest allowed above it (a
        count `valid` refuses is skipped); `floor` when nothing is allowed."""
        below = [a for a in allowed if floor <= a <= max(wanted, floor)]
        above = [a for a in allowed if a > max(wanted, floor)]
        for a in sorted(below, reverse=True) + above:
            if valid is None or valid(a):
                return a
        return floor

    def counts(self, fractions: dict[str, float]) -> dict[str, int]:
        """Removal count per candidate root for `fractions` of each kind's dense width (module docstring)."""
        counts: dict[str, int] = {}
        hidden_kept = self.layout.hidden
        if "hidden" in fractions:
            for cand in self.by_kind.get("hidden", []):
                wanted = round_half(self.dense(cand) * fractions["hidden"]) - (self.dense(cand) - cand.width)
                valid = (lambda n, w=cand.width: self.layout.hidden_allowed(w - n)) if self.layout.uniform else None
                counts[cand.root] = self.pick(self.allowed(cand, hidden_kept), wanted, self.floor(cand), valid)
                hidden_kept = cand.width - counts[cand.root]
        for kind in ("layers", "kv_groups", "mlp"):
            if kind not in fractions:
                continue
            cands = self.by_kind.get(kind, [])
            if kind in PER_LAYER and not self.layout.uniform:
                counts.update(self._ranked_counts(kind, cands, fractions[kind], hidden_kept))
                continue
            if kind in PER_LAYER:
                counts.update(self._uniform_counts(cands, fractions[kind], hidden_kept))
                continue
            for cand in cands:
                wanted = round_half(self.dense(cand) * fractions[kind]) - (self.dense(cand) - cand.width)
                counts[cand.root] = self.pick(self.allowed(cand, hidden_kept), wanted, self.floor(cand))
        return counts

    def _uniform_counts(self, cands: list[Candidate], fraction: float, hidden_kept: int) -> dict[str, int]:
        """uniform: true: one kept width for every layer (widths may differ for a while when DPM removed some
        layers' structures before others': they meet again here): the smallest width every layer may keep that is
        not below the asked one, and not above what the decaying structures leave nor above the narrowest layer
        (else the widest such width)."""
        if not cands:
            return {}
        dense = max(self.dense(c) for c in cands)
        ceiling = min(c.width - self.floor(c) for c in cands)
        wanted = dense - round_half(dense * fraction)
        stay = lambda c: {c.width} if c.kind == "mlp" else set()  # noqa: E731 (a head count must stay allowed)
        common = set.intersection(*({c.width - n for n in self.allowed(c, hidden_kept)} | stay(c) for c in cands))
        fits = sorted(k for k in common if k <= ceiling)
        kept = next((k for k in fits if k >= wanted), fits[-1] if fits else ceiling)
        return {c.root: c.width - kept for c in cands}

    def _ranked_counts(self, kind: str, cands: list[Candidate], fraction: float,
                       hidden_kept: int) -> dict[str, int]:
        """uniform: false: the kind's total over every layer, its lowest normalised scores across layers first."""
        if not cands:
            return {}
        dense = max(self.dense(c) for c in cands)
        widths = self.layout.widths[kind]
        total = round_half(len(widths) * dense * fraction) - sum(dense - w for w in widths)
        wanted = {c.root: self.floor(c) for c in cands}
        entries = []
        for cand in cands:
            blocked = self.cons.excluded.get(cand.root, set()) | self.cons.frozen.get(cand.root, set())
            entries += [(float(cand.scores[i]), cand.root) for i in range(cand.width) if i not in blocked]
        entries.sort(key=lambda e: e[0])
        for _, root in entries[:max(total - sum(wanted.values()), 0)]:
            wanted[root] += 1
        return {c.root: self.pick(self.allowed(c, hidden_kept), wanted[c.root], self.floor(c)) for c in cands}

    # ------------------------------------------------------------------ choices
    def choose(self, cand: Candidate, n: int) -> list[int]:
        """The candidate's n structures to remove: decaying ones first, then the lowest scores; cooling ones only to
        fill the count; held ones never."""
        key = (cand.root, n)
        if key in self._chosen:
            return list(self._chosen[key])
        frozen = set(self.cons.frozen.get(cand.root, set()))
        excluded = self.cons.excluded.get(cand.root, set())
        chosen = set(frozen)
        if cand.root not in self._orders:
            held = self.held(cand)
            self._orders[cand.root] = [i for i in torch.argsort(cand.scores, stable=True).tolist() if i not in held]
        order = self._orders[cand.root]
        for pool in ([i for i in order if i not in excluded], order):
            for i in pool:
                if len(chosen) >= n:
                    break
                chosen.add(i)
        self._chosen[key] = sorted(chosen)
        return list(self._chosen[key])

    def plan(self, counts: dict[str, int]) -> Plan:
        plan: Plan = {}
        for cand in self.snap.candidates:
            n = counts.get(cand.root, self.floor(cand))
            if n > 0 or self.floor(cand):
                plan[cand.root] = self.choose(cand, max(n, self.floor(cand)))
        return {root: idxs for root, idxs in plan.items() if idxs}


# ---------------------------------------------------------------------------------------------- entry points
def plan_for_fractions(snap: Snapshot, fractions: dict[str, float], cons: Constraints) -> Plan:
    """The plan removing `fractions` ({kind: fraction of its dense width}) of each kind."""
    planner = _Planner(snap, cons)
    return planner.plan(planner.counts({k: f for k, f in fractions.items() if k in snap.decoder.kinds}))


def plan_for_macs(snap: Snapshot, target_macs: float, cons: Constraints, *, share: float = 1.0) -> Plan:
    """The plan whose analytic MACs are closest to `target_macs`: the kinds with a prune.decoder.ratios entry at that
    ratio (times `share`, an event's part of the schedule), the others at one common fraction (bisection); then, one
    kind at a time (the coarse ones first: layers, key/value groups, then the hidden size and MLP channels), that
    kind's own fraction bisected with the others held, kept where it brings the MACs closer. The same descent also
    starts from the finest kind alone (the others at 0), and the nearer result wins."""
    planner = _Planner(snap, cons)
    layout = snap.decoder
    fixed = {k: r * share for k, r in layout.cfg.ratios.items() if k in layout.kinds}
    free = [k for k in ("layers", "kv_groups", "hidden", "mlp") if k in layout.kinds and k not in fixed
            and planner.by_kind.get(k)]
    cost = lambda counts: snap.macs_after(planner.plan(counts))  # noqa: E731
    if not free:
        return planner.plan(planner.counts(fixed))
    f, counts = _nearest(lambda g: planner.counts({**fixed, **{k: g for k in free}}), target_macs, cost)
    starts = [({k: f for k in free}, counts)]
    if len(free) > 1:  # also from the finest kind alone (coarse steps of one kind can trap the common fraction)
        fine = free[-1]
        f, counts = _nearest(lambda g: planner.counts({**fixed, **{k: 0.0 for k in free}, fine: g}), target_macs, cost)
        starts.append(({**{k: 0.0 for k in free}, fine: f}, counts))
    results = []
    for fractions, best in starts:
        error = abs(cost(best) - target_macs)
        for _ in range(2 if len(free) > 1 else 0):
            for kind in free:
                g, counts = _nearest(lambda x: planner.counts({**fixed, **fractions, kind: x}), target_macs, cost)
                if abs(cost(counts) - target_macs) < error:
                    fractions[kind], best, error = g, counts, abs(cost(counts) - target_macs)
        results.append((error, best))
    return planner.plan(min(results, key=lambda r: r[0])[1])


def _nearest(counts_at, target: float, cost) -> tuple[float, dict[str, int]]:
    """(fraction, counts) whose cost is nearest `target`, from either side, by bisection on the fraction in [0, 1]
    (removing more costs less); an end when the target is out of reach."""
    lo, hi = 0.0, 1.0
    below, above = counts_at(hi), counts_at(lo)
    if cost(below) > target:
        return hi, below
    if cost(above) <= target:
        return lo, above
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        counts = counts_at(mid)
        if cost(counts) <= target:
            hi, below = mid, counts
        else:
            lo, above = mid, counts
        if below == above:
            break
    return (hi, below) if abs(cost(below) - target) <= abs(cost(above) - target) else (lo, above)


def plan_for_target(snap: Snapshot, target: Any, cons: Constraints, *, share: float = 1.0) -> Plan:
    """The plan for a target (prune.target): MACs (macs, speedup, a latency target's MAC fraction) or per-kind
    fractions (channels, with prune.decoder.ratios overriding it per kind), `share` of the way there."""
    remaining = target.remaining_macs()
    if remaining is not None:
        return plan_for_macs(snap, (1 - (1 - remaining) * share) * snap.total_macs, cons, share=share)
    return plan_for_fractions(snap, target_fractions(snap, target, share), cons)


def target_fractions(snap: Snapshot, target: Any, share: float = 1.0) -> dict[str, float]:
    """{kind: fraction of its dense width} a channel target asks, `share` of the way there."""
    cfg = snap.decoder.cfg
    return {kind: cfg.ratios.get(kind, target.channels) * share for kind in snap.decoder.kinds}


def event_plan(snap: Snapshot, target: Any, share: float, dense_macs: float, cons: Constraints) -> tuple[Plan, float]:
    """An event's plan, `share` of the way to the target (hosts.EventMethod.target_plan), and the asked fraction
    (of the dense MACs, or of each kind for a channel target)."""
    remaining = target.remaining_macs()
    if remaining is not None:
        asked = 1 - (1 - remaining) * share
        return plan_for_macs(snap, asked * dense_macs, cons, share=share), asked
    return plan_for_fractions(snap, target_fractions(snap, target, share), cons), target.channels * share


def realign(snap: Snapshot, roots: set[str], cons: Constraints) -> Plan:
    """DPM without backfill: after releases, the kinds of `roots` keep allowed counts (uniform: the same in every
    layer) with the decaying structures first and the next-lowest scores after them."""
    planner = _Planner(snap, cons)
    kinds = {c.kind for c in snap.candidates if c.root in roots}
    hidden_kept = snap.decoder.hidden
    counts: dict[str, int] = {}
    for kind in kinds:
        cands = planner.by_kind.get(kind, [])
        if kind in PER_LAYER and snap.decoder.uniform:
            counts.update(planner._uniform_counts(cands, 0.0, hidden_kept))
            continue
        for cand in cands:
            floor = planner.floor(cand)
            counts[cand.root] = planner.pick(planner.allowed(cand, hidden_kept), floor, floor)
    plan = planner.plan(counts)
    return {root: idxs for root, idxs in plan.items() if root in counts}

