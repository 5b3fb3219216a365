"""The Python API's in-memory inputs (`compress(model=..., train_set=..., loss=..., metric=...)`, `deploy()`): the
recipe's model section derived from the user's example inputs and model, the checks that make a bad object a clear
error before any work (UsageError / ModelLoadError / DataError, exit 2), and the names the report gives them."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from pydantic import ValidationError
from torch import nn

from compressor.errors import DataError, RecipeError, UsageError
from compressor.models.config import ModelConfig

EXAMPLE_FORMS = ("one batch of images, a float tensor (N, C, H, W), or of token ids, an integer tensor (N, T); "
                 "e.g. torch.randn(1, 3, 32, 32)")


def callable_name(fn: Callable[..., Any]) -> str:
    """`module.qualname` of a function or callable object, as report.json names a loss or metric."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(fn).__name__)}"


def model_label(model: nn.Module) -> str:
    """How the report names an in-memory model (where a run from a reference names its checkpoint)."""
    return f"in-memory {type(model).__module__}.{type(model).__qualname__}"


def check_callable(value: Any, name: str, signature: str) -> None:
    if value is not None and not callable(value):
        raise UsageError(f"{name} must be a callable {signature}, not a {type(value).__name__}.")


def check_arguments(checkpoint: Any, model: Any, *, example_inputs: Any, ignore: Any, loss: Any, metric: Any,
                    gates: Any) -> None:
    """compress()'s arguments fit together: one model source, example_inputs and ignore only with an in-memory
    model, callables where callables go, and gates.max_metric_drop only with a metric."""
    if checkpoint is not None and model is not None:
        raise UsageError(f"compress got both a checkpoint ({checkpoint}) and model=; give one of them.")
    if checkpoint is None and model is None:
        raise UsageError("compress needs a model: a checkpoint or reference, compress('model.pt', recipe, out), or an "
                         "in-memory model, compress(model=net, example_inputs=batch, recipe=..., out_dir=...).")
    if model is None and (example_inputs is not None or ignore is not None):
        raise UsageError("compress: example_inputs and ignore go with model=; for a checkpoint the recipe's model "
                         "section says them (model.input_shape, model.ignore).")
    if isinstance(ignore, str):
        raise UsageError(f"compress: ignore must be a list of layer names or re: patterns, not the string {ignore!r} "
                         f"(write [{ignore!r}]).")
    check_callable(loss, "loss", "loss(outputs, targets) -> scalar tensor")
    check_callable(metric, "metric", "metric(outputs, targets) -> float")
    if metric is None and gates.max_metric_drop is not None:
        raise RecipeError(f"gates.max_metric_drop ({gates.max_metric_drop}) holds a metric, and none was given: pass "
                          "metric=fn(outputs, targets) -> float to compress(), or remove the gate (the command line "
                          "has no metric; gates.max_accuracy_drop holds top-1).")


def model_section(model: Any, example: Any, recipe_model: ModelConfig, *, ignore: Optional[Sequence[str]] = None,
                  who: str = "compress(model=...)") -> ModelConfig:
    """The model section a run on an in-memory `model` works with: input_shape and inputs (image / tokens) from
    `example` (one batch; its batch size does not matter), or from the recipe's model.input_shape when no example is
    given and the recipe sets one; num_classes from the model's output on it; ignore from `ignore`, else the recipe's
    model.ignore. The model is checked like a loaded one (finite weights, one forward on that shape returning one
    tensor). The rest of the pipeline traces, counts MACs, exports and benches on a seeded random batch of this
    shape (token ids below compressor.tokens.TOKEN_ID_RANGE), as it does for a model reference."""
    from compressor.models.loading import check_finite, check_forward

    if not isinstance(model, nn.Module):
        raise UsageError(f"{who}: the model must be a torch.nn.Module, not a {type(model).__name__}.")
    if example is None:
        if "input_shape" not in recipe_model.model_fields_set:
            raise UsageError(f"{who} needs example inputs to trace, count MACs and export the model, and none was "
                             "given: pass example_inputs=" + EXAMPLE_FORMS + ", or set model.input_shape in the "
                             "recipe ([C, H, W] of one image, or [sequence length] with model.inputs: tokens).")
        fields = {"inputs": recipe_model.inputs, "input_shape": list(recipe_model.input_shape),
                  "in_channels": recipe_model.in_channels}
    else:
        fields = _example_fields(example, who)
        if "input_shape" in recipe_model.model_fields_set and list(recipe_model.input_shape) != fields["input_shape"]:
            raise UsageError(f"{who}: example_inputs take samples of shape {fields['input_shape']} but the recipe's "
                             f"model.input_shape is {list(recipe_model.input_shape)}; give one of them, or make them "
                             "equal.")
    patterns = list(ignore) if ignore is not None else list(recipe_model.ignore)
    try:
        section = ModelConfig.model_validate({**fields, "ignore": patterns})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise UsageError(f"{who}: {problems}.") from None
    label = model_label(model)
    check_finite(model, label)
    check_forward(model, section, label)
    return section.model_copy(update={"num_classes": _num_classes(model, section)})


def _example_fields(example: Any, who: str) -> dict[str, Any]:
    if not isinstance(example, torch.Tensor):
        raise UsageError(f"{who}: example_inputs must be one torch.Tensor batch, not a {type(example).__name__}: "
                         + EXAMPLE_FORMS + ". Models that take several inputs are not supported yet.")
    shape = list(example.shape)
    if example.dtype in (torch.int32, torch.int64) and example.ndim == 2:
        return {"inputs": "tokens", "input_shape": shape[1:], "in_channels": 3}
    if example.is_floating_point() and example.ndim == 4:
        return {"inputs": "image", "input_shape": shape[1:], "in_channels": shape[1]}
    raise UsageError(f"{who}: example_inputs of shape {shape} and dtype {example.dtype} is not an input compressor "
                     "traces, exports and benches; it takes " + EXAMPLE_FORMS + ".")


def _num_classes(model: nn.Module, section: ModelConfig) -> int:
    """The size of the class axis (axis 1) of the model's output on the example batch; 1 for an output without."""
    from compressor.models.loading import example_inputs

    was_training = model.training
    with torch.no_grad():
        out = model.eval()(example_inputs(section))
    model.train(was_training)
    return int(out.shape[1]) if out.ndim >= 2 else 1


def check_datasets(train_set: Any, val_set: Any, section: ModelConfig, who: str = "compress") -> None:
    """Both sets given, map-style (len and indexing), non-empty, of (input, class index) pairs whose input has the
    shape of one example sample: top-1, the validation loss and parity need class-index targets, whatever the
    training loss is."""
    if (train_set is None) != (val_set is None):
        given, missing = ("train_set", "val_set") if val_set is None else ("val_set", "train_set")
        raise UsageError(f"{who}: {given} was given but {missing} was not; give both datasets, or neither (the "
                         "recipe's data section then builds them).")
    for name, dataset in (("train_set", train_set), ("val_set", val_set)):
        check_dataset(dataset, name, section, who)


def check_dataset(dataset: Any, name: str, section: ModelConfig, who: str) -> None:
    """One dataset as check_datasets wants it (map-style, non-empty, (input, class index) pairs of the example's
    sample shape); DataError naming the set and what is wrong."""
    try:
        size = len(dataset)
        item = dataset[0] if size else None
    except (TypeError, NotImplementedError) as exc:
        raise DataError(f"{who}: {name} is a {type(dataset).__name__}, which has no len() or indexing ({exc}); "
                        "give a map-style torch Dataset (e.g. torch.utils.data.TensorDataset).") from None
    if not size:
        raise DataError(f"{who}: {name} is empty.")
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(f"{who}: {name}[0] is a {type(item).__name__}; each sample must be an (input, target) pair, "
                        "as a TensorDataset(inputs, targets) gives.")
    x, y = item
    if not isinstance(x, torch.Tensor) or list(x.shape) != list(section.input_shape):
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{who}: {name}[0]'s input is {shape}, but the example inputs take samples of shape "
                        f"{list(section.input_shape)}; give example_inputs shaped like the data (batch axis first).")
    if not (isinstance(y, int) or (isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex())):
        raise DataError(f"{who}: {name}[0]'s target is {_describe(y)}; compressor reports top-1 and the validation "
                        "cross-entropy on class indices (an integer per sample, or an integer map for per-pixel "
                        "classes), whatever the training loss is.")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def data_label(train_set: Any, val_set: Any) -> str:
    """How report.md names in-memory datasets (where a recipe run names data.kind); either may be None (deploy)."""
    parts = [f"{name} {type(ds).__name__} ({len(ds)} samples)" for name, ds in (("train", train_set),
                                                                               ("validation", val_set)) if ds is not None]
    return "in-memory " + (", ".join(parts) if parts else "none")
