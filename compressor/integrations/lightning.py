"""`PruningCallback`: prune inside a Lightning `Trainer.fit` run (the [lightning] extra).

    from compressor.integrations.lightning import PruningCallback

    callback = PruningCallback(torch.randn(1, 3, 32, 32), prune={"method": "dpm", "target": {"macs": 0.5}})
    lightning.Trainer(max_epochs=3, callbacks=[callback]).fit(module, train_loader)
    compressor.deploy(module.net, example, "runs/lightning")

Where each Pruner hook runs (lightning 2.4 to 2.6, automatic optimization):

    on_train_start            the Pruner is built over the LightningModule (its forward is the model's inference)
                              and trainer.optimizers[0]; the budget is max_epochs epochs of
                              ceil(num_training_batches / accumulate_grad_batches) optimizer steps (without
                              max_epochs: estimated_stepping_batches); a restored Pruner state is applied
    on_before_optimizer_step  after_backward(): once per optimizer step, with the gradients accumulated over
                              accumulate_grad_batches micro-batches (unscaled under 16-bit AMP), before Lightning
                              clips them
    on_train_batch_end        after_step(), when trainer.global_step moved (an optimizer step happened, not a
                              micro-batch of an accumulation); a removal happens here, after the step and the
                              step-interval LR schedulers; the optimizer is remapped in place (groups, momentum,
                              Adam moments follow the kept channels), so its LR schedulers keep working
    on_train_epoch_end        epoch_end(metrics): trainer.callback_metrics (this epoch's validation included)
    state_dict / load_state_dict   the Pruner's state in Lightning's checkpoint
    on_train_end              finalize(): the last removals, so the target holds; batch-norm statistics re-estimated

Resume: `trainer.fit(module, ckpt_path=...)`. The checkpoint's weights have the pruned shapes, so from `setup` until
training starts, a state dict loaded into the module first resizes its layers to the saved shapes; Lightning then
builds the optimizer (configure_optimizers) over the pruned parameters and loads its saved state.

One process, one optimizer: a distributed run or several optimizers are refused before the first step.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from compressor.errors import UsageError
from compressor.integrations import require
from compressor.integrations.adapter import PrunerAdapter, optimizer_steps_per_epoch, plain_metrics, single_process

pl = require("lightning.pytorch", "lightning", "compressor.integrations.lightning")


class PruningCallback(pl.Callback):
    """Prunes the LightningModule with `compressor.Pruner` while Lightning trains it.

    example_inputs: one input batch for the module's forward, to trace it and count MACs. prune: the prune section
    (a dict, a PruneConfig, or a YAML file holding one or a whole recipe); ignore (the module's layer names, e.g.
    "net.fc"), round_to, loss_fn, calibration: as `compressor.Pruner`. on_structure_change(pruner): called after each
    removal, once trainer.optimizers[0] has been remapped. recalibrate_batches: after the last removal the
    batch-norm statistics are re-estimated on this many training batches (their first element is the module's
    input), as `compress` does; 0 keeps the statistics training left.
    """

    def __init__(self, example_inputs: torch.Tensor, *, prune: Any = None, ignore: Sequence[str] = (),
                 round_to: Optional[int] = None, on_structure_change: Optional[Callable[[Any], None]] = None,
                 loss_fn: Optional[Callable[..., torch.Tensor]] = None,
                 calibration: Optional[Callable[[int], Any]] = None, recalibrate_batches: int = 32) -> None:
        self.adapter = PrunerAdapter("lightning", example_inputs, prune=prune, ignore=ignore, round_to=round_to,
                                     on_structure_change=on_structure_change, loss_fn=loss_fn, calibration=calibration,
                                     recalibrate_batches=recalibrate_batches)
        self._steps_seen = 0

    @property
    def pruner(self) -> Any:
        """The `compressor.Pruner` (None before training starts)."""
        return self.adapter.pruner

    # ------------------------------------------------------------------------------------------ start
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":  # a resume loads pruned weights before training starts
            self.adapter.conform_on_load(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        single_process(trainer.world_size, "lightning")
        if len(trainer.optimizers) != 1:
            raise UsageError(f"the lightning PruningCallback remaps one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}.",
                             hint="Return a single optimizer (parameter groups are fine).")
        accumulation = max(1, int(trainer.accumulate_grad_batches))
        per_epoch = optimizer_steps_per_epoch(trainer.num_training_batches, accumulation)
        total = trainer.estimated_stepping_batches
        if per_epoch is None:  # a loader without a length: one epoch is the whole budget
            per_epoch = int(total) if math.isfinite(total) else 1
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.ceil(total / per_epoch)
        self.adapter.start(pl_module, trainer.optimizers[0], epochs=epochs, steps_per_epoch=per_epoch,
                           device=pl_module.device)
        self._steps_seen = trainer.global_step

    # ------------------------------------------------------------------------------------------ steps
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.adapter.require("on_before_optimizer_step").after_backward()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._steps_seen:  # an optimizer step, not a micro-batch of an accumulation
            self._steps_seen = trainer.global_step
            self.adapter.require("on_train_batch_end").after_step()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.adapter.require("on_train_epoch_end").epoch_end(metrics=plain_metrics(trainer.callback_metrics))

    def on_train_end(self, trainer, pl_module) -> None:
        self.adapter.finish(trainer.train_dataloader, _batch_inputs)

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"pruner": self.adapter.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.adapter.restore(state_dict.get("pruner"))


def _batch_inputs(batch: Any) -> torch.Tensor:
    """The module's input in a training batch: the batch itself, or the first element of an (inputs, targets) one."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(inputs, torch.Tensor):
        raise UsageError(f"PruningCallback(recalibrate_batches=...): a training batch holds {type(inputs).__name__}, "
                         "not the module's input tensor first.",
                         hint="Give batches as (inputs, targets), or set recalibrate_batches=0 and call "
                              "compressor.train.bn_recalibration.recalibrate_batch_norm yourself.")
    return inputs
