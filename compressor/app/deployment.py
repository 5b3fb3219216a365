"""`deploy()`: the deployment half of `compress` (export, parity, quantize, engine, bench, gates: pipeline.MAIN_STAGES)
on a model the user pruned and trained themselves (e.g. with `compressor.Pruner` in their own loop), writing the same
run directory and report as `compress`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from compressor.errors import UsageError
from compressor.progress import info


def deploy(slim_model: nn.Module, example_inputs: Optional[torch.Tensor] = None,
           out: Optional[str | Path] = None, *, recipe: Any = None, dense_model: Optional[nn.Module] = None,
           val_set: Any = None, train_set: Any = None,
           metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None, pruner: Any = None,
           device: str = "cpu", overwrite: bool = False, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Export `slim_model` to ONNX, check parity, quantize, build a TensorRT engine and bench it as `compress` does
    after training (the same stage functions), and write report.json / report.md / the slim model / model.onnx in
    `out` (default runs/<recipe name>). Returns the report.

    `example_inputs`: one batch the model takes (N, C, H, W floats or (N, T) token ids), or None when the recipe sets
    model.input_shape. `recipe`: a file, a shipped recipe's name, a Recipe or a dict of the deployment sections
    (export, verify, bench, gates; `name` defaults to "deploy"); its model, data, prune and finetune sections are
    not used. `dense_model`: the model before pruning, for dense.onnx and the dense columns (accuracy, MACs, the
    interleaved bench's speedup); without it the report's "dense" is None. `val_set`: (input, class index) pairs for
    top-1 (and `metric`) of the PyTorch and ONNX models and for parity; without it parity runs on seeded random
    inputs of the example's shape (said in the notes). `train_set`: calibration samples for int8 (export.quantize
    int8, export.tensorrt.int8). `pruner`: the `compressor.Pruner` that pruned the model, whose prune section and
    method summary (events, target asked and achieved) the report shows; without it the run's recipe says method
    none. Both models are copied: the ones passed are left as they are. It trains nothing and starts no process
    group: under torchrun call it on one rank (rank 0).

    Raises UsageError (exit 2) when an argument is missing for what the recipe asks (a gate without a dense model or
    a validation set, int8 without training samples, no example inputs), ModelLoadError / DataError (exit 2) for a
    model or dataset compressor cannot work with, ParityError / GateError (exit 1) after writing the report.
    """
    from compressor.app.in_memory import (check_callable, check_dataset, data_label, model_label,
                                          model_section)
    from compressor.app.pipeline import (MAIN_STAGES, RunState, _copy_for_bench, _measure, caller_rng_kept,
                                         preflight, prepare_run_dir)
    from compressor.app.recipe import as_recipe

    recipe = as_recipe(recipe if recipe is not None else {}, overrides, default_name="deploy", who="deploy")
    check_callable(metric, "metric", "metric(outputs, targets) -> float")
    for name, given in (("slim_model", slim_model), ("dense_model", dense_model)):
        if given is not None and not isinstance(given, nn.Module):
            raise UsageError(f"deploy: {name} must be a torch.nn.Module, not a {type(given).__name__}.")
    slim_model = _copy_for_bench(slim_model)  # CPU, eval mode, contiguous: the caller's models stay as they are
    section = model_section(slim_model, example_inputs, recipe.model, who="deploy")
    if dense_model is not None:
        dense_model = _copy_for_bench(dense_model)
        model_section(dense_model, example_inputs, section, who="deploy (dense_model)")
    # deploy prunes nothing: the run's recipe.yaml and report name the Pruner's prune section, or method none
    recipe = recipe.model_copy(update={"model": section, "prune": _prune_section(pruner)})
    for name, dataset in (("train_set", train_set), ("val_set", val_set)):
        if dataset is not None:
            check_dataset(dataset, name, section, "deploy")
    _check_needs(recipe, dense_model=dense_model, val_set=val_set, train_set=train_set, metric=metric)
    out = Path(out) if out is not None else Path("runs") / recipe.name
    notes = preflight(recipe, device)
    out = prepare_run_dir(out, recipe, resume=False, overwrite=overwrite)
    state = RunState(checkpoint=model_label(slim_model), recipe=recipe, out=out, device=device, resume=False,
                     trust_checkpoint=False, notes=notes, model=slim_model, train_set=train_set,
                     val_set=val_set, metric=metric,
                     data_label=data_label(train_set, val_set) if train_set is not None or val_set is not None
                     else "none")
    state.method = pruner.method if pruner is not None else None
    info(f"deploy: measuring {state.checkpoint}" + (" and the dense model" if dense_model is not None else ""))
    with state.timer("eval"):
        if dense_model is not None:
            state.dense_model = dense_model
            state.dense = _measure(state, state.dense_model, device=device)
        state.compressed = _measure(state, state.model, device=device)
    if val_set is None:
        state.samples = _random_samples(state)
    with caller_rng_kept(device):  # quantization-aware fine-tuning seeds torch's generator
        for stage in MAIN_STAGES:
            stage(state)
    return state.report


def _prune_section(pruner: Any) -> Any:
    from compressor.prune.section import PruneConfig
    from compressor.pruner import Pruner

    if pruner is None:
        return PruneConfig(method="none")
    if not isinstance(pruner, Pruner):
        raise UsageError(f"deploy: pruner must be the compressor.Pruner that pruned the model, not a "
                         f"{type(pruner).__name__}.")
    return pruner.spec.prune


def _check_needs(recipe: Any, *, dense_model: Any, val_set: Any, train_set: Any, metric: Any) -> None:
    """UsageError when the recipe asks for something the given objects cannot give, before any work."""
    gates, export = recipe.gates, recipe.export
    label = recipe.build_task().primary_label  # top-1, mAP50-95, mIoU, perplexity
    needs = []
    for gate in ("max_accuracy_drop", "max_metric_increase"):  # the primary metric's gate (app/metric_change.py)
        if getattr(gates, gate) is not None:
            needs += [(dense_model, "dense_model", f"gates.{gate} compares with the dense model's {label}"),
                      (val_set, "val_set", f"gates.{gate} measures {label} on a validation set")]
    if gates.max_metric_drop is not None:
        needs += [(metric, "metric", "gates.max_metric_drop holds a metric"),
                  (dense_model, "dense_model", "gates.max_metric_drop compares with the dense model's metric"),
                  (val_set, "val_set", "gates.max_metric_drop measures the metric on a validation set")]
    if gates.min_speedup is not None and recipe.bench.backends:
        needs.append((dense_model, "dense_model", "gates.min_speedup times the dense model beside the slim one"))
    if export.quantize.enabled:
        needs.append((val_set, "val_set", f"export.quantize {export.quantize.mode} measures the quantized file's "
                                          f"{label} on a validation set"))
    static_int8 = export.quantize.mode == "int8" and recipe.task != "language-modeling"  # LMs: weight-only
    if static_int8 or (export.tensorrt.enabled is not False and export.tensorrt.int8 and
                       recipe.task != "language-modeling"):
        needs.append((train_set, "train_set", "int8 (export.quantize or export.tensorrt.int8) calibrates on "
                                              "training samples"))
    missing = [f"{why}: pass {name}=" for value, name, why in needs if value is None]
    if missing:
        raise UsageError("deploy: " + "; ".join(missing) + ".",
                         hint="Or remove those settings from the recipe given to deploy().")


def _random_samples(state: Any) -> torch.Tensor:
    """Parity inputs without a validation set: seeded random inputs of the example's shape (at most 64), noted."""
    from compressor.models.loading import example_inputs

    samples = example_inputs(state.recipe.model, min(state.recipe.verify.samples, 64))
    state.notes.append(f"parity on {len(samples)} seeded random inputs of shape {list(samples.shape[1:])} (deploy() "
                       f"got no val_set; give one to check parity on real data and measure "
                       f"{state.task.primary_label})")
    info(f"      note: {state.notes[-1]}")
    return samples
