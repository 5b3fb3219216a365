"""OTOv2 as a host (Chen et al., "OTOv2: Automatic, Generic, User-Friendly", ICLR 2023). Spec: docs/methods/otov2.md.

Zero-invariant groups (ZIGs) are torch-pruning's dependency groups: a channel's producer rows, bias and norm affine
(and its consumers' input columns) vanish together, and a channel whose output-defining slices are all exactly zero
contributes nothing, so removing it leaves the outputs unchanged. The host picks the redundant channels once (the
channels the planner would remove for the recipe's final target, ranked by the host's importance) and drives them
to exact zero during training with half-space projected gradient (HSPG):

    trial step    x~_g = x_g - lr * (grad_g + lambda * x_g / ||x_g||)     (the optimizer's step plus a group-lasso
                                                                           pull, added to the gradient)
    projection    x_g <- 0   if  x~_g . x_g < epsilon * ||x_g||^2         (the step crossed the half-space)

so a redundant group either keeps its direction or becomes exactly zero; channels that are not redundant are never
touched. Zero groups stay zero (their slices and momentum are reset after every step). The selection events of the
executing method (oneshot, iterative, DPM) rank the redundant channels first, so removal takes the zero groups.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from pydantic import Field

from compressor.config import Strict
from compressor.prune.planning import plan_for_macs, plan_for_target
from compressor.prune.slices import channel_norms, scale_channels, structure_slices
from compressor.prune.snapshot import Snapshot
from compressor.prune.methods.hosts import Host, broadcast_plan
from compressor.prune.methods.registry import HOSTS

if TYPE_CHECKING:
    from compressor.prune.spec import PruneSpec


class OTOv2Config(Strict):
    """prune.otov2: the HSPG settings of the otov2 host."""

    lmbda: float = Field(0.5, ge=0.0, description="group-lasso strength pulling the redundant groups to zero "
                                                   "(added to their gradient as lmbda * x_g / ||x_g||)")
    epsilon: float = Field(0.0, ge=0.0, lt=1.0, description="half-space margin: a redundant group is set to zero "
                                                            "when its step makes x~_g . x_g < epsilon ||x_g||^2")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of plain training before the redundant "
                                                   "channels are chosen")


def half_space_project(pairs, before: dict[int, list[torch.Tensor]], channels: list[int],
                       epsilon: float) -> list[int]:
    """Zero every channel of `channels` whose new rows point against their rows before the step:
    x_new . x_old < epsilon ||x_old||^2 over the channel's slices (`before[c]`: its rows before, in the order of
    `pairs`). Returns the channels zeroed."""
    dot = {c: 0.0 for c in channels}
    old_sq = {c: 0.0 for c in channels}
    for k, (sl, roots) in enumerate(pairs):
        seen = {c: 0 for c in channels}
        for row, root in zip(sl.idxs, roots):
            if root in dot:
                new, old = sl.param.detach().select(sl.dim, row), before[root][k][seen[root]]
                seen[root] += 1
                dot[root] += float((new * old).sum())
                old_sq[root] += float((old * old).sum())
    crossed = [c for c in channels if old_sq[c] > 0 and dot[c] < epsilon * old_sq[c]]
    scale_channels(pairs, {c: 0.0 for c in crossed})
    return crossed


def rows_of(pairs, channels: set[int]) -> dict[int, list[list[torch.Tensor]]]:
    """Copies of each channel's rows, per slice of `pairs` (as half_space_project reads them)."""
    out: dict[int, list[list[torch.Tensor]]] = {c: [[] for _ in pairs] for c in channels}
    for k, (sl, roots) in enumerate(pairs):
        for row, root in zip(sl.idxs, roots):
            if root in channels:
                out[root][k].append(sl.param.detach().select(sl.dim, row).clone())
    return out


@HOSTS.register("otov2")
class OTOv2Host(Host):
    """otov2: HSPG drives the redundant zero-invariant groups to exact zero during training; events remove them."""

    config_section = ("otov2", OTOv2Config)

    def __init__(self, spec: PruneSpec) -> None:
        super().__init__(spec)
        self.otov2: OTOv2Config = spec.prune.otov2
        self.redundant: Optional[dict[str, list[int]]] = None  # root -> channels driven to zero (see _choose)
        self.dense_macs: Optional[float] = None
        self.phases: list[dict[str, int]] = []  # per removal: redundant channels and how many reached zero
        self.zero: dict[str, set[int]] = {}  # root -> channels that reached exact zero
        self.steps = 0
        self._pairs: dict[str, list] = {}
        self._before: Optional[dict[str, Any]] = None

    # -- hooks
    def after_backward(self, ctx) -> None:
        super().after_backward(ctx)
        if self.steps < self.otov2.warmup_steps:
            return
        if self.redundant is None:
            self._choose(ctx)
        elif not self._pairs and self.redundant:  # resumed: the slices of the restored model
            self._pairs = structure_slices(ctx.model, self.example(ctx), list(self.redundant))
        self._before = {}
        with torch.no_grad():
            for root, channels in (self.redundant or {}).items():
                pairs = self._pairs[root]
                live = [c for c in channels if c not in self.zero.get(root, set())]
                norms = channel_norms(pairs)
                for sl, roots in pairs:  # the group-lasso pull: grad_g += lmbda * x_g / ||x_g||
                    if sl.param.grad is None:
                        continue
                    for row, r in zip(sl.idxs, roots):
                        if r in live and norms[r] > 0:
                            sl.param.grad.select(sl.dim, row).add_(
                                sl.param.detach().select(sl.dim, row), alpha=self.otov2.lmbda / float(norms[r]))
                self._before[root] = rows_of(pairs, set(live))

    def after_step(self, ctx) -> None:
        self.steps += 1
        if not self._before:
            return
        with torch.no_grad():
            for root, before in self._before.items():
                pairs = self._pairs[root]
                zeroed = half_space_project(pairs, before, list(before), self.otov2.epsilon)
                self.zero.setdefault(root, set()).update(zeroed)
                self._hold_zero(ctx, root)
        self._before = None

    def check_schedule(self, event_steps: list[int], total_steps: int) -> list[str]:
        first = min(event_steps, default=0)
        if first > self.otov2.warmup_steps:
            return []
        return [f"prune.host otov2: the first selection event is at optimizer step {first}, before any HSPG step "
                f"(prune.otov2.warmup_steps {self.otov2.warmup_steps}), so it removes channels that were never driven "
                "to zero, like the depgraph host; start the schedule later (prune.schedule.start_epoch: 1 or more)."]

    def structure_changed(self) -> None:
        """Channels were removed: indices moved, so the redundant set is chosen again (zero channels first)."""
        super().structure_changed()
        if self.redundant:
            self.phases.append(self._phase())
        self.redundant, self.zero, self._pairs, self._before = None, {}, {}, None

    # -- planning: the redundant channels rank first
    def snapshot(self, ctx) -> Snapshot:
        snap = super().snapshot(ctx)
        for cand in snap.candidates:
            for c in (self.redundant or {}).get(cand.root, []):
                cand.scores[c] = -1.0  # below every normalised score: removed before anything else
        return snap

    def summary(self) -> dict[str, Any]:
        current = [self._phase()] if self.redundant else []
        return {"phases": self.phases + current, "hspg_steps": self.steps}

    def _phase(self) -> dict[str, int]:
        return {"step": self.steps, "redundant": sum(len(v) for v in (self.redundant or {}).values()),
                "zeroed": sum(len(v) for v in self.zero.values())}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "redundant": self.redundant,
                "zero": {r: sorted(v) for r, v in self.zero.items()}, "steps": self.steps,
                "dense_macs": self.dense_macs, "phases": self.phases}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        redundant = state.get("redundant")
        self.redundant = None if redundant is None else {r: list(v) for r, v in redundant.items()}
        self.dense_macs = state.get("dense_macs")
        self.phases = list(state.get("phases", []))
        self.zero = {r: set(v) for r, v in state.get("zero", {}).items()}
        self.steps = state.get("steps", 0)
        self._pairs = {}  # rebuilt from the model at the next step

    # -- internals
    def _choose(self, ctx) -> None:
        """The channels the planner removes for the recipe's final target, ranked by the host's importance; after a
        removal, only what is still missing to that target (MACs of the dense model)."""
        snap = super().snapshot(ctx)
        target = self.spec.prune.target
        remaining = target.remaining_macs()
        if self.dense_macs is None:
            self.dense_macs = snap.total_macs
            plan = plan_for_target(snap, target, self.constraints())
        elif remaining is not None and snap.total_macs > remaining * self.dense_macs:
            plan = plan_for_macs(snap, remaining * self.dense_macs, self.constraints())
        else:
            plan = {}
        plan = broadcast_plan(plan)
        self.redundant = {root: sorted(idxs) for root, idxs in plan.items() if idxs}
        self._pairs = structure_slices(ctx.model, self.example(ctx), list(self.redundant))
        norms = {root: channel_norms(self._pairs[root]) for root in self.redundant}
        self.zero = {root: {c for c in chans if float(norms[root][c]) == 0.0} for root, chans in self.redundant.items()}

    def _hold_zero(self, ctx, root: str) -> None:
        """Channels at zero stay there: their slices and optimizer momentum are reset."""
        zero = self.zero.get(root, set())
        if not zero:
            return
        for param, dim, index in scale_channels(self._pairs[root], {c: 0.0 for c in zero}):
            buf = ctx.optimizer.state.get(param, {}).get("momentum_buffer") if ctx.optimizer is not None else None
            if buf is not None:
                buf.index_fill_(dim, index, 0.0)
