"""The contract between the training loop and a pruning method: hooks at fixed points, never the loop itself."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from compressor.markdown import number, table

if TYPE_CHECKING:
    from compressor.prune.context import PruneContext
    from compressor.prune.spec import PruneSpec

EVENT_COLUMNS = ("event", "epoch", "step", "selected", "released", "backfilled", "removed", "forced", "asked_macs",
                 "planned_macs", "achieved_macs", "params")


class PruningMethod:
    """No-op base: plain fine-tuning. Subclasses override the hooks they need.

    Hook order per run: on_train_start; per batch: (forward, backward) after_backward, (optimizer.step)
    after_step; per epoch: on_epoch_end; at the end: finalize. A method that changes the model's structure
    calls ctx.rebuild() so the optimizer (and the DDP wrapper) follow the new parameters.

    A method is built from a PruneSpec (its prune section, the model's example batch and ignored layers, the
    training budget), never from the app's Recipe: `METHODS.get(name)(spec)`.
    """

    name = "none"
    config_section = None  # (recipe key under prune, pydantic model) for a method that takes settings

    def __init__(self, spec: Optional["PruneSpec"] = None) -> None:
        self.spec = spec

    # -- what the pipeline and the recipe check ask of a method (instead of testing its name)
    @classmethod
    def keeps_dense_shapes(cls, prune: Any) -> bool:
        """True when the method removes nothing physically (its zeros stay in dense tensors): no MAC target,
        and the exported file's zipped size is what shrinks. `prune` is the recipe's prune section."""
        return cls is PruningMethod

    @classmethod
    def needs_training_budget(cls, prune: Any) -> bool:
        """True when the method can only act during training (finetune.epochs must be at least 1)."""
        return False

    def needs_calibration(self) -> bool:
        """True when the method may score channels on gradients of batches it runs itself before an event
        (ctx.calibration and ctx.loss_fn; compressor.Pruner requires them then)."""
        return False

    def needs_optimizer(self) -> bool:
        """True when the hooks read the optimizer (e.g. its learning rate); compressor.Pruner requires one then."""
        return False

    @classmethod
    def report_section(cls, summary: dict[str, Any]) -> list[str]:
        """Markdown lines for report.md from this method's summary() (as stored in report.json). The base renders
        the pruning events (summary["events"]) that every removing method records; subclasses add their own."""
        events = summary.get("events") or []
        if not events:
            return []
        keys = [k for k in EVENT_COLUMNS if any(k in e for e in events)]
        return ["## Pruning events", ""] + table(keys, [[number(e.get(k)) for k in keys] for e in events])

    @classmethod
    def figures(cls, summary: dict[str, Any], plt: Any) -> dict[str, Any]:
        """{name: matplotlib figure} drawn from this method's summary(); written as plot_<name>.png. `plt` offers
        pyplot's subplots() only (report._Figures: figures without pyplot, whose backend is the caller's)."""
        return {}

    def on_train_start(self, ctx: "PruneContext") -> None:
        """Called once before the first batch (also after a resume)."""

    def check_schedule(self, total_steps: int, steps_per_epoch: int) -> list[str]:
        """Warnings about this method's schedule in a budget of `total_steps` optimizer steps (`steps_per_epoch`
        per epoch): one human-readable sentence each, saying what goes wrong, by how much, and which recipe fields
        to change; [] when the schedule fits (the default). Called once before training (train.check_method_schedule
        prints them and records them in the report; gates.strict_schedule turns them into a RecipeError)."""
        return []

    def after_backward(self, ctx: "PruneContext") -> None:
        """Gradients of the current batch are in .grad (unscaled under AMP); nothing has been applied yet.
        Not called on AMP steps whose gradients are not finite (the gradient scaler skips those steps too)."""

    def after_step(self, ctx: "PruneContext") -> None:
        """The optimizer has stepped; ctx.step counts completed optimizer steps."""

    def on_epoch_end(self, ctx: "PruneContext") -> None:
        """The epoch's training batches are done (validation metrics of the epoch are in ctx.metrics)."""

    def finalize(self, ctx: "PruneContext") -> None:
        """Training is over: make the final structural decisions (e.g. remove what is left to remove)."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, strings, lists, dicts) needed to resume this method exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""

    def summary(self) -> dict[str, Any]:
        """What the report shows about this method's run (events, traces)."""
        return {"method": self.name}
