"""FGGP: fixed-rate gradient-first gradual pruning (Zhu, Bezek, Goksel, arXiv 2411.05500). Spec: docs/methods/fggp.md.

Sparsity follows the cubic schedule s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3 with an event every
`interval` iterations in [t0, t1]. At an event, among the still-active candidates, the fixed fraction r with the
smallest gradient magnitude on the current batch is taken first, then the k_t of those with the smallest weight
magnitude are pruned (k_t never exceeds r * active). `selection: magnitude` (plain gradual magnitude pruning) and
`selection: gradient` are the comparison baselines.

Granularities: `unstructured` (per-weight masks, global over conv/linear weights), `2:4` (the same rule inside
each group of 4 consecutive weights along the input dimension; at most 2 of 4 survive, the pattern TensorRT's
sparse tensor cores use), `structured` (the rule over dependency-group channels with group gradient and group
magnitude norms, removed physically to a MAC target). Masks are re-applied after every optimizer step (and the
momentum of pruned weights zeroed), so nothing regrows.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, TYPE_CHECKING

from pydantic import Field, model_validator
from torch import nn
import torch

from compressor.config import Strict
from compressor.errors import RecipeError
from compressor.markdown import table
from compressor.progress import info
from compressor.prune.importance import ImportanceConfig
from compressor.prune.importance import build_scorer
from compressor.prune.methods.base import PruningMethod
from compressor.prune.methods.hosts import broadcast_plan, remove_planned
from compressor.prune.methods.registry import METHODS
from compressor.prune import graph as dg
from compressor.prune.decoder_snapshot import check_decoder_spec
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import constraints_from, plan_for_macs, remember_widths
from compressor.prune.slices import channel_norms, structure_slices
from compressor.prune.snapshot import Snapshot, recipe_snapshot

if TYPE_CHECKING:
    from compressor.prune.spec import PruneSpec

class FGGPConfig(Strict):
    granularity: Literal["unstructured", "2:4", "structured"] = "unstructured"
    sparsity: float = Field(0.9, gt=0.0, lt=1.0, description="final sparsity s_f (unstructured)")
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    start: float = Field(0.0, ge=0.0, lt=1.0, description="t0 as a fraction of training")
    end: float = Field(0.8, gt=0.0, le=1.0, description="t1 as a fraction of training")
    interval: int = Field(100, gt=0, description="iterations between pruning events")
    grad_fraction: float = Field(0.5, gt=0.0, le=1.0, description="r: fraction with the smallest |grad|")
    selection: Literal["gradient-first", "magnitude", "gradient"] = "gradient-first"
    prune_first_conv: bool = False
    prune_classifier: bool = True

    @model_validator(mode="after")
    def _window(self) -> "FGGPConfig":
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        if self.initial_sparsity >= self.sparsity:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must be below sparsity ({self.sparsity})")
        return self


def cubic_sparsity(step: int, t0: int, t1: int, s_i: float, s_f: float) -> float:
    """s_t of the cubic schedule: s_i before t0, s_f after t1."""
    if step <= t0:
        return s_i
    if step >= t1:
        return s_f
    return s_f + (s_i - s_f) * (1 - (step - t0) / (t1 - t0)) ** 3


def event_steps(t0: int, t1: int, interval: int) -> list[int]:
    """Event iterations: every `interval` from t0, and always t1 (so the final sparsity is reached)."""
    steps = list(range(t0, t1, interval))
    return steps + [t1] if not steps or steps[-1] != t1 else steps


def capped_events(steps: list[int], t0: int, t1: int, s_i: float, s_f: float, r: float,
                  total_steps: int) -> list[tuple[int, float]]:
    """(step, share of the remaining weights the cubic schedule asks for) of the events within training that ask for
    more than r: gradient-first selection prunes at most r of the active weights per event, so the sparsity lags the
    schedule there (the event at t1 then prunes the rest by magnitude). Fractions of weights, floors ignored."""
    pruned, capped = 0.0, []
    for step in steps:
        if step >= total_steps:  # after training: magnitude only, no cap
            break
        target = cubic_sparsity(step, t0, t1, s_i, s_f)
        need = (target - pruned) / (1.0 - pruned)
        if need > r + 1e-9:
            capped.append((step, need))
            pruned = target if step >= t1 else pruned + r * (1.0 - pruned)
        else:
            pruned = max(pruned, target)
    return capped


def two_step_select(grad: torch.Tensor, weight: torch.Tensor, active: torch.Tensor, k: int, r: float,
                    selection: str) -> torch.Tensor:
    """Flat indices (into the 1-d inputs) of the k weights to prune among `active` ones.

    gradient-first: the r-fraction of active weights with the smallest |grad|, then the k smallest |w| of those
    (k capped at that fraction); magnitude: the k smallest |w|; gradient: the k smallest |grad|.
    """
    idx = torch.nonzero(active, as_tuple=False).flatten()
    if k <= 0 or idx.numel() == 0:
        return idx[:0]
    g, w = grad[idx].abs(), weight[idx].abs()
    if selection == "magnitude":
        return idx[torch.argsort(w, stable=True)[: min(k, idx.numel())]]
    if selection == "gradient":
        return idx[torch.argsort(g, stable=True)[: min(k, idx.numel())]]
    pool = max(1, int(math.floor(r * idx.numel())))
    low_grad = torch.argsort(g, stable=True)[:pool]
    k = min(k, pool)
    return idx[low_grad[torch.argsort(w[low_grad], stable=True)[:k]]]


def _input_groups(weight: torch.Tensor) -> torch.Tensor:
    """View a conv/linear weight as (groups, 4) along the input dimension (dim 1)."""
    moved = weight.movedim(1, -1)  # (out, kh, kw, in)
    return moved.reshape(-1, 4)


@METHODS.register("fggp")
class FGGP(PruningMethod):
    config_section = ("fggp", FGGPConfig)

    @classmethod
    def keeps_dense_shapes(cls, prune) -> bool:
        return prune.fggp.granularity != "structured"  # unstructured and 2:4 zeros stay in dense tensors

    @classmethod
    def needs_training_budget(cls, prune) -> bool:
        return prune.fggp.granularity != "structured"  # gradual pruning happens between optimizer steps

    @classmethod
    def report_section(cls, summary: dict[str, Any]) -> list[str]:
        sparsity = summary.get("sparsity")
        lines = []
        if sparsity:
            lines = ["## Sparsity", "", f"Overall sparsity of the pruned layers: **{sparsity['overall']:.3f}** "
                     f"({summary.get('granularity')}, selection {summary.get('selection')}). "
                     f"{summary.get('note', '')}", ""]
            lines += table(["layer", "sparsity"], [[n, f"{v:.3f}"] for n, v in sparsity["per_layer"].items()])
        return lines + super().report_section(summary)

    def __init__(self, spec: PruneSpec) -> None:
        super().__init__(spec)
        self.cfg = spec.prune.fggp
        self.structured = self.cfg.granularity == "structured"
        self.masks: dict[str, torch.Tensor] = {}
        self.steps: list[int] = []
        self.done = 0
        self.records: list[dict[str, Any]] = []
        self.dense_macs: Optional[float] = None
        self.dense_widths: dict[str, int] = {}  # structured: group widths before any removal (round_to)
        self.t0 = self.t1 = 0

    # ------------------------------------------------------------------------------------------ setup
    def prunable_layers(self, model: nn.Module, example: torch.Tensor) -> dict[str, nn.Module]:
        """Conv/linear layers whose weights FGGP masks (first conv and classifier per prune.fggp)."""
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        names = list(layers)
        heads = {id(m) for m in dg.output_layers(model, example)}
        ignored = {id(m) for m in dg.resolve_ignored(model, self.spec.model.ignore, example)}
        keep = {}
        for name, module in layers.items():
            if name == names[0] and not self.cfg.prune_first_conv:
                continue
            if id(module) in heads and not self.cfg.prune_classifier:
                continue
            if id(module) in ignored and id(module) not in heads:
                continue
            if self.cfg.granularity == "2:4" and (module.weight.shape[1] % 4 or getattr(module, "groups", 1) > 1):
                continue
            keep[name] = module
        return keep

    def on_train_start(self, ctx) -> None:
        self.t0 = int(self.cfg.start * ctx.total_steps)
        self.t1 = max(self.t0 + 1, int(self.cfg.end * ctx.total_steps))
        self.steps = event_steps(self.t0, self.t1, self.cfg.interval)
        self.masks = {n: m.to(ctx.device) for n, m in self.masks.items()}  # masks restored by a resume are on CPU
        if not self.masks and not self.structured:
            layers = self.prunable_layers(ctx.model, self._example(ctx))
            if not layers:
                raise RecipeError(f"prune.fggp: no layer of the model can be pruned with granularity {self.cfg.granularity}.")
            self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
        if self.dense_macs is None:
            if self.structured:  # a decoder LM's recipe against the still dense model
                check_decoder_spec(ctx.model, self.spec)
            self.dense_macs = snapshot_macs(ctx.model, self._example(ctx))[0]

    def _example(self, ctx) -> torch.Tensor:
        return self.spec.model.example.to(ctx.device)

    def check_schedule(self, total_steps: int, steps_per_epoch: int) -> list[str]:
        """The window t0..t1 (prune.fggp.start / end of training) with an event every `interval` steps, as
        on_train_start places it: events must fall within training (an event runs before the optimizer step it is
        scheduled at; later ones run after training, by magnitude, with no fine-tuning after them), at least 2 must
        raise the sparsity after t0 (else the schedule is one jump), and under gradient-first selection
        (unstructured) no event may ask for more than grad_fraction of the remaining weights."""
        cfg = self.cfg
        t0 = int(cfg.start * total_steps)
        t1 = max(t0 + 1, int(cfg.end * total_steps))
        steps = event_steps(t0, t1, cfg.interval)
        inside = [s for s in steps if s < total_steps]
        window = (f"window steps {t0}..{t1} of {total_steps} (prune.fggp.start {cfg.start}, end {cfg.end}), an event "
                  f"every {cfg.interval} steps (prune.fggp.interval)")
        if not inside:
            return [f"prune.fggp: none of the {len(steps)} pruning event(s) falls within training ({window}): they all "
                    "run after the last optimizer step, by weight magnitude only, with no fine-tuning after them; "
                    "train longer (finetune.epochs)."]
        warnings = []
        if len(inside) < len(steps):
            warnings.append(
                f"prune.fggp: the last {len(steps) - len(inside)} pruning event(s) fall after the last optimizer step "
                f"({window}): they run at the end by weight magnitude only, with no fine-tuning after them; lower "
                "prune.fggp.end below 1.0 or train longer (finetune.epochs).")
        gradual = [s for s in inside if s > t0]
        if len(gradual) < 2:
            most = t1 - t0 - 1  # the largest interval that puts 2 events after t0
            fix = f"prune.fggp.interval {most} or less" if most >= 1 else "more optimizer steps in the window"
            warnings.append(
                f"prune.fggp: only {len(gradual)} event(s) after the window's start raise the sparsity ({window}): the "
                f"final sparsity is reached in one jump, not gradually; use {fix}, widen prune.fggp.start / end, or "
                "train longer (finetune.epochs).")
        elif cfg.granularity == "unstructured" and cfg.selection == "gradient-first":
            args = (t0, t1, cfg.initial_sparsity, cfg.sparsity, cfg.grad_fraction, total_steps)
            capped = capped_events(steps, *args)
            if capped:
                smooth = next((i for i in range(cfg.interval - 1, 0, -1)
                               if not capped_events(event_steps(t0, t1, i), *args)), None)
                fix = f"prune.fggp.interval {smooth} or less" if smooth else "a smaller prune.fggp.interval"
                step, need = capped[0]
                warnings.append(
                    f"prune.fggp: {len(capped)} of the {len(steps)} events ask for more than grad_fraction "
                    f"{cfg.grad_fraction} of the remaining weights (the first, at step {step}: {need:.0%}), the most "
                    f"gradient-first selection prunes per event, so the sparsity lags the cubic schedule ({window}) "
                    f"and the last event prunes the rest by magnitude; use {fix}, widen prune.fggp.start / end, train "
                    "longer (finetune.epochs), or raise prune.fggp.grad_fraction.")
        return warnings

    # ------------------------------------------------------------------------------------------ hooks
    def after_backward(self, ctx) -> None:
        """Events use the current batch's gradients, before the optimizer applies them."""
        step = ctx.step  # optimizer steps completed so far; this batch's step comes next
        while self.done < len(self.steps) and self.steps[self.done] <= step:
            self.event(ctx, self.steps[self.done])
            self.done += 1

    def after_step(self, ctx) -> None:
        self.apply_masks(ctx)

    def finalize(self, ctx) -> None:
        if self.done < len(self.steps):  # training ended early: reach the final sparsity with the last gradients
            info("FGGP: training ended before the schedule did; the remaining events use magnitudes only")
            while self.done < len(self.steps):
                self.event(ctx, self.steps[self.done], final=True)
                self.done += 1

    @torch.no_grad()
    def apply_masks(self, ctx) -> None:
        for name, mask in self.masks.items():
            param = ctx.model.get_submodule(name).weight
            param.mul_(mask)
            buf = ctx.optimizer.state.get(param, {}).get("momentum_buffer") if ctx.optimizer else None
            if buf is not None:
                buf.mul_(mask)

    # ------------------------------------------------------------------------------------------ events
    def event(self, ctx, step: int, final: bool = False) -> None:
        if self.structured:
            self.structured_event(ctx, step, final)
        else:
            self.mask_event(ctx, step, final)

    def target_sparsity(self, step: int) -> float:
        end = self.cfg.sparsity if self.cfg.granularity == "unstructured" else 0.5
        return cubic_sparsity(step, self.t0, self.t1, self.cfg.initial_sparsity, end)

    @torch.no_grad()
    def mask_event(self, ctx, step: int, final: bool) -> None:
        s_t = self.target_sparsity(step)
        model = ctx.model
        selection = "magnitude" if final else self.cfg.selection
        topped_up = 0
        if self.cfg.granularity == "2:4":
            pruned = self._event_2of4(model, s_t, selection)
        else:
            params = [model.get_submodule(n).weight for n in self.masks]
            weight = torch.cat([p.detach().flatten() for p in params])
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in params])
            active = torch.cat([m.flatten() for m in self.masks.values()])
            total = active.numel()
            k = int(round(s_t * total)) - int(total - active.sum())
            chosen = two_step_select(grad, weight, active, k, self.cfg.grad_fraction, selection)
            flat = torch.ones(total, dtype=torch.bool, device=active.device)
            flat[chosen] = False
            short = k - chosen.numel()
            if short > 0 and step >= self.t1:
                # a schedule steeper than r allows (few events) would end below the asked sparsity: the last
                # event prunes the shortfall by magnitude among the remaining weights, and says so
                extra = two_step_select(grad, weight, active & flat, short, 1.0, "magnitude")
                flat[extra] = False
                chosen, topped_up = torch.cat([chosen, extra]), short
                info(f"FGGP: the last event needed {k} weights but the r = {self.cfg.grad_fraction} low-gradient "
                     f"pool held {k - short}; {short} more were pruned by magnitude to reach sparsity {s_t:.3f}")
            offset = 0
            for name, mask in self.masks.items():
                n = mask.numel()
                mask &= flat[offset:offset + n].view_as(mask)
                offset += n
            pruned = int(chosen.numel())
        self._zero_pruned(model)
        self.records.append({"event": len(self.records) + 1, "step": step, "target_sparsity": s_t, "pruned": pruned,
                             "sparsity": self.sparsity()["overall"], "by_magnitude": topped_up})

    def _event_2of4(self, model: nn.Module, s_t: float, selection: str) -> int:
        """Per group of 4 along the input dimension: reach floor(4 s_t) zeros with the two-step rule."""
        zeros_wanted = int(math.floor(4 * s_t + 1e-9))
        pruned = 0
        for name, mask in self.masks.items():
            param = model.get_submodule(name).weight
            w = _input_groups(param.detach())
            g = _input_groups(param.grad.detach() if param.grad is not None else torch.zeros_like(param))
            m = _input_groups(mask).clone()  # of a channels-last mask the grouping is a view of the mask itself
            active = m.sum(1)
            need = (zeros_wanted - (4 - active)).clamp_min(0)
            for count in need.unique().tolist():
                if count <= 0:
                    continue
                rows = torch.nonzero(need == count).flatten()
                score_g = torch.where(m[rows], g[rows].abs(), torch.full_like(g[rows], float("inf")))
                score_w = w[rows].abs()
                if selection == "magnitude":
                    order = torch.argsort(torch.where(m[rows], score_w, torch.full_like(score_w, float("inf"))), dim=1)
                    drop = order[:, :count]
                elif selection == "gradient":
                    drop = torch.argsort(score_g, dim=1)[:, :count]
                else:
                    active_count = 4 - zeros_wanted + count  # the same for every row needing `count` more zeros
                    pool = max(count, int(math.floor(self.cfg.grad_fraction * active_count)))
                    low = torch.argsort(score_g, dim=1)[:, :pool]
                    drop = low.gather(1, torch.argsort(score_w.gather(1, low), dim=1)[:, :count])
                sub = m[rows]
                sub.scatter_(1, drop, False)
                m[rows] = sub
                pruned += int(rows.numel() * count)
            mask.copy_(m.view(mask.movedim(1, -1).shape).movedim(-1, 1))
        return pruned

    @torch.no_grad()
    def _zero_pruned(self, model: nn.Module) -> None:
        for name, mask in self.masks.items():
            param = model.get_submodule(name).weight
            param.mul_(mask)
            if param.grad is not None:
                param.grad.mul_(mask)

    def structured_event(self, ctx, step: int, final: bool) -> None:
        """Channels: the r-fraction with the smallest group gradient norm, then the smallest group magnitude,
        removed physically until this event's MAC target."""
        remaining = self.spec.prune.target.remaining_macs()
        if remaining is None:
            raise RecipeError("prune.fggp granularity structured needs a MAC target: prune.target.macs or speedup.")
        progress = cubic_sparsity(step, self.t0, self.t1, 0.0, 1.0)
        asked = 1 - (1 - remaining) * progress
        example = self._example(ctx)
        snap = recipe_snapshot(ctx.model, example, self.spec, build_scorer(ImportanceConfig(kind="magnitude")))
        excluded = {} if final else self._outside_low_gradient(ctx, snap, example)
        remember_widths(self.dense_widths, snap)
        cons = constraints_from(self.spec, global_ranking=True, excluded=excluded, dense_widths=self.dense_widths)
        plan = broadcast_plan(plan_for_macs(snap, asked * self.dense_macs, cons))
        done = remove_planned(ctx, example, plan, snap.macs_after(plan) / self.dense_macs, self.dense_macs)
        self.records.append({"event": len(self.records) + 1, "step": step, "asked_macs": asked, **done})

    def _outside_low_gradient(self, ctx, snap: Snapshot, example) -> dict[str, set[int]]:
        """Channels NOT in the r-fraction with the smallest (group-normalised) gradient norm."""
        slices = structure_slices(ctx.model, example, [c.root for c in snap.candidates], out_only=False)
        entries = []
        for cand in snap.candidates:
            norms = channel_norms(slices[cand.root], grad=True)
            norms = norms / norms.mean().clamp_min(1e-12)
            entries += [(float(norms[i]), cand.root, i) for i in range(cand.width)]
        entries.sort()
        keep = int(math.floor(self.cfg.grad_fraction * len(entries)))
        outside: dict[str, set[int]] = {}
        for _, root, i in entries[keep:]:
            outside.setdefault(root, set()).add(i)
        return outside

    # ------------------------------------------------------------------------------------------ report
    def sparsity(self) -> dict[str, Any]:
        per_layer = {n: 1 - float(m.float().mean()) for n, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        return {"overall": zeros / total if total else 0.0, "per_layer": per_layer}

    def summary(self) -> dict[str, Any]:
        out = {"method": self.name, "granularity": self.cfg.granularity, "selection": self.cfg.selection,
               "events": self.records}
        if not self.structured:
            out["sparsity"] = self.sparsity()
            out["note"] = ("unstructured and 2:4 sparsity keep dense tensor shapes: dense runtimes (ONNX Runtime CPU, "
                           "torch) gain no latency; the zeros pay off in compressed file size and on sparse runtimes "
                           "(TensorRT sparse tensor cores for 2:4).")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()}, "done": self.done, "records": self.records,
                "dense_macs": self.dense_macs, "dense_widths": self.dense_widths}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state["masks"])
        self.done, self.records, self.dense_macs = state["done"], state["records"], state["dense_macs"]
        self.dense_widths = dict(state.get("dense_widths", {}))
