"""OCSP: one-cycle structured pruning with a stability-driven structure search (Ghimire et al., arXiv 2501.13439).
Spec: docs/methods/ocsp.md.

One training run (from scratch or from a checkpoint): each epoch the candidate sub-network for the MAC target is
recomputed (saliency = mean over group members of sum(w^2)/sqrt(fan), BN gamma^2, optionally weighted by
1 - softmax of the per-channel MAC cost of each group; global ranking with a per-layer keep floor; bisection to
the target). The stability indicator is the mean over groups of the Jaccard similarity of the kept channels at
epoch t and t - lag, smoothed over `window` epochs. Once it plateaus (or at `reg_start`) the channels selected for
removal shrink by (1 - reg * lr) after every step, reg growing by reg_delta every reg_interval epochs. When the
smoothed indicator passes `threshold` (or at `latest_prune_epoch`) the candidate is removed physically, the
optimizer's state carried over to the kept slices, and training continues on the same LR schedule.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, TYPE_CHECKING, Union

from pydantic import Field
import torch

from compressor.config import Strict
from compressor.errors import RecipeError
from compressor.markdown import number, table
from compressor.progress import info
from compressor.prune.importance import ImportanceConfig
from compressor.prune.importance import build_scorer
from compressor.prune.decoder_snapshot import check_decoder_spec
from compressor.prune.methods.base import PruningMethod
from compressor.prune.methods.hosts import broadcast_plan, remove_planned
from compressor.prune.methods.registry import METHODS
from compressor.prune.planning import constraints_from, plan_for_macs
from compressor.prune.slices import scale_channels, structure_slices
from compressor.prune.snapshot import Plan, Snapshot, recipe_snapshot

if TYPE_CHECKING:
    from compressor.prune.spec import PruneSpec

class OCSPConfig(Strict):
    keep_floor: float = Field(0.25, gt=0.0, le=1.0, description="each layer keeps at least this fraction")
    cost_weighting: bool = True
    lag: int = Field(2, ge=1, description="compare kept sets with this many epochs earlier")
    window: int = Field(3, ge=1, description="epochs of smoothing of the stability indicator")
    threshold: float = Field(0.999, gt=0.0, le=1.0)
    reg_start: Union[Literal["auto"], int] = "auto"
    reg_init: float = Field(1e-4, ge=0.0)
    reg_delta: float = Field(1e-4, ge=0.0)
    reg_interval: int = Field(1, gt=0)
    plateau_tol: float = Field(1e-4, ge=0.0)
    plateau_epochs: int = Field(2, ge=1)
    latest_prune_epoch: Optional[int] = Field(None, ge=0)
    tolerance: float = Field(5e-4, gt=0.0)


def jaccard(a: set[int], b: set[int]) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def stability(kept_now: dict[str, set[int]], kept_before: dict[str, set[int]]) -> float:
    """Mean over groups of the Jaccard similarity of the kept channel sets."""
    roots = sorted(set(kept_now) | set(kept_before))
    return sum(jaccard(kept_now.get(r, set()), kept_before.get(r, set())) for r in roots) / max(len(roots), 1)


def cost_weights(snap: Snapshot) -> dict[str, float]:
    """1 - softmax over groups of the MACs one channel of each group costs (costs scaled to [0, 1])."""
    costs = torch.tensor([snap.total_macs - snap.macs_after({c.root: [0]}) for c in snap.candidates], dtype=torch.float64)
    soft = torch.softmax(costs / costs.max().clamp_min(1e-12), dim=0)
    return {c.root: float(1 - w) for c, w in zip(snap.candidates, soft)}


@METHODS.register("ocsp")
class OCSP(PruningMethod):
    config_section = ("ocsp", OCSPConfig)

    @classmethod
    def report_section(cls, summary: dict[str, Any]) -> list[str]:
        curve = summary.get("stability")
        if curve is None:
            return super().report_section(summary)
        saved = summary.get("time_saved_s")
        lines = ["## One-cycle structure search (OCSP)", "",
                 f"Regularisation started after epoch {summary.get('reg_started') or '-'}; pruned after epoch "
                 f"{summary.get('pruned_at')}. Training time saved versus training dense for the whole run (from the "
                 f"measured epoch times): {'-' if saved is None else f'{saved:.0f} s'}.", ""]
        lines += table(["epoch", "stability (raw)", "stability (smoothed)", "reg"],
                       [[h["epoch"], number(h["raw"], 4), number(h["smoothed"], 4), f"{h['reg']:g}"] for h in curve])
        return lines + super().report_section(summary)

    @classmethod
    def figures(cls, summary: dict[str, Any], plt: Any) -> dict[str, Any]:
        curve = summary.get("stability") or []
        if not curve:
            return {}
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, style in (("raw", "o:"), ("smoothed", "s-")):
            points = [(h["epoch"], h[key]) for h in curve if h[key] is not None]
            if points:
                ax.plot(*zip(*points), style, label=f"stability ({key})")
        ax.axhline(summary.get("ocsp", {}).get("threshold", 0.999), color="grey", ls="--", lw=1, label="threshold")
        if summary.get("reg_started"):
            ax.axvline(summary["reg_started"], color="#e67e22", ls=":", label="regularisation starts")
        if summary.get("pruned_at"):
            ax.axvline(summary["pruned_at"], color="#e74c3c", ls="-", lw=1, label="pruned")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean Jaccard of kept channels")
        ax.set_title("OCSP stability indicator")
        ax.legend(fontsize=8)
        return {"stability": fig}

    def __init__(self, spec: PruneSpec) -> None:
        super().__init__(spec)
        self.cfg = spec.prune.ocsp
        if spec.prune.target.remaining_macs() is None:
            raise RecipeError("method ocsp needs a MAC target: prune.target.macs or prune.target.speedup.")
        self.scorer = build_scorer(ImportanceConfig(kind="saliency"))
        self.history: list[dict[str, Any]] = []  # per epoch: kept sets, raw and smoothed stability, reg
        self.plan: Optional[Plan] = None
        self.reg = 0.0
        self.reg_started: Optional[int] = None
        self.pruned_at: Optional[int] = None
        self.dense_macs: Optional[float] = None
        self.planned_macs: Optional[float] = None
        self.result: dict[str, Any] = {}
        self._slices: dict[str, list] = {}

    # ------------------------------------------------------------------------------------------ search
    def candidate(self, ctx) -> tuple[Plan, Snapshot]:
        """The channels to remove for the target on the current weights (deterministic for a fixed state)."""
        example = self.spec.model.example.to(ctx.device)
        snap = recipe_snapshot(ctx.model, example, self.spec, self.scorer, normalize=False)
        if self.dense_macs is None:
            self.dense_macs = snap.total_macs
        if self.cfg.cost_weighting:
            weights = cost_weights(snap)
            for cand in snap.candidates:
                cand.scores = cand.scores * weights[cand.root]
        cons = constraints_from(self.spec, max_layer_ratio=1 - self.cfg.keep_floor, global_ranking=True)
        target = self.spec.prune.target.remaining_macs() * self.dense_macs
        plan = broadcast_plan(plan_for_macs(snap, target, cons))
        self.planned_macs = snap.macs_after(plan) / self.dense_macs
        return plan, snap

    @staticmethod
    def kept_sets(plan: Plan, snap: Snapshot) -> dict[str, set[int]]:
        return {c.root: set(range(c.width)) - set(plan.get(c.root, ())) for c in snap.candidates}

    def check_schedule(self, total_steps: int, steps_per_epoch: int) -> list[str]:
        """The smoothed stability indicator first exists after epoch lag + window; a stability-driven prune needs it
        before latest_prune_epoch (when set) and before the last epoch (so that training continues after it)."""
        epochs = total_steps // max(steps_per_epoch, 1)
        first = self.cfg.lag + self.cfg.window
        latest = self.cfg.latest_prune_epoch
        indicator = (f"the stability indicator first exists after epoch {first} (prune.ocsp.lag {self.cfg.lag} + "
                     f"window {self.cfg.window})")
        if latest is not None and latest < min(first, epochs):
            return [f"prune.ocsp: latest_prune_epoch {latest} comes before {indicator}: the prune is forced after "
                    f"epoch {max(latest, 1)} without a stability signal; raise prune.ocsp.latest_prune_epoch to "
                    f"{first} or more, or lower prune.ocsp.lag / window."]
        if first >= epochs and (latest is None or latest >= epochs):
            return [f"prune.ocsp: {indicator}, but training has {epochs} epoch(s) (finetune.epochs): no "
                    "stability-driven prune can leave epochs to recover, so the last candidate is pruned at the end of "
                    f"training with no fine-tuning after it; train at least {first + 1} epochs or lower "
                    "prune.ocsp.lag / window."]
        if latest is not None and latest >= epochs:
            return [f"prune.ocsp: latest_prune_epoch {latest} is not before the end of training ({epochs} epochs, "
                    "finetune.epochs): if the indicator never passes prune.ocsp.threshold, the prune happens at the "
                    f"end with no fine-tuning after it; lower prune.ocsp.latest_prune_epoch below {epochs}."]
        return []

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, ctx) -> None:
        if self.pruned_at is None and not self.history:  # a decoder LM's recipe against the still dense model
            check_decoder_spec(ctx.model, self.spec)
        if self.pruned_at is None and self.plan is None and self.history:
            self.plan, _ = self.candidate(ctx)  # resumed mid-search: the selection of the last epoch again

    def needs_optimizer(self) -> bool:
        """The regulariser's shrink factor follows the optimizer's learning rate."""
        return True

    def after_step(self, ctx) -> None:
        if self.pruned_at is not None or self.reg <= 0 or not self.plan:
            return
        factor = 1 - self.reg * ctx.optimizer.param_groups[0]["lr"]
        if not self._slices:
            self._slices = structure_slices(ctx.model, self.spec.model.example.to(ctx.device),
                                                list(self.plan), out_only=True)
        for root, idxs in self.plan.items():
            scale_channels(self._slices[root], {i: factor for i in idxs})

    def on_epoch_end(self, ctx) -> None:
        if self.pruned_at is not None:
            return
        epoch = ctx.epoch + 1  # epochs completed
        self.plan, snap = self.candidate(ctx)
        self._slices = {}
        kept = self.kept_sets(self.plan, snap)
        raw = stability(kept, self.history[-self.cfg.lag]["kept"]) if len(self.history) >= self.cfg.lag else None
        raws = [h["raw"] for h in self.history if h["raw"] is not None] + ([raw] if raw is not None else [])
        smoothed = sum(raws[-self.cfg.window:]) / len(raws[-self.cfg.window:]) if len(raws) >= self.cfg.window else None
        self.history.append({"epoch": epoch, "kept": kept, "raw": raw, "smoothed": smoothed, "reg": self.reg})
        self._update_regulariser(epoch)
        if (smoothed is not None and smoothed >= self.cfg.threshold) or \
                (self.cfg.latest_prune_epoch is not None and epoch >= self.cfg.latest_prune_epoch):
            self.prune(ctx, epoch, forced=smoothed is None or smoothed < self.cfg.threshold)

    def _update_regulariser(self, epoch: int) -> None:
        smoothed = [h["smoothed"] for h in self.history if h["smoothed"] is not None]
        if self.reg_started is None:
            start = self.cfg.reg_start
            plateau = (len(smoothed) > self.cfg.plateau_epochs and
                       abs(smoothed[-1] - smoothed[-1 - self.cfg.plateau_epochs]) <= self.cfg.plateau_tol)
            if (start == "auto" and plateau) or (start != "auto" and epoch >= int(start)):
                self.reg_started, self.reg = epoch, self.cfg.reg_init
                info(f"OCSP: regularisation starts after epoch {epoch} (reg {self.reg:g})")
        elif (epoch - self.reg_started) % self.cfg.reg_interval == 0:
            self.reg += self.cfg.reg_delta

    def prune(self, ctx, epoch: int, forced: bool = False) -> None:
        example = self.spec.model.example.to(ctx.device)
        done = remove_planned(ctx, example, self.plan, self.planned_macs, self.dense_macs)
        self.pruned_at = epoch
        self.result = {"epoch": epoch, **done, "forced": forced}
        info(f"OCSP: pruned after epoch {epoch}{' (latest_prune_epoch)' if forced else ' (stable)'}: "
             f"{done['removed']} channels removed, MACs {done['achieved_macs']:.3f} of dense")

    def finalize(self, ctx) -> None:
        if self.pruned_at is None:  # never stable within training: prune the last candidate so the target holds
            self.plan = self.plan or self.candidate(ctx)[0]
            self.prune(ctx, ctx.epoch, forced=True)
        self.result["time_saved_s"] = self._time_saved(ctx.history)

    def _time_saved(self, history: list[dict[str, Any]]) -> Optional[float]:
        """Training time saved versus training dense for the whole run (estimate from measured epoch times)."""
        before = [h["seconds"] for h in history if h["epoch"] <= (self.pruned_at or 0)]
        after = [h["seconds"] for h in history if h["epoch"] > (self.pruned_at or 0)]
        if not before or not after:
            return None
        return len(after) * (sum(before) / len(before)) - sum(after)

    # ------------------------------------------------------------------------------------------ report
    def summary(self) -> dict[str, Any]:
        curve = [{k: h[k] for k in ("epoch", "raw", "smoothed", "reg")} for h in self.history]
        events = [{"event": 1, **{k: v for k, v in self.result.items() if k != "time_saved_s"}}] if self.result else []
        return {"method": self.name, "stability": curve, "reg_started": self.reg_started, "pruned_at": self.pruned_at,
                "events": events, "time_saved_s": self.result.get("time_saved_s"), "ocsp": self.cfg.model_dump()}

    def state_dict(self) -> dict[str, Any]:
        history = [{**h, "kept": {r: sorted(v) for r, v in h["kept"].items()}} for h in self.history]
        return {"history": history, "reg": self.reg, "reg_started": self.reg_started, "pruned_at": self.pruned_at,
                "dense_macs": self.dense_macs, "result": self.result}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [{**h, "kept": {r: set(v) for r, v in h["kept"].items()}} for h in state["history"]]
        self.reg, self.reg_started, self.pruned_at = state["reg"], state["reg_started"], state["pruned_at"]
        self.dense_macs, self.result = state["dense_macs"], state["result"]
