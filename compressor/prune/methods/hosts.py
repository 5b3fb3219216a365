"""Hosts (which structures to remove, and their importance) and the baseline executions that remove them at once:
`oneshot` (one selection to the target, then fine-tuning) and `iterative` (several selections on a schedule).

Host variants: depgraph (group magnitude), depgraph-sl (group sparse learning through torch-pruning's
GroupNormPruner regularisation before each selection), gate-decorator (Taylor score of the batch-norm gates,
accumulated between events), taylor (group Taylor, accumulated between events).
"""
from __future__ import annotations

import abc
import copy
from typing import Any, Optional, TYPE_CHECKING

from pydantic import Field
from torch import nn
import torch
import torch_pruning as tp

from compressor.config import Strict
from compressor.errors import RecipeError
from compressor.models.loading import example_inputs
from compressor.progress import info
from compressor.prune.importance import ImportanceConfig
from compressor.prune.importance import build_scorer
from compressor.prune.methods.base import PruningMethod
from compressor.prune.methods.registry import HOSTS, METHODS
from compressor.prune.round_to import resolve_round_to
from compressor.prune import decoder_plan
from compressor.prune import graph as dg
from compressor.prune.block_influence import block_influence
from compressor.prune.decoder_snapshot import check_decoder_spec, is_decoder_model
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import (MISS_TOLERANCE, Constraints, constraints_from, plan_for_channels, plan_for_macs,
                                       plan_for_target, plan_mismatch, plan_size, remember_widths)
from compressor.prune.removal import remove
from compressor.prune.snapshot import Plan, Snapshot, recipe_snapshot

if TYPE_CHECKING:
    from compressor.app.recipe import Recipe
    from compressor.prune.spec import PruneSpec

CALIBRATION_BATCHES = 8


class SparseLearningConfig(Strict):
    """prune.sparse_learning: the depgraph-sl host's group-lasso regulariser (torch-pruning's GroupNormPruner)."""

    reg: float = Field(5e-4, gt=0.0)
    alpha: float = Field(4.0, ge=0.0, description="regularisation spread: weakest groups get 2**alpha times reg")


class Host:
    """depgraph: scores groups with the recipe's importance (prune.importance) and plans removals on the current
    model; accumulates gradient scores between events. Subclasses fix the importance or add a regulariser."""

    name = "depgraph"
    fixed_importance: Optional[str] = None  # an importance kind this host always ranks by
    config_section = None  # (recipe key under prune, pydantic model) for a host that takes settings

    def __init__(self, spec: PruneSpec) -> None:
        self.spec = spec
        self.cfg = spec.prune
        self.scorer = build_scorer(self.importance(spec.prune))
        self.regularised_steps = 0
        self.dense_widths: dict[str, int] = {}  # group widths of the dense model (round_to after removals)

    @classmethod
    def importance(cls, prune: Any) -> ImportanceConfig:
        """The importance this host ranks with: the prune section's, or the host's fixed kind (a different kind
        asked explicitly is a RecipeError)."""
        if cls.fixed_importance is None:
            return prune.importance
        if "importance" in prune.model_fields_set and prune.importance.kind != cls.fixed_importance:
            raise RecipeError(f"prune.importance.kind: host {cls.name} ranks by {cls.fixed_importance!r}, not "
                              f"{prune.importance.kind!r}; remove prune.importance or use host: depgraph.")
        return ImportanceConfig(kind=cls.fixed_importance)

    # -- hooks the executing method forwards
    def on_train_start(self, ctx) -> None:
        """Training starts, or resumes: gradient scores restored from the checkpoint attach to the model."""
        self.scorer.bind(ctx.model)

    def after_backward(self, ctx) -> None:
        if self.scorer.needs_gradients:
            self.scorer.observe(ctx.model)

    def after_step(self, ctx) -> None:
        """The optimizer has stepped (hosts that act on the weights during training: otov2)."""

    def check_schedule(self, event_steps: list[int], total_steps: int) -> list[str]:
        """Warnings about the executing method's event steps for this host (see PruningMethod.check_schedule)."""
        return []

    def structure_changed(self) -> None:
        """Parameters were replaced: accumulated scores are stale."""
        self.scorer.reset()

    def summary(self) -> dict[str, Any]:
        """What the report shows of the host's own work during training ({} for most hosts)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume the host exactly (beyond the dense widths the method saves): the gradient scores
        accumulated since the last structural change, and the regularised steps. Subclasses add their own."""
        return {"scorer": self.scorer.state_dict(), "regularised_steps": self.regularised_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned (a checkpoint from before these keys restores none: empty scores)."""
        self.scorer.load_state_dict(state.get("scorer", {}))
        self.regularised_steps = state.get("regularised_steps", 0)

    # -- planning
    def example(self, ctx) -> torch.Tensor:
        return self.spec.model.example.to(ctx.device)

    def ensure_scores(self, ctx) -> None:
        """Gradient scorers need batches: if none were observed since the last event, run a few now."""
        if not self.scorer.needs_gradients or self.scorer.observed_batches > 0:
            return
        if ctx.calibration is None:
            raise RecipeError(f"host {self.cfg.host} scores channels with gradients and needs training batches "
                              "to score them: a data section in compress, or calibration= and loss_fn= of "
                              "compressor.Pruner.")
        was_training = ctx.model.training
        ctx.model.train()
        for inputs, targets in ctx.calibration(CALIBRATION_BATCHES):
            ctx.model.zero_grad(set_to_none=True)
            ctx.loss_fn(ctx.model, inputs.to(ctx.device), targets.to(ctx.device)).backward()
            self.scorer.observe(ctx.model)
        ctx.model.zero_grad(set_to_none=True)
        ctx.model.train(was_training)

    @property
    def ranks_layers_by_influence(self) -> bool:
        """prune.decoder.layer_importance: block_influence on a decoder LM (the layers are ranked on batches)."""
        return self.cfg.decoder.layer_importance == "block_influence"

    def layer_scores(self, ctx) -> Optional[torch.Tensor]:
        """The block influence of each decoder layer on calibration batches when the recipe asks for it (None
        otherwise, and for a model that is not a decoder LM: the recipe check refused that already)."""
        if not self.ranks_layers_by_influence or not is_decoder_model(ctx.model):
            return None
        if ctx.calibration is None:
            raise RecipeError("prune.decoder.layer_importance: block_influence measures the layers on batches: a "
                              "data section in compress, or calibration= of compressor.Pruner.")
        return block_influence(ctx.model, ctx.calibration(CALIBRATION_BATCHES), ctx.device)

    def snapshot(self, ctx) -> Snapshot:
        self.ensure_scores(ctx)
        snap = recipe_snapshot(ctx.model, self.example(ctx), self.spec, self.scorer,
                               layer_scores=self.layer_scores(ctx))
        remember_widths(self.dense_widths, snap)
        return snap

    def constraints(self, **extra) -> Constraints:
        return constraints_from(self.spec, dense_widths=self.dense_widths, **extra)


HOSTS.register("depgraph")(Host)


@HOSTS.register("depgraph-sl")
class SparseLearningHost(Host):
    """depgraph-sl: group sparse learning (torch-pruning's GroupNormPruner regularisation on every step) before
    each selection."""

    config_section = ("sparse_learning", SparseLearningConfig)

    def __init__(self, spec: PruneSpec) -> None:
        super().__init__(spec)
        self.sparse: Optional[tp.pruner.GroupNormPruner] = None

    def after_backward(self, ctx) -> None:
        super().after_backward(ctx)
        if self.sparse is None:
            self.sparse = self._sparse_pruner(ctx)
        self.sparse.regularize(ctx.model, alpha=2 ** self.cfg.sparse_learning.alpha)
        self.regularised_steps += 1

    def structure_changed(self) -> None:
        """Parameters were replaced: scores and the regulariser's groups are stale."""
        super().structure_changed()
        self.sparse = None

    def summary(self) -> dict[str, Any]:
        return {"regularised_steps": self.regularised_steps}

    def _sparse_pruner(self, ctx) -> tp.pruner.GroupNormPruner:
        cfg = self.cfg.sparse_learning
        ignored = dg.resolve_ignored(ctx.model, self.spec.model.ignore, self.example(ctx))
        with dg.quiet_eval(ctx.model):  # tracing in train mode would move the BatchNorm statistics (resume differed)
            return tp.pruner.GroupNormPruner(
                ctx.model, self.example(ctx), importance=tp.importance.GroupMagnitudeImportance(p=2), reg=cfg.reg,
                alpha=2 ** cfg.alpha, ignored_layers=ignored, in_channel_groups={}, out_channel_groups={},
                num_heads={}, channel_groups={}, pruning_ratio=0.5)


@HOSTS.register("gate-decorator")
class GateDecoratorHost(Host):
    """gate-decorator: Taylor score of the batch-norm gates, accumulated between events."""

    fixed_importance = "gate"


@HOSTS.register("taylor")
class TaylorHost(Host):
    """taylor: group Taylor score, accumulated between events."""

    fixed_importance = "taylor"


def make_host(spec: PruneSpec) -> Host:
    """The registered host the prune section names (prune.host)."""
    return HOSTS.get(spec.prune.host)(spec)


def fraction_at(progress: float, shape: str) -> float:
    """Share of the final pruning amount reached at `progress` in (0, 1] of the schedule."""
    progress = min(max(progress, 0.0), 1.0)
    return progress if shape == "linear" else 1 - (1 - progress) ** 3


def event_epochs(spec: PruneSpec, events: int) -> list[float]:
    """When each selection event happens, in (fractional) epochs of training, spread over [start_epoch, end_epoch)."""
    start, end = spec.prune.schedule.start_epoch, spec.schedule_end_epoch()
    end = max(end, start)
    return [start + e * (end - start) / events for e in range(events)]


class EventMethod(PruningMethod, abc.ABC):
    """Selections at scheduled epochs; subclasses decide what an event does with the planned channels."""

    def __init__(self, spec: PruneSpec, events: int) -> None:
        super().__init__(spec)
        self.host = make_host(spec)
        self.events = events
        self.epochs = event_epochs(spec, events)
        self.steps: list[int] = []
        self.done = 0
        self.dense_macs: Optional[float] = None
        self.dense_channels: Optional[int] = None
        self.records: list[dict[str, Any]] = []

    def after_backward(self, ctx) -> None:
        self.host.after_backward(ctx)

    def needs_calibration(self) -> bool:
        """Gradient scorers (taylor, gate-decorator's gates, a gradient prune.importance) score an event without
        observed batches (the first one at step 0, several on one step) on calibration batches."""
        return self.host.scorer.needs_gradients or self.host.ranks_layers_by_influence

    def check_schedule(self, total_steps: int, steps_per_epoch: int) -> list[str]:
        """Events with no fine-tuning after them (at or after the last optimizer step), and events that fall on
        the same optimizer step (a schedule window too short for its events: several selections at once).
        finetune.epochs: 0 (pruning without training, every event at once) is taken as asked."""
        if total_steps <= 0:
            return []
        steps = [round(e * steps_per_epoch) for e in self.epochs]  # as on_train_start places them
        sched = self.spec.prune.schedule
        end = self.spec.schedule_end_epoch()
        window = (f"prune.schedule.start_epoch {sched.start_epoch}, end_epoch {end}"
                  f"{'' if sched.end_epoch is not None else ' (unset: half of finetune.epochs)'}")
        warnings = []
        late = [s for s in steps if s >= total_steps]
        if late:
            warnings.append(
                f"prune.schedule: {len(late)} of the {self.events} {self.name} event(s) fall at or after the last of "
                f"the {total_steps} optimizer steps ({window}), so no fine-tuning follows them; end the schedule "
                "earlier (prune.schedule.start_epoch / end_epoch) or train longer (finetune.epochs).")
        warnings += self.host.check_schedule(steps, total_steps)
        distinct = len(set(steps))
        if distinct < len(steps):
            warnings.append(
                f"prune.schedule: the {self.events} {self.name} events fall on only {distinct} distinct optimizer "
                f"step(s) ({', '.join(map(str, sorted(set(steps))))}; {window}, {steps_per_epoch} steps per epoch), so "
                "several selections happen at once with no fine-tuning between them; widen the window "
                "(prune.schedule.end_epoch), lower prune.schedule.events, or train longer (finetune.epochs).")
        return warnings

    def on_train_start(self, ctx) -> None:
        if self.done == 0 and self.dense_macs is None:  # not resumed after an event: the model is still dense
            check_decoder_spec(ctx.model, self.spec)
        self.steps = [round(e * ctx.steps_per_epoch) for e in self.epochs]
        self.host.on_train_start(ctx)
        self._run_due(ctx)

    def after_step(self, ctx) -> None:
        self.host.after_step(ctx)
        self._run_due(ctx)

    def finalize(self, ctx) -> None:
        self._run_due(ctx, final=True)

    def _run_due(self, ctx, final: bool = False) -> None:
        """Run the events whose optimizer step has come (all remaining ones at the end of training)."""
        while self.done < self.events and (final or self.steps[self.done] <= ctx.step):
            self.event(ctx, self.done, ctx.step / ctx.steps_per_epoch)
            self.done += 1

    def target_plan(self, ctx, index: int, **constraints) -> tuple[Plan, Snapshot, float]:
        """Plan for event `index`: the interim target on the schedule; returns (plan, snapshot, asked fraction)."""
        snap = self.host.snapshot(ctx)
        if self.dense_macs is None:
            self.dense_macs = snap.total_macs
            self.dense_channels = sum(c.width for c in snap.candidates)
        share = fraction_at((index + 1) / self.events, self.spec.prune.schedule.shape)
        target = self.spec.prune.target
        cons = self.host.constraints(**constraints)
        if snap.decoder is not None:  # a decoder LM: per-kind fractions of the dense widths (prune/decoder_plan.py)
            plan, asked = decoder_plan.event_plan(snap, target, share, self.dense_macs, cons)
            return broadcast_plan(plan), snap, asked
        remaining = target.remaining_macs()
        if remaining is not None:
            asked = 1 - (1 - remaining) * share
            plan = plan_for_macs(snap, asked * self.dense_macs, cons)
        else:
            asked = target.channels * share
            current = sum(c.width for c in snap.candidates)
            already = self.dense_channels - current
            ratio = max(0.0, asked * self.dense_channels - already) / max(current, 1)
            plan = plan_for_channels(snap, ratio, cons)
        return broadcast_plan(plan), snap, asked

    @abc.abstractmethod
    def event(self, ctx, index: int, epoch: float) -> None:
        """Event `index`, taking place after `epoch` (fractional) epochs of training."""

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "dense_macs": self.dense_macs, "dense_channels": self.dense_channels,
                "records": self.records, "dense_widths": self.host.dense_widths, "host": self.host.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done, self.records = state["done"], state["records"]
        self.dense_macs, self.dense_channels = state["dense_macs"], state["dense_channels"]
        self.host.dense_widths = dict(state.get("dense_widths", {}))
        self.host.load_state_dict(state.get("host", {}))

    def summary(self) -> dict[str, Any]:
        host = self.host.summary()
        return {"method": self.name, "host": self.spec.prune.host, "events": self.records,
                "event_epochs": self.epochs, **({"host_state": host} if host else {})}


def remove_planned(ctx, example: torch.Tensor, plan: Plan, planned_macs: Optional[float],
                   dense_macs: float) -> dict[str, Any]:
    """Remove `plan` from ctx.model, let the optimizer follow (ctx.rebuild), and measure the result: removed count, achieved MACs
    and params (fractions of dense MACs), and a note when the MACs torch-pruning left differ from the plan's by
    more than MISS_TOLERANCE (a coupling the cost model did not see)."""
    removed = remove(ctx.model, example, plan)
    if removed:
        ctx.rebuild()
    macs, params = snapshot_macs(ctx.model, example)
    result: dict[str, Any] = {"removed": removed, "achieved_macs": macs / dense_macs, "params": params}
    if planned_macs is not None:
        result["planned_macs"] = planned_macs
        note = plan_mismatch(planned_macs, result["achieved_macs"], removed)
        if note:
            result["note"] = note
            info(f"note: {note}")
    return result


class RemovingMethod(EventMethod):
    """Remove the selected channels immediately at each event (the host's own single-step execution)."""

    def event(self, ctx, index: int, epoch: float) -> None:
        plan, snap, asked = self.target_plan(ctx, index)
        done = remove_planned(ctx, self.host.example(ctx), plan, snap.macs_after(plan) / self.dense_macs,
                              self.dense_macs)
        self.host.structure_changed()
        record = {"event": index + 1, "epoch": epoch, "step": ctx.step, "selected": done["removed"], **done,
                  "asked_macs": asked if self.spec.prune.target.channels is None else None,
                  "regularised_steps": self.host.regularised_steps}
        self.records.append(record)
        info(f"pruning event {index + 1}/{self.events}: removed {done['removed']} structures, MACs "
             f"{record['achieved_macs']:.3f} of dense")


@METHODS.register("oneshot")
class OneShot(RemovingMethod):

    def __init__(self, spec: PruneSpec) -> None:
        super().__init__(spec, events=1)


@METHODS.register("iterative")
class Iterative(RemovingMethod):

    def __init__(self, spec: PruneSpec) -> None:
        super().__init__(spec, events=spec.prune.schedule.events)


def broadcast_plan(plan: Plan) -> Plan:
    """Under DDP every rank adopts rank 0's plan, so all ranks take the same decision."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return plan
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def predict_pruning(model: nn.Module, recipe: Recipe) -> dict[str, Any]:
    """What the recipe's final target gives on this model (computed on a copy, magnitude scores)."""
    recipe = resolve_round_to(recipe)[0]
    check_decoder_spec(model, recipe)
    work = copy.deepcopy(model).cpu().eval()
    example = example_inputs(recipe.model)
    scorer = build_scorer(ImportanceConfig(kind="magnitude"))
    snap = recipe_snapshot(work, example, recipe, scorer)
    target = recipe.prune.target
    plan = plan_for_target(snap, target, constraints_from(recipe))
    remaining = target.remaining_macs()
    asked = f"macs {remaining:.3f}" if remaining is not None else f"channels {target.channels:.3f} removed"
    if target.is_latency:  # inspect does not time anything: the loop in compress decides the MAC fraction
        asked = (f"latency speedup x{target.asked_latency_speedup():.2f} (estimated as macs {remaining:.3f}; compress "
                 "measures which MAC fraction gives it)")
    remove(work, example, plan)
    macs, params = snapshot_macs(work, example)
    result = {"asked": asked, "macs_ratio": macs / snap.total_macs, "params_ratio": params / snap.params,
              "channels_removed": plan_size(plan)}
    if snap.decoder is not None:  # what each layer keeps (decoder LMs: layers, heads, MLP width, hidden size)
        from compressor.models.decoder import decoder_sites, layer_widths

        result["decoder_widths"] = {"layers": len(layer_widths(work)), "hidden": decoder_sites(work, ["hidden"],
                                                                                                prunable=False)[0].width,
                                    "per_layer": layer_widths(work)}
    return result
