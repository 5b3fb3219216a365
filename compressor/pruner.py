"""`compressor.Pruner`: structured pruning inside your own training loop (docs/api.md).

The same methods, hosts, targets and hooks as `compressor compress`, whose training loop (`train.loop.fit`) drives
its method through this class too: a fix lands once.
"""
from __future__ import annotations

import copy
import itertools
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from compressor.errors import RecipeError, UsageError
from compressor.progress import info
from compressor.prune.context import LossFn, PruneContext
from compressor.prune.lineage import Lineage, unwrap
from compressor.prune.methods import METHODS
from compressor.prune.methods.base import PruningMethod
from compressor.prune.section import PruneConfig
from compressor.prune.spec import ModelSpec, PruneSpec, budget_problems

PruneArg = Union[None, dict, PruneConfig, str, Path]
Calibration = Union[None, Iterable[Any], Callable[[int], Iterable[Any]]]


class Pruner:
    """Prune `model` in place while your loop trains it: the prune section of a recipe, every registered method
    (dpm, oneshot, iterative, fggp, ocsp) and host (depgraph, depgraph-sl, taylor, gate-decorator, otov2), MAC,
    channel and latency targets.

    Your loop keeps its model, data, loss, optimizer and schedule; it calls four hooks::

        pruner = compressor.Pruner(model, example, prune={"method": "dpm", "target": {"macs": 0.5}},
                                   epochs=epochs, steps_per_epoch=len(loader), optimizer=optimizer)
        for epoch in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                loss = my_loss(model(x), y)
                loss.backward()
                pruner.after_backward(loss)   # gradients in .grad, before clipping and the step
                optimizer.step()
                pruner.after_step()           # events and decay steps happen here
            pruner.epoch_end({"val_top1": ...})
        pruner.finalize()                     # what is still decaying is removed: the target holds

    Arguments:
        model: the module to prune (a DDP / DataParallel / torch.compile wrapper is unwrapped; its module is pruned).
        example_inputs: one example batch (a tensor) to trace the graph and count MACs.
        prune: the recipe's prune section: a dict, a `PruneConfig`, or a YAML file holding a prune section or a
            whole recipe with a `prune:` key (only that key is read). Default: DPM to half of the dense MACs.
            Invalid settings are a RecipeError naming each field (`prune.target.macs: ...`).
        ignore: module names or `re:` patterns never pruned (the recipe's model.ignore); the output layers are
            always kept.
        round_to: kept widths rounded up to a multiple of this (overrides prune.round_to; `"auto"` is measured).
        epochs, steps_per_epoch: the training budget: optimizer steps per epoch (calls of after_step) and epochs.
            The schedule (prune.schedule, the method's intervals) is placed in it exactly as `compress` places it.
        optimizer: your optimizer. After every removal its param_groups point at the new parameters and its state
            (momentum, Adam's exp_avg / exp_avg_sq, ...) is carried over to the kept slices (compressor.prune.lineage),
            in place: the same object, the same groups and hyper-parameters. OCSP requires it (its regulariser
            follows the learning rate).
        on_structure_change: called with the Pruner after each removal, after the optimizer was remapped: rebuild
            what holds the parameters by identity (a DDP wrapper, an EMA copy, a scheduler over a new optimizer).
        loss_fn, calibration: `loss_fn(model, inputs, targets) -> loss` and batches of (inputs, targets) (an iterable
            such as a DataLoader, iterated afresh each time, or a callable n -> n batches). Required by hosts that
            score with gradients (taylor, gate-decorator, a gradient prune.importance): an event with no batch observed
            since the last one (the first event, at step 0) scores on a few calibration batches.
        device: where the model trains (default: the device of its first parameter).

    Timing: the method starts (its step-0 events run) at the model's first forward in training mode, or at
    start() or the first hook, whichever comes first; load_state_dict() must come before it. Regularising hosts
    (depgraph-sl's group lasso, otov2's half-space projection) and OCSP act on the gradients in after_backward()
    and on the weights in after_step(): no loss term to add, no extra call. Under a float16 GradScaler call
    `scaler.unscale_(optimizer)` before after_backward() so gradient scores and regularisers see true gradients.

    Resume: save `pruner.state_dict()` with the model's and the optimizer's state dicts. To resume, build the
    dense model, `compressor.models.slim.conform_to_state_dict(model, weights)` and `model.load_state_dict(weights)`
    (the saved model is pruned), build the optimizer over it and load its state, build the Pruner with the same
    arguments and call `load_state_dict(state)` before training continues; the run then equals an uninterrupted
    one. Errors: RecipeError (a bad prune section, a target or schedule that cannot work), UsageError (a bad
    argument or call order).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, *, prune: PruneArg = None,
                 ignore: Iterable[str] = (), round_to: Union[None, int, str] = None, epochs: int = 1,
                 steps_per_epoch: int, optimizer: Optional[torch.optim.Optimizer] = None,
                 on_structure_change: Optional[Callable[["Pruner"], None]] = None, loss_fn: Optional[LossFn] = None,
                 calibration: Calibration = None, device: Union[None, str, torch.device] = None) -> None:
        bare = unwrap(model)
        example = _example(example_inputs)
        for name, value, least in (("epochs", epochs, 0), ("steps_per_epoch", steps_per_epoch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(f"Pruner({name}={value!r}): must be a whole number of at least {least}.")
        cfg = load_prune_config(prune, round_to=round_to)
        problems = budget_problems(cfg, epochs, epochs_field="epochs")
        if problems:
            raise RecipeError("the prune section does not fit the training budget:\n  " + "\n  ".join(problems))
        ignore = list(ignore)
        cfg = _measured_targets(cfg, bare, example, ignore, epochs)
        spec = PruneSpec(prune=cfg, model=ModelSpec(example=example, ignore=ignore), epochs=epochs)
        method = METHODS.get(cfg.method)(spec)
        device = torch.device(device) if device is not None else _device_of(bare)
        ctx = PruneContext(model=bare, device=device, steps_per_epoch=steps_per_epoch,
                           total_steps=epochs * steps_per_epoch, optimizer=optimizer, loss_fn=loss_fn,
                           calibration=_calibration(calibration))
        _check_needs(method, ctx)
        _check_ignore(bare, ignore, example)
        self._bind(method, ctx, on_structure_change, counts_epochs=True)
        self.schedule_warnings = method.check_schedule(ctx.total_steps, steps_per_epoch)
        for warning in self.schedule_warnings:
            info(f"warning: {warning}")
        self._hook = _start_on_first_forward(self, bare)

    @classmethod
    def driving(cls, method: PruningMethod, ctx: PruneContext,
                on_structure_change: Optional[Callable[["Pruner"], None]] = None) -> "Pruner":
        """A Pruner over an already built method and context (train.loop.fit's): the training loop counts the
        epochs and calls start() itself; the hooks, the recording of replacements and the optimizer remap are
        the same as in a user's loop."""
        pruner = cls.__new__(cls)
        pruner._bind(method, ctx, on_structure_change, counts_epochs=False)
        pruner.schedule_warnings = []
        pruner._hook = None
        return pruner

    def _bind(self, method: PruningMethod, ctx: PruneContext, on_structure_change, *, counts_epochs: bool) -> None:
        self.method, self.ctx = method, ctx
        self._on_structure_change = on_structure_change
        self._counts_epochs = counts_epochs
        self._lineage = Lineage()
        self._started = self._finished = False
        self.bn_recalibration: Optional[dict[str, int]] = None
        self._epoch_started = time.perf_counter()
        self.structure_changes = 0
        self.last_remap: dict[str, int] = {}
        ctx.structure_changed = self._structure_changed

    # ------------------------------------------------------------------------------------------ what it holds
    @property
    def model(self) -> nn.Module:
        """The pruned module (the same object as the model given, unwrapped; its parameters change at removals)."""
        return self.ctx.model

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        return self.ctx.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        self.ctx.optimizer = optimizer

    @property
    def step(self) -> int:
        """Optimizer steps completed (calls of after_step)."""
        return self.ctx.step

    @property
    def epoch(self) -> int:
        """Epochs completed (calls of epoch_end)."""
        return self.ctx.epoch

    @property
    def spec(self) -> PruneSpec:
        """What the method was built from: the validated prune section (latency targets and round_to: auto
        resolved), the example and ignored layers, the epochs."""
        return self.method.spec

    # ------------------------------------------------------------------------------------------ hooks
    def start(self) -> None:
        """Start the method (its events due at step 0 run now). Called by itself at the model's first forward in
        training mode or the first hook; call it before the loop to start at a point of your choosing."""
        if self._started:
            return
        self._started = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._epoch_started = time.perf_counter()
        with self._lineage.recording(self.ctx.model):
            self.method.on_train_start(self.ctx)

    def after_backward(self, loss: Optional[torch.Tensor] = None) -> None:
        """The batch's gradients are in .grad (unscaled), the optimizer has not stepped: gradient scores are
        observed and regularisers add to the gradients. `loss`: the batch's loss, for methods that read it."""
        self.start()
        self.ctx.loss = loss
        with self._lineage.recording(self.ctx.model):
            self.method.after_backward(self.ctx)

    def after_step(self) -> None:
        """The optimizer has stepped: the step count advances and the events, decay steps and projections due at
        it run (a removal remaps the optimizer and calls on_structure_change)."""
        self.start()
        self.ctx.step += 1
        with self._lineage.recording(self.ctx.model):
            self.method.after_step(self.ctx)

    def epoch_end(self, metrics: Optional[dict[str, float]] = None) -> None:
        """An epoch's batches are done; `metrics` (e.g. validation results) are the epoch's, as methods see them."""
        self.start()
        self.ctx.metrics = dict(metrics or {})
        with self._lineage.recording(self.ctx.model):
            self.method.on_epoch_end(self.ctx)
        if self._counts_epochs:
            now = time.perf_counter()
            self.ctx.history.append({**self.ctx.metrics, "epoch": self.ctx.epoch + 1,
                                     "seconds": now - self._epoch_started})
            self._epoch_started = now
            self.ctx.epoch += 1

    def finalize(self, recalibrate: Calibration = None, *, batches: int = 32) -> nn.Module:
        """Training is over: the method's last decisions (structures still decaying are removed, events not run
        yet run now), so the target holds. Returns the pruned model.

        recalibrate: training batches of (inputs, targets) (a DataLoader, or a callable n -> n batches; True: the
        Pruner's `calibration`) on which the batch-norm running statistics are re-estimated after the last removal,
        as `compress` does (finetune.bn_recalibration): the statistics of a model whose channels were decayed and
        removed describe the dense model, not this one. `batches` of them are read. Skipped for method none and for
        a model without batch-norm layers; `self.bn_recalibration` says what was done ({layers, batches, samples}
        or None)."""
        self.start()
        with self._lineage.recording(self.ctx.model):
            self.method.finalize(self.ctx)
        self._finished = True
        self.bn_recalibration = self._recalibrate(recalibrate, batches)
        return self.ctx.model

    def _recalibrate(self, recalibrate: Calibration, batches: int) -> Optional[dict[str, int]]:
        from compressor.train.bn_recalibration import batch_norms, recalibrate_batch_norm  # train sits above

        if recalibrate is None or recalibrate is False:
            return None
        source = self.ctx.calibration if recalibrate is True else _calibration(recalibrate)
        if source is None:
            raise UsageError("Pruner.finalize(recalibrate=True): the Pruner was built without calibration batches.",
                             hint="Pass the batches to finalize (recalibrate=train_loader) or calibration= to the "
                                  "Pruner.")
        if self.method.name == PruningMethod.name or not batch_norms(self.ctx.model):
            return None
        done = recalibrate_batch_norm(self.ctx.model, source(batches), self.ctx.device,
                                      getattr(self.ctx, "channels_last", False))
        info(f"batch-norm statistics re-estimated on {done['samples']} training samples ({done['layers']} layers)")
        return done

    def _structure_changed(self) -> None:
        """ctx.rebuild(): carry the optimizer over to the new parameters, then let the loop follow."""
        if self.ctx.optimizer is not None:
            self.last_remap = self._lineage.remap_optimizer(self.ctx.optimizer, self.ctx.model)
        else:
            self._lineage.clear()
        self.structure_changes += 1
        if self._on_structure_change is not None:
            self._on_structure_change(self)

    # ------------------------------------------------------------------------------------------ state
    def summary(self) -> dict[str, Any]:
        """What the report shows of the method's run (events, decay traces, ...), with the step and epoch."""
        return {**self.method.summary(), "step": self.ctx.step, "epoch": self.ctx.epoch}

    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume exactly: the method's and its host's state, the step, the epoch, the epoch history
        and the shapes of the model's tensors (its current widths)."""
        return {"method": self.method.state_dict(), "step": self.ctx.step, "epoch": self.ctx.epoch,
                "history": copy.deepcopy(self.ctx.history),
                "shapes": {name: list(t.shape) for name, t in self.ctx.model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned, before training continues (the model already holds the saved
        weights: see the class docstring)."""
        if self._started:
            raise UsageError("Pruner.load_state_dict: the pruner has already started (a training forward or a hook "
                             "ran); load the state right after building the Pruner.")
        shapes = {name: list(t.shape) for name, t in self.ctx.model.state_dict().items()}
        wrong = [f"{name} {tuple(shapes.get(name, ()))} here, {tuple(saved)} saved"
                 for name, saved in state.get("shapes", {}).items() if shapes.get(name) != list(saved)]
        if wrong:
            raise UsageError(
                f"Pruner.load_state_dict: the model does not have the saved widths ({'; '.join(wrong[:3])}"
                f"{f'; {len(wrong) - 3} more' if len(wrong) > 3 else ''}).",
                hint="Load the saved weights first: compressor.models.slim.conform_to_state_dict(model, weights), "
                     "then model.load_state_dict(weights), then build the optimizer and the Pruner.")
        self.method.load_state_dict(state["method"])
        self.ctx.step, self.ctx.epoch = int(state["step"]), int(state["epoch"])
        self.ctx.history = copy.deepcopy(list(state.get("history", [])))


# ---------------------------------------------------------------------------------------------- arguments
def load_prune_config(prune: PruneArg, *, round_to: Union[None, int, str] = None) -> PruneConfig:
    """The validated prune section from a dict, a PruneConfig or a YAML file (a prune section, or a recipe whose
    `prune:` key is read); `round_to` overrides prune.round_to. A RecipeError names each invalid field."""
    from pydantic import ValidationError

    from compressor.app.recipe import format_validation_error, read_recipe_file

    source = "<dict>"
    if isinstance(prune, PruneConfig):
        if round_to is None:
            return prune.model_copy(deep=True)
        data, source = prune.model_dump(by_alias=True, exclude_unset=True), "<PruneConfig>"
    elif prune is None:
        data = {}
    elif isinstance(prune, (str, Path)):
        path = Path(prune)
        if not path.is_file():
            raise RecipeError(f"prune: {str(prune)!r} is not a file; give a YAML file holding a prune section (or a "
                              "recipe with a prune: key), a dict or a PruneConfig.")
        data, source = read_recipe_file(path), str(path)
        if isinstance(data, dict) and "prune" in data:
            data, source = data["prune"], f"{path} (its prune: key)"
        data = {} if data is None else data
    elif isinstance(prune, dict):
        data = copy.deepcopy(prune)
    else:
        raise RecipeError(f"prune must be a dict, a PruneConfig or the path of a YAML file, not a "
                          f"{type(prune).__name__}.")
    if not isinstance(data, dict):
        raise RecipeError(f"prune section {source} must be a mapping of settings (method, host, target, ...), not a "
                          f"{type(data).__name__}.")
    if round_to is not None:
        data = {**data, "round_to": round_to}
    try:
        return PruneConfig.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source, root=PruneConfig, prefix="prune",
                                                  what="prune section")) from exc


def _example(example: Any) -> torch.Tensor:
    if not isinstance(example, torch.Tensor) or example.dim() == 0:
        raise UsageError(f"Pruner(example_inputs=...): one example batch as a tensor (e.g. torch.randn(1, 3, 224, "
                         f"224)), not {type(example).__name__}{' of no dimension' if isinstance(example, torch.Tensor) else ''}.")
    return example.detach().cpu()


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _calibration(calibration: Calibration) -> Optional[Callable[[int], Iterable[Any]]]:
    """ctx.calibration from the user's: a callable n -> batches as it is, an iterable read afresh up to n batches."""
    if calibration is None or callable(calibration):
        return calibration
    if iter(calibration) is calibration:
        raise UsageError("Pruner(calibration=...): an iterator is used up after one event; give an iterable that "
                         "can be read again (a DataLoader, a list of batches) or a callable n -> n batches.")
    return lambda n: itertools.islice(iter(calibration), n)


def _check_needs(method: PruningMethod, ctx: PruneContext) -> None:
    prune = method.spec.prune
    gradients = method.needs_calibration() and method.host.scorer.needs_gradients
    needed = (("calibration", ctx.calibration), ("loss_fn", ctx.loss_fn)) if gradients else (
        ("calibration", ctx.calibration),)
    missing = " and ".join(n for n, v in needed if v is None)
    if method.needs_calibration() and missing and gradients:
        raise UsageError(
            f"Pruner: host {prune.host} (importance {method.host.scorer.__class__.__name__}) scores channels with "
            f"gradients, and an event with no batch observed since the last one (the first, at step 0) runs a few "
            f"batches itself: give {missing}.",
            hint="calibration: a DataLoader of (inputs, targets) or a callable n -> n batches; loss_fn(model, "
                 "inputs, targets) -> loss. Or use a magnitude host (host: depgraph with importance magnitude).")
    if method.needs_calibration() and missing:
        raise UsageError(
            "Pruner: prune.decoder.layer_importance block_influence measures the decoder layers on a few batches "
            "at each selection event: give calibration.",
            hint="calibration: a DataLoader of (inputs, targets) or of token ids, or a callable n -> n batches. Or "
                 "use layer_importance: host.")
    if method.needs_optimizer() and ctx.optimizer is None:
        raise UsageError(f"Pruner: method {prune.method} reads the optimizer (its learning rate); give optimizer=.")


def _check_ignore(model: nn.Module, ignore: list[str], example: torch.Tensor) -> None:
    """Bad patterns (the recipe's model.ignore rule) and unknown layer names fail now, not at the first event."""
    from pydantic import ValidationError

    from compressor.app.recipe import format_validation_error
    from compressor.models.config import ModelConfig
    from compressor.prune import graph as dg

    try:
        ModelConfig.model_validate({"ignore": ignore})
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, "Pruner(ignore=...)", root=ModelConfig, prefix="model",
                                                  what="layer list")) from None
    if ignore:
        with dg.quiet_eval(model):
            dg.resolve_ignored(model, ignore, example.to(_device_of(model)))


def _measured_targets(cfg: PruneConfig, model: nn.Module, example: torch.Tensor, ignore: list[str],
                      epochs: int) -> PruneConfig:
    """round_to: auto and latency targets resolved by measuring, with the code `compress` uses (which reads a
    recipe: one is made from the example's shape, the prune section and the target's backend and batch)."""
    if cfg.round_to != "auto" and not cfg.target.is_latency:
        return cfg
    from compressor.app.recipe import Recipe
    from compressor.prune.latency_target import latency_target_note, resolve_latency_target
    from compressor.prune.round_to import resolve_round_to

    shape = list(example.shape[1:])
    if example.is_floating_point() and len(shape) == 3:
        model_cfg = {"in_channels": shape[0], "input_shape": shape}
    elif not example.is_floating_point() and len(shape) == 1:
        model_cfg = {"inputs": "tokens", "input_shape": shape}
    else:
        asked = "a latency target" if cfg.target.is_latency else "round_to: auto"
        raise RecipeError(f"prune: {asked} is measured on an exported model, which needs image inputs (N, C, H, W) "
                          f"or token ids (N, S); this example is {tuple(example.shape)} {example.dtype}.",
                          hint="Use a MAC target (prune.target.macs or speedup) and a number for round_to, or "
                               "`compressor compress`.")
    backend, batch = cfg.target.backend or "ort-cpu", cfg.target.batch or 1
    recipe = Recipe.model_validate({"name": "pruner", "model": {**model_cfg, "ignore": ignore},
                                    "prune": cfg.model_dump(by_alias=True, exclude_unset=True),
                                    "finetune": {"epochs": epochs},
                                    "bench": {"backends": [backend], "batch_sizes": [batch]}})
    recipe, note = resolve_round_to(recipe, model)
    if note:
        info(note)
    recipe, record = resolve_latency_target(recipe, model)
    if record:
        info(latency_target_note(record))
    return recipe.prune


_STARTERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()  # model -> its hook's handle


def _start_on_first_forward(pruner: Pruner, model: nn.Module):
    """A forward pre-hook starting the pruner at the model's first forward in training mode; returns its handle.
    A plain function holding weak references: a deep copy of the model (an EMA, a probe) carries it without the
    pruner and never fires it. One per model: a Pruner built later on the same model (a resume after a failed
    load_state_dict) replaces the earlier one's."""
    pruner_ref, model_ref = weakref.ref(pruner), weakref.ref(model)

    def hook(module: nn.Module, _args: Any) -> None:
        owner = pruner_ref()
        if owner is not None and module.training and module is model_ref():
            owner.start()

    earlier = _STARTERS.pop(model, None)
    if earlier is not None:
        earlier.remove()
    _STARTERS[model] = handle = model.register_forward_pre_hook(hook)
    return handle
