"""DPM, the Decay Pruning Method (Yang et al., arXiv 2406.03879), wrapped around any host. Spec: docs/methods/dpm.md.

Smooth pruning (SP): at each host event the newly selected structures enter the *decaying set*. A structure s is
the concatenation x_s of its output-defining slices (producer rows and bias, norm affine; `norm_scope: group` adds
the consumers' input columns). On entry L0 = ||x_s||, n = 0. At every decay step (at entry, then every `interval`
optimizer steps) n += 1 and x_s is rescaled to L0 (1 - n / N), keeping its direction; after N steps x_s = 0 and
the structure is removed physically (the optimizer's state follows the kept slices: prune/lineage.py).

Self-rectifying (SR): before each decay step the escaping length e = ||x_s|| - L_target(previous step) measures
how hard training pulls the structure back. C_rate = e / L_target, C_len = e / mean |norm change| of the
non-decaying structures of the same group over the same interval. If C_rate > t_rate and C_len > t_len the
structure is released: it keeps its (partly decayed) weights, is not selected again for `cooldown` events, and
with `backfill` the host's next-lowest-scored structures enter the decaying set so the MAC target still holds.

With N = 1 and rectify off, a structure is zeroed and removed at its event: the host's single-step execution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, TYPE_CHECKING

from pydantic import Field
import torch

from compressor.config import Strict
from compressor.progress import info
from compressor.prune import decoder_plan
from compressor.prune.methods.hosts import EventMethod, broadcast_plan, remove_planned
from compressor.prune.methods.registry import METHODS
from compressor.prune.planning import allowed_count, plan_counts
from compressor.prune.removal import follow_roots
from compressor.prune.slices import channel_norms, scale_channels, structure_slices
from compressor.prune.snapshot import Plan

if TYPE_CHECKING:
    from compressor.prune.spec import PruneSpec

TRACE_LIMIT = 400  # structures whose decay trace is kept for the report
CHECK_LOG_LIMIT = 20000  # self-rectifying checks kept for the report (C_rate / C_len distributions)


class DPMConfig(Strict):
    steps: int = Field(8, ge=1, description="N: decay steps from full norm to zero")
    interval: int = Field(50, gt=0, description="optimizer steps between two decay steps")
    rectify: bool = True
    t_rate: float = Field(0.1, ge=0.0)
    t_len: float = Field(1.0, ge=0.0)
    backfill: bool = True
    cooldown: int = Field(1, ge=0, description="events a released structure is not selected again")
    norm_scope: Literal["out", "group"] = "out"
    momentum: Literal["keep", "reset"] = Field("keep", description="optimizer momentum of decaying slices")


@dataclass
class Structure:
    """One decaying channel of a group, identified by its root layer and current index."""

    root: str
    idx: int
    l0: float
    event: int
    n: int = 0
    target: float = 0.0  # L_target after the last decay step
    next_step: int = 0
    ref_norms: list[float] = field(default_factory=list)  # the group's channel norms at the last decay step
    steps: list[int] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)


@METHODS.register("dpm")
class DPM(EventMethod):
    config_section = ("dpm", DPMConfig)

    @classmethod
    def report_section(cls, summary: dict[str, Any]) -> list[str]:
        lines = super().report_section(summary)
        checks = summary.get("sr_checks") or []
        if checks:
            released = sum(1 for c in checks if c[4])
            lines += ["## DPM self-rectifying", "",
                      f"{len(checks)} checks of decaying structures, {released} released (C_rate > t_rate "
                      f"{summary['dpm']['t_rate']} and C_len > t_len {summary['dpm']['t_len']}); "
                      "plot_sr_checks.png shows every check.", ""]
        return lines

    @classmethod
    def figures(cls, summary: dict[str, Any], plt: Any) -> dict[str, Any]:
        figures = {}
        trace = summary.get("decay_trace") or []
        if trace:
            fig, ax = plt.subplots(figsize=(6, 4))
            for series in trace:
                removed = series.get("outcome") == "removed"
                ax.plot(series["steps"], series["norms"], "-" if removed else "--",
                        color="#2e86de" if removed else "#e74c3c", lw=0.8, alpha=0.7)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("structure norm ||x_s||")
            ax.set_title("DPM decay (solid: removed, dashed: released)")
            figures["decay"] = fig
        checks = [c for c in summary.get("sr_checks") or [] if c[3] is not None]
        if checks:
            fig, ax = plt.subplots(figsize=(6, 4))
            for escaped, color, label in ((False, "#2e86de", "kept decaying"), (True, "#e74c3c", "released")):
                points = [(c[2], c[3]) for c in checks if bool(c[4]) == escaped]
                if points:
                    ax.scatter(*zip(*points), s=6, color=color, alpha=0.5, label=label)
            ax.axvline(summary["dpm"]["t_rate"], color="grey", ls="--", lw=1)
            ax.axhline(summary["dpm"]["t_len"], color="grey", ls="--", lw=1)
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_yscale("symlog", linthresh=0.1)
            ax.set_xlabel("C_rate = escape / target norm")
            ax.set_ylabel("C_len = escape / mean move of the group")
            ax.set_title("DPM self-rectifying checks (dashed: t_rate, t_len)")
            ax.legend(fontsize=8)
            figures["sr_checks"] = fig
        return figures

    def __init__(self, spec: PruneSpec) -> None:
        super().__init__(spec, events=spec.prune.schedule.events)
        self.dpm = spec.prune.dpm
        self.decaying: list[Structure] = []
        self.cooling: dict[tuple[str, int], int] = {}  # (root, idx) -> event index at release
        self.finished: list[dict[str, Any]] = []  # decay traces of removed and released structures
        self.checks: list[list] = []  # self-rectifying checks: [step, decay step n, C_rate, C_len, released]
        self._slices: dict[str, list] = {}

    # ------------------------------------------------------------------------------------------ hooks
    def after_step(self, ctx) -> None:
        super().after_step(ctx)
        if self.decaying and min(s.next_step for s in self.decaying) <= ctx.step:
            self.decay_due(ctx)

    def finalize(self, ctx) -> None:
        super().finalize(ctx)
        if self.decaying:  # training ended mid-decay: finish the decay now so the target holds
            forced = len(self.decaying)
            for s in self.decaying:
                s.n = self.dpm.steps - 1
            self.decay(ctx, list(self.decaying), rectify=False)
            self.records[-1]["forced"] = self.records[-1].get("forced", 0) + forced
            info(f"DPM: training ended with {forced} structures still decaying; they were removed at once")

    # ------------------------------------------------------------------------------------------ events
    def event(self, ctx, index: int, epoch: float) -> None:
        plan, snap, asked = self.target_plan(ctx, index, frozen=self._decaying_plan(), excluded=self._cooling_plan(index))
        record = {"event": index + 1, "epoch": epoch, "step": ctx.step, "selected": 0, "released": 0,
                  "backfilled": 0, "removed": 0, "asked_macs": asked if self.spec.prune.target.channels is None else None,
                  "planned_macs": snap.macs_after(plan) / self.dense_macs, "achieved_macs": snap.total_macs / self.dense_macs}
        self.records.append(record)
        record["selected"] = self.enter(ctx, plan, index)
        info(f"DPM event {index + 1}/{self.events}: {record['selected']} structures start decaying "
             f"({len(self.decaying)} decaying, planned MACs {record['planned_macs']:.3f} of dense)")

    def enter(self, ctx, plan: Plan, index: int) -> int:
        """Add the plan's channels that are not decaying yet; their first decay step happens now."""
        current = self._decaying_plan()
        new = {root: [i for i in idxs if i not in current.get(root, set())] for root, idxs in plan.items()}
        new = {root: idxs for root, idxs in new.items() if idxs}
        if not new:
            return 0
        self._ensure_slices(ctx, list(new))
        entered = []
        for root, idxs in new.items():
            norms = self.group_norms(root)
            for i in idxs:
                l0 = float(norms[i])
                entered.append(Structure(root=root, idx=i, l0=l0, event=index, target=l0, next_step=ctx.step,
                                         ref_norms=norms.tolist()))
        self.decaying += entered
        self.decay(ctx, entered, rectify=False)
        return len(entered)

    def _decaying_plan(self) -> dict[str, set[int]]:
        plan: dict[str, set[int]] = {}
        for s in self.decaying:
            plan.setdefault(s.root, set()).add(s.idx)
        return plan

    def _cooling_plan(self, index: int) -> dict[str, set[int]]:
        """Released structures still in cooldown at event `index` (those released in its window included)."""
        plan: dict[str, set[int]] = {}
        for (root, idx), released_at in self.cooling.items():
            if index - released_at <= self.dpm.cooldown:
                plan.setdefault(root, set()).add(idx)
        return plan

    # ------------------------------------------------------------------------------------------ decay
    def decay_due(self, ctx) -> None:
        due = [s for s in self.decaying if s.next_step <= ctx.step]
        released = self.decay(ctx, due, rectify=self.dpm.rectify)
        if released:
            self.backfill(ctx) if self.dpm.backfill else self.realign(ctx, {s.root for s in released})

    def decay(self, ctx, structures: list[Structure], *, rectify: bool) -> list[Structure]:
        """One decay step for `structures`: SR check, then rescale; remove those that reached zero."""
        if not structures:
            return []
        self._ensure_slices(ctx, sorted({s.root for s in structures}))
        norms = {root: self.group_norms(root) for root in {s.root for s in structures}}
        decaying_idx = self._decaying_plan()
        released, factors = [], {}
        for s in structures:
            now = float(norms[s.root][s.idx])
            if rectify and s.n > 0 and self._escapes(s, now, norms[s.root], decaying_idx[s.root], ctx.step):
                released.append(s)
                s.steps.append(ctx.step)
                s.norms.append(now)  # the trace ends at the norm it escaped to
                continue
            s.n += 1
            s.target = s.l0 * max(0.0, 1.0 - s.n / self.dpm.steps)
            factors.setdefault(s.root, {})[s.idx] = s.target / now if now > 0 else 0.0
            s.next_step = ctx.step + self.dpm.interval
            self._trace(s, ctx.step, now, s.target)
        for root, per_channel in factors.items():
            self.scale(ctx, root, per_channel)
        gone = {id(s) for s in released}
        for root in factors:
            fresh = self.group_norms(root).tolist()
            for s in structures:
                if s.root == root and id(s) not in gone:
                    s.ref_norms = fresh
        for s in released:
            self.release(s)
        self.remove_finished(ctx)
        return released

    def _escapes(self, s: Structure, now: float, norms: torch.Tensor, decaying: set[int], step: int) -> bool:
        """The SR test; every check is logged in self.checks (C_rate <= 0: the structure stayed at or under its
        target; C_len is inf when the group's other structures did not move)."""
        if s.target <= 0:
            return False
        escape = now - s.target
        values = norms.tolist()  # one conversion: indexing the tensor per channel cost ~1 s per DPM run on YOLO11n
        others = [i for i in range(len(values)) if i not in decaying and i < len(s.ref_norms)]
        moved = torch.tensor([abs(values[i] - s.ref_norms[i]) for i in others]).mean().item() if others else 0.0
        c_rate = escape / s.target
        c_len = escape / moved if moved > 0 else float("inf")
        escaped = escape > 0 and c_rate > self.dpm.t_rate and c_len > self.dpm.t_len
        if len(self.checks) < CHECK_LOG_LIMIT:
            self.checks.append([step, s.n, round(c_rate, 5), round(c_len, 5) if c_len != float("inf") else None,
                                escaped])
        return escaped

    def release(self, s: Structure) -> None:
        self.decaying.remove(s)
        self.cooling[(s.root, s.idx)] = len(self.records) - 1  # the event window it was released in
        self.records[-1]["released"] += 1
        self._finish_trace(s, "released")

    def backfill(self, ctx) -> None:
        """Keep the target: re-plan with the decaying set frozen and released structures excluded (the plan keeps
        every group's width a multiple of round_to, see planning.allowed_removals)."""
        index = len(self.records) - 1
        plan, snap, _ = self.target_plan(ctx, index, frozen=self._decaying_plan(), excluded=self._cooling_plan(index))
        self.records[-1]["backfilled"] += self.enter(ctx, broadcast_plan(plan), index)
        self.records[-1]["planned_macs"] = snap.macs_after(plan) / self.dense_macs

    def realign(self, ctx, roots: set[str]) -> None:
        """backfill: false still keeps widths on round_to: a group whose release left a decaying count its
        round_to does not allow takes its next-lowest-scored channels up to the nearest allowed count."""
        index = len(self.records) - 1
        frozen = self._decaying_plan()
        snap = self.host.snapshot(ctx)
        cons = self.host.constraints(frozen=frozen, excluded=self._cooling_plan(index))
        if snap.decoder is not None:  # a decoder LM: uniform widths stay uniform (prune/decoder_plan.py)
            self.records[-1]["backfilled"] += self.enter(ctx, broadcast_plan(decoder_plan.realign(snap, roots, cons)),
                                                         index)
            return
        counts = {c.root: allowed_count(c, len(frozen.get(c.root, ())), cons)
                  for c in snap.candidates if c.root in roots}
        plan = {root: idxs for root, idxs in plan_counts(snap, counts, cons).items() if root in counts}
        self.records[-1]["backfilled"] += self.enter(ctx, broadcast_plan(plan), index)

    def remove_finished(self, ctx) -> None:
        done = [s for s in self.decaying if s.n >= self.dpm.steps]
        if not done:
            return
        plan: Plan = {}
        for s in done:
            plan.setdefault(s.root, []).append(s.idx)
            self.decaying.remove(s)
            self._finish_trace(s, "removed")
        record = self.records[-1]
        planned = record["planned_macs"] if not self.decaying else None  # the event's plan is complete now
        renamed = follow_roots(ctx.model, {s.root for s in self.decaying} | {root for root, _ in self.cooling})
        done = remove_planned(ctx, self.host.example(ctx), plan, planned, self.dense_macs)
        self.host.structure_changed()
        self._remap(plan)
        self._rename(renamed())
        self._slices = {}
        record["removed"] += done["removed"]
        record.update({k: v for k, v in done.items() if k not in ("removed", "planned_macs")})

    def _remap(self, removed: Plan) -> None:
        """Channel indices after a removal: later channels of the same group move down."""
        def shift(root: str, idx: int) -> int:
            return idx - sum(1 for r in removed.get(root, ()) if r < idx)

        for s in self.decaying:
            gone = set(removed.get(s.root, ()))
            s.ref_norms = [v for i, v in enumerate(s.ref_norms) if i not in gone]
            s.idx = shift(s.root, s.idx)
        self.cooling = {(root, shift(root, idx)): ev for (root, idx), ev in self.cooling.items()
                        if idx not in set(removed.get(root, ()))}

    def _rename(self, names: dict[str, Optional[str]]) -> None:
        """A decoder LM lost layers: the structures of later layers go by their layer's new index; those of a
        removed layer went with it (their trace ends as removed)."""
        if not any(old != new for old, new in names.items()):
            return
        for s in list(self.decaying):
            if s.root in names and names[s.root] is None:
                self.decaying.remove(s)
                self._finish_trace(s, "removed")
            elif s.root in names:
                s.root = names[s.root]
        self.cooling = {(names.get(root, root), idx): ev for (root, idx), ev in self.cooling.items()
                        if names.get(root, root) is not None}

    # ------------------------------------------------------------------------------------------ tensors
    def _ensure_slices(self, ctx, roots: list[str]) -> None:
        missing = [r for r in roots if r not in self._slices]
        if missing:
            self._slices.update(structure_slices(ctx.model, self.host.example(ctx), missing,
                                                     out_only=self.dpm.norm_scope == "out"))

    def group_norms(self, root: str) -> torch.Tensor:
        """||x_s|| of every channel of the group (joint norm over its slices)."""
        return channel_norms(self._slices[root])

    @torch.no_grad()
    def scale(self, ctx, root: str, factors: dict[int, float]) -> None:
        """Multiply channels' slices by per-channel factors (and their momentum, with momentum: reset -> 0)."""
        for param, dim, index in scale_channels(self._slices[root], factors):
            if self.dpm.momentum == "reset" and ctx.optimizer is not None:
                buf = ctx.optimizer.state.get(param, {}).get("momentum_buffer")
                if buf is not None:
                    buf.index_fill_(dim, index, 0.0)

    # ------------------------------------------------------------------------------------------ report
    def _trace(self, s: Structure, step: int, before: float, after: float) -> None:
        s.steps += [step, step]
        s.norms += [before, after]

    def _finish_trace(self, s: Structure, outcome: str) -> None:
        if len(self.finished) < TRACE_LIMIT:
            self.finished.append({"root": s.root, "event": s.event + 1, "outcome": outcome, "steps": s.steps,
                                  "norms": s.norms, "l0": s.l0})

    def check_schedule(self, total_steps: int, steps_per_epoch: int) -> list[str]:
        """The host's event checks, and: the decay the last event starts (a decay step at the event, then one every
        `interval` optimizer steps, N in all) must end within training, at step last + (N - 1) * interval <=
        total_steps; otherwise the structures still decaying at the end are removed at once (forced removal)."""
        warnings = super().check_schedule(total_steps, steps_per_epoch)
        n, interval, spe = self.dpm.steps, self.dpm.interval, max(steps_per_epoch, 1)
        sched = self.spec.prune.schedule

        def last_step(end: int) -> int:  # the last event's optimizer step for a schedule ending at epoch `end`
            start = sched.start_epoch
            end = max(end, start)
            return round((start + (self.events - 1) * (end - start) / self.events) * spe)

        last = round(self.epochs[-1] * spe)
        finish = last + (n - 1) * interval
        if finish <= total_steps:
            return warnings
        epochs, room = total_steps // spe, max(total_steps - last, 0)
        most_steps = 1 + room // interval
        fixes = [f"prune.dpm.steps {most_steps} or fewer (with interval {interval})" if most_steps > 1 else
                 f"prune.dpm.steps 1 (with interval {interval} no second decay step fits: removal at the event)"]
        if n > 1 and room // (n - 1) >= 1:
            fixes.append(f"prune.dpm.interval {room // (n - 1)} or less (with {n} steps)")
        elif n > 1:
            fixes.append(f"prune.dpm.interval cannot help alone: only {room} optimizer steps follow the last event")
        latest = total_steps - (n - 1) * interval  # the last event must come by this step
        current_end = self.spec.schedule_end_epoch()
        end = next((e for e in range(current_end - 1, sched.start_epoch - 1, -1) if last_step(e) <= latest), None)
        if end is not None:
            fixes.append(f"prune.schedule.end_epoch {end} (the last event by step {latest})")
        elif latest >= 0:
            fixes.append(f"an earlier schedule (prune.schedule.start_epoch / end_epoch): the last event by optimizer "
                         f"step {latest}, epoch {latest / spe:.2f}")
        more = next((e for e in range(epochs + 1, epochs + 100_000)
                     if last_step(sched.end_epoch if sched.end_epoch is not None else e // 2) + (n - 1) * interval
                     <= e * spe), None)
        if more is not None:
            fixes.append(f"finetune.epochs {more} or more")
        short = finish - total_steps
        warnings.append(
            f"prune.dpm: the decay started by the last event (optimizer step {last}) takes {n} decay steps "
            f"(prune.dpm.steps), one every {interval} optimizer steps (prune.dpm.interval), so it ends at step "
            f"{finish}, but training has {total_steps} steps ({epochs} epoch(s) x {spe}): {short} "
            f"step{'s' if short != 1 else ''} ({short / spe:.1f} epochs) short. The structures still decaying at the "
            f"end would be removed at once, without the smooth decay. Change one of: {'; '.join(fixes)}.")
        return warnings

    def summary(self) -> dict[str, Any]:
        base = super().summary()
        totals = {k: sum(r.get(k, 0) for r in self.records) for k in ("selected", "released", "backfilled", "removed")}
        return {**base, "dpm": self.dpm.model_dump(), "totals": totals, "decay_trace": self.finished,
                "sr_checks": self.checks}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decaying": [asdict(s) for s in self.decaying],
                "cooling": [[root, idx, ev] for (root, idx), ev in self.cooling.items()], "finished": self.finished,
                "checks": self.checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.decaying = [Structure(**s) for s in state["decaying"]]
        self.cooling = {(root, idx): ev for root, idx, ev in state["cooling"]}
        self.finished = state["finished"]
        self.checks = list(state.get("checks", []))
        self._slices = {}
