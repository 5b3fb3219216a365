"""`PruningCallback`: prune inside a Hugging Face `transformers.Trainer` run (the [hf] extra).

    from compressor.integrations.transformers import PruningCallback

    callback = PruningCallback(torch.randn(1, 3, 224, 224), prune="recipes/resnet20-fmnist-dpm.yaml")
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    trainer.train()
    compressor.deploy(callback.pruner.model, example, "runs/hf")   # the pruned model, returning logits

Where each Pruner hook runs (transformers 4.40 to 5.x, `Trainer._inner_training_loop`):

    on_train_begin          the Pruner is built: the Trainer's optimizer exists by then (it is created lazily, in
                            train()), the budget is state.max_steps optimizer steps over state.num_train_epochs
                            epochs of ceil(len(train_dataloader) / gradient_accumulation_steps) steps; a resumed run
                            restores the Pruner's state from the checkpoint folder
    on_pre_optimizer_step   after_backward(): once per optimizer step, with the gradients accumulated over
                            args.gradient_accumulation_steps micro-batches, after the Trainer clipped them
                            (args.max_grad_norm; with fp16 AMP the gradients are unscaled only when clipping is on)
    on_optimizer_step       after_step(): a removal happens here, between optimizer.step() and the LR scheduler's
                            step; the optimizer is remapped in place (its groups, momentum and Adam moments follow
                            the kept channels), so the Trainer's LambdaLR scheduler keeps driving the same groups
    on_epoch_end            epoch_end(metrics): the latest metrics the Trainer evaluated or logged
    on_save                 the Pruner's state into the checkpoint folder (compressor_pruner.pt)
    on_train_end            finalize(): the last removals, so the target holds; batch-norm statistics re-estimated

The Pruner prunes `callback.pruner.model`: the Trainer's model called with one keyword input (`input_name`,
default the model's `main_input_name`: pixel_values, input_ids, ...) and returning its logits; it shares every
layer with the Trainer's model, which is pruned in place.

Resume: `trainer.train(resume_from_checkpoint=...)` works as with any callback. The checkpoint's weights have the
pruned shapes, so until training starts a state dict loaded into the model first resizes its layers to the saved
shapes (the optimizer the Trainer builds afterwards holds the pruned parameters, and its saved state loads); the
Pruner's state is read from <output_dir>/checkpoint-<global step>/compressor_pruner.pt, or from `resume_from`.

One process only: a distributed run (world size above 1) is refused before the first step.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from compressor.errors import UsageError
from compressor.integrations import require
from compressor.integrations.adapter import PrunerAdapter, optimizer_steps_per_epoch, plain_metrics, single_process

transformers = require("transformers", "hf", "compressor.integrations.transformers")
require("accelerate", "hf", "transformers.Trainer (compressor.integrations.transformers)")

STATE_FILE = "compressor_pruner.pt"


class PruningCallback(transformers.TrainerCallback):
    """Prunes the Trainer's model with `compressor.Pruner` while the Trainer trains it.

    example_inputs: one input batch (the model's `input_name` tensor) used to trace the model and count MACs.
    prune: the prune section (a dict, a PruneConfig, or a YAML file holding one or a whole recipe); ignore, round_to,
    loss_fn, calibration: as `compressor.Pruner`. on_structure_change(pruner): called after each removal, once the
    Trainer's optimizer has been remapped (rebuild anything else that holds the old parameters there).
    input_name: the model's keyword input (default its main_input_name); resume_from: the checkpoint folder to
    read the Pruner's state from on resume (default <output_dir>/checkpoint-<global step>). recalibrate_batches:
    after the last removal the batch-norm statistics are re-estimated on this many of the Trainer's training batches
    (their `input_name` tensor), as `compress` does; 0 keeps the statistics training left.
    """

    def __init__(self, example_inputs: torch.Tensor, *, prune: Any = None, ignore: Sequence[str] = (),
                 round_to: Optional[int] = None, input_name: Optional[str] = None,
                 on_structure_change: Optional[Callable[[Any], None]] = None,
                 loss_fn: Optional[Callable[..., torch.Tensor]] = None,
                 calibration: Optional[Callable[[int], Any]] = None,
                 resume_from: Optional[str | os.PathLike] = None, recalibrate_batches: int = 32) -> None:
        self.adapter = PrunerAdapter("transformers", example_inputs, prune=prune, ignore=ignore, round_to=round_to,
                                     on_structure_change=on_structure_change, loss_fn=loss_fn, calibration=calibration,
                                     recalibrate_batches=recalibrate_batches)
        self.input_name, self.ignore = input_name, list(ignore)
        self.resume_from = resume_from
        self.metrics: dict[str, float] = {}

    @property
    def pruner(self) -> Any:
        """The `compressor.Pruner` (None before training starts)."""
        return self.adapter.pruner

    # ------------------------------------------------------------------------------------------ start
    def on_init_end(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        if model is not None:  # a resume loads pruned weights before training starts
            self.adapter.conform_on_load(model)

    def on_train_begin(self, args, state, control, model: Optional[nn.Module] = None, optimizer=None,
                       train_dataloader=None, **kwargs):
        single_process(args.world_size, "transformers")
        if model is None:
            raise UsageError("the Trainer passed no model to PruningCallback.on_train_begin.")
        per_epoch = optimizer_steps_per_epoch(_length(train_dataloader), args.gradient_accumulation_steps)
        per_epoch = per_epoch or max(1, state.max_steps)  # a loader without a length: one epoch is the budget
        epochs = max(1, math.ceil(state.max_steps / per_epoch))
        if state.global_step > 0:  # resumed: before the Pruner exists, its state waits in the adapter
            self.adapter.restore(torch.load(self._state_path(args, state), map_location="cpu", weights_only=True))
        module = logits_module(model, self.input_name)
        # the wrapper holds the model as `model`: the user's layer names are under it
        self.adapter.options["ignore"] = under("model", self.ignore) if module is not model else list(self.ignore)
        self.adapter.start(module, _unwrap(optimizer), epochs=epochs, steps_per_epoch=per_epoch,
                           device=_device(model))

    def _state_path(self, args, state) -> Path:
        folder = Path(self.resume_from) if self.resume_from else (
            Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = folder / STATE_FILE
        if not path.is_file():
            raise UsageError(f"this Trainer run resumes at optimizer step {state.global_step}, but {path} does not "
                             "exist: the checkpoint was written without compressor's PruningCallback, or elsewhere.",
                             hint="Pass resume_from=<the checkpoint folder> to PruningCallback, or start over.")
        return path

    # ------------------------------------------------------------------------------------------ steps
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.adapter.require("on_pre_optimizer_step").after_backward()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.adapter.require("on_optimizer_step").after_step()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.metrics.update(plain_metrics(metrics or {}))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.metrics.update(plain_metrics(logs or {}))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.adapter.require("on_epoch_end").epoch_end(metrics=dict(self.metrics))

    def on_save(self, args, state, control, **kwargs):
        if self.pruner is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            torch.save(self.adapter.state_dict(), folder / STATE_FILE)

    def on_train_end(self, args, state, control, model: Optional[nn.Module] = None, train_dataloader=None,
                     **kwargs):
        name = self.input_name or getattr(model, "main_input_name", None)
        self.adapter.finish(train_dataloader, lambda batch: batch[name] if name else batch)


def logits_module(model: nn.Module, input_name: Optional[str] = None) -> nn.Module:
    """`model` called with one keyword input and returning its logits (compressor.models.hf.HFLogits), or the
    model itself when it names no input (a plain module whose forward takes the tensor)."""
    from compressor.models.hf import HFLogits

    name = input_name or getattr(model, "main_input_name", None)
    return HFLogits(model, name) if name else model


def under(prefix: str, patterns: Sequence[str]) -> list[str]:
    """Layer names (and `re:` patterns) of a model, as names of the wrapper that holds it as `prefix`."""
    return [f"re:{re.escape(prefix)}\\.(?:{p[3:]})" if p.startswith("re:") else f"{prefix}.{p}" for p in patterns]


def _unwrap(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (remapped in place, the wrapper follows)."""
    while not isinstance(optimizer, (torch.optim.Optimizer, type(None))) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _length(loader: Any) -> Optional[int]:
    try:
        return len(loader) if loader is not None else None
    except TypeError:  # an iterable dataset's loader
        return None


def _device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
