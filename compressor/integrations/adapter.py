"""What the framework callbacks share: the Pruner's options until training starts, the Pruner built then, its
checkpoint state, and the resume of a model whose saved weights have pruned shapes."""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from compressor.errors import UsageError


class PrunerAdapter:
    """Holds `compressor.Pruner`'s arguments until the framework knows the optimizer and the training budget, then
    builds the Pruner (`start`). A Pruner state restored from a checkpoint before that (`restore`) is applied as soon
    as the Pruner exists."""

    def __init__(self, framework: str, example_inputs: torch.Tensor, *, prune: Any, ignore: Sequence[str],
                 round_to: Optional[int], on_structure_change: Optional[Callable[[Any], None]],
                 loss_fn: Optional[Callable[..., torch.Tensor]], calibration: Optional[Callable[[int], Any]],
                 recalibrate_batches: int = 32) -> None:
        if not isinstance(example_inputs, torch.Tensor):
            raise UsageError(f"{framework} PruningCallback: example_inputs must be one input batch as a tensor (e.g. "
                             f"torch.randn(1, 3, 224, 224), or token ids), got {type(example_inputs).__name__}.")
        if isinstance(recalibrate_batches, bool) or not isinstance(recalibrate_batches, int) or recalibrate_batches < 0:
            raise UsageError(f"{framework} PruningCallback(recalibrate_batches={recalibrate_batches!r}): a whole number "
                             "of training batches (0: keep the batch-norm statistics training left).")
        self.framework = framework
        self.example_inputs = example_inputs
        self.recalibrate_batches = recalibrate_batches
        self.options = {"prune": prune, "ignore": list(ignore), "round_to": round_to, "loss_fn": loss_fn,
                        "calibration": calibration, "on_structure_change": on_structure_change}
        self.pruner: Any = None
        self.pending: Optional[dict[str, Any]] = None  # a Pruner state restored before the Pruner exists
        self._conform_hook: Any = None

    # ------------------------------------------------------------------------------------------ start
    def start(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], *, epochs: int,
              steps_per_epoch: int, device: Any = None) -> Any:
        """Build the Pruner over `model` and `optimizer` for this budget (restoring a pending state)."""
        from compressor.pruner import Pruner

        self.stop_conforming()
        self.pruner = Pruner(model, self.example_inputs, epochs=max(1, int(epochs)),
                             steps_per_epoch=max(1, int(steps_per_epoch)), optimizer=optimizer, device=device,
                             **self.options)
        if self.pending is not None:
            self.pruner.load_state_dict(self.pending)
            self.pending = None
        return self.pruner

    def finish(self, train_batches: Optional[Iterable[Any]], inputs_of: Callable[[Any], torch.Tensor]) -> nn.Module:
        """Training ended: the Pruner's finalize(), then (recalibrate_batches > 0) the batch-norm statistics
        re-estimated on that many of the trainer's training batches, as `compress` does; `inputs_of(batch)` is the
        tensor the pruned module takes."""
        pruner = self.require("on_train_end")
        source = None
        if self.recalibrate_batches and train_batches is not None:
            def source(n: int):
                return ((inputs_of(batch), None) for batch in itertools.islice(train_batches, n))
        return pruner.finalize(recalibrate=source, batches=max(1, self.recalibrate_batches))

    def require(self, hook: str) -> Any:
        if self.pruner is None:
            raise UsageError(f"{self.framework} PruningCallback.{hook} ran before training started (the Pruner is "
                             "built when the trainer starts training, once its optimizer and step count are known).",
                             hint="Pass the callback to the trainer and start training with it; do not call its "
                                  "hooks yourself.")
        return self.pruner

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The Pruner's state ({} before training started: a checkpoint of a run that has not pruned yet)."""
        if self.pruner is not None:
            return self.pruner.state_dict()
        return dict(self.pending or {})

    def restore(self, state: Optional[Mapping[str, Any]]) -> None:
        """A Pruner state from a checkpoint: applied now, or when the Pruner is built."""
        if not state:
            return
        if self.pruner is not None:
            self.pruner.load_state_dict(dict(state))
        else:
            self.pending = dict(state)

    # ------------------------------------------------------------------------------------------ resume
    def conform_on_load(self, module: nn.Module) -> None:
        """Until training starts, a state dict loaded into `module` (the framework restoring a checkpoint written
        after a removal) first resizes the module's layers to the saved shapes, so that it loads, and the optimizer
        the framework builds afterwards holds the pruned parameters."""
        from compressor.models.slim import conform_to_state_dict

        def conform(mod, state_dict, prefix, *_):
            if prefix:  # the hook's own module is the top of the load
                return
            own = {**dict(mod.named_parameters()), **dict(mod.named_buffers())}
            if any(key in own and isinstance(t, torch.Tensor) and t.shape != own[key].shape
                   for key, t in state_dict.items()):
                conform_to_state_dict(mod, state_dict)

        self.stop_conforming()
        self._conform_hook = module.register_load_state_dict_pre_hook(conform)

    def stop_conforming(self) -> None:
        if self._conform_hook is not None:
            self._conform_hook.remove()
            self._conform_hook = None


def optimizer_steps_per_epoch(batches: Any, accumulation: int) -> Optional[int]:
    """Optimizer steps in an epoch of `batches` micro-batches with gradient accumulation (the last, partial group
    steps too, as both frameworks do); None for a loader without a length."""
    if batches is None or not isinstance(batches, (int, float)) or math.isinf(batches):
        return None
    return max(1, math.ceil(int(batches) / max(1, accumulation)))


def single_process(world_size: int, framework: str) -> None:
    """The callbacks prune one process's model: a distributed run would need every rank to remove the same
    channels and re-wrap its DistributedDataParallel module after each removal."""
    if world_size > 1:
        raise UsageError(f"the {framework} PruningCallback prunes single-process training; this run has {world_size} "
                         "processes.",
                         hint="Train on one process (one GPU or the CPU), or run `compressor compress` under torchrun, "
                              "which prunes every rank alike.")


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics mapping as floats (tensors of one element included), others left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(key)] = float(value)
    return out
