"""The metrics every evaluation reports, accumulated over batches: top-1 and top-5 (percent), mean cross-entropy,
the sample count and, given one, a user's metric. `train.loop.evaluate` runs a PyTorch module through it and
`app.evaluation.evaluate_onnx` an ONNX Runtime session: the model call is the only difference."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sized

import torch
import torch.nn.functional as F

from compressor.errors import UsageError
from compressor.progress import track

FIELDS = ("loss", "top1", "top5", "count", "metric")


def batch_sums(logits: torch.Tensor, targets: torch.Tensor,
               metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None) -> torch.Tensor:
    """One batch's sums in FIELDS order (float64, on the CPU): summed cross-entropy, top-1 and top-5 hits, samples,
    and `metric` (a batch mean) times the batch size; top-5 is top-k for fewer than five classes."""
    logits, targets = logits.float(), targets.to(logits.device)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return torch.tensor([F.cross_entropy(logits, targets, reduction="sum").item(),
                         (top[:, 0] == targets).sum().item(), (top == targets[:, None]).any(1).sum().item(),
                         len(targets), metric_value(metric, logits, targets) * len(targets) if metric else 0.0],
                        dtype=torch.float64)


def metric_value(metric: Callable[[torch.Tensor, torch.Tensor], Any], outputs: torch.Tensor,
                 targets: torch.Tensor) -> float:
    """One batch's value of the user's metric(outputs, targets) as a float, or UsageError naming what it returned."""
    value = metric(outputs, targets)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        got = (f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor)
               else repr(value) if isinstance(value, (int, float)) else f"a {type(value).__name__}")
        name = getattr(metric, "__qualname__", type(metric).__name__)
        raise UsageError(f"the metric {name}(outputs, targets) returned {got}; it must return one finite number, the "
                         "batch's mean (compressor weights each batch by its size).")
    return float(value)


def from_sums(sums: torch.Tensor, *, with_metric: bool = False) -> dict[str, float]:
    """The report's metrics from summed FIELDS: means over the samples (percent for top-1 / top-5)."""
    loss, top1, top5, count, metric_sum = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "count": int(count),
            **({"metric": metric_sum / count} if with_metric else {})}


def evaluate_batches(predict: Callable[[torch.Tensor], Any],
                     batches: Iterable[tuple[torch.Tensor, Any]], *,
                     metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
                     reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     evaluator: Any = None, gather: Optional[Callable[[Any], list[Any]]] = None,
                     description: str = "eval") -> dict[str, float]:
    """The metrics of `predict(inputs) -> outputs` over (inputs, targets) batches, with a progress bar. `evaluator`:
    the task's (compressor/tasks), classification's (top-1, top-5, loss, `metric`) when None. `gather` combines
    what every process accumulated (DDP ranks each evaluating a shard); `reduce` (classification) sums the FIELDS
    across processes instead."""
    if evaluator is None:
        from compressor.tasks.classification import ClassificationEvaluator

        evaluator = ClassificationEvaluator(metric)
    if reduce is not None:
        gather = lambda sums: [reduce(sums)]  # noqa: E731
    with track(description, len(batches) if isinstance(batches, Sized) else 0) as bar:
        for inputs, targets in batches:
            evaluator.update(predict(inputs), targets)
            bar.advance()
    return evaluator.compute(gather) if gather is not None else evaluator.compute()
