"""Which way a task's primary metric goes when a model gets worse, and how reports, logs and gates say it.

A higher-is-better metric (top-1, mAP50-95, mIoU) loses points: the change is compressed minus dense in points
(pp) and gates.max_accuracy_drop holds dense minus compressed. A lower-is-better metric (language modeling's
perplexity) grows: the change is relative, (compressed - dense) / dense, shown as a percentage
("perplexity 12.300 -> 12.900 (+4.9%)"), and gates.max_metric_increase holds it as a fraction (0.05 = 5%).
Every function takes the task as the report records it (Task.describe(): primary, label, unit, higher_is_better)
or the Task itself.
"""
from __future__ import annotations

import math
from typing import Any, Optional


def _info(task: Any) -> dict[str, Any]:
    return task if isinstance(task, dict) else task.describe()


def higher_is_better(task: Any) -> bool:
    return bool(_info(task).get("higher_is_better", True))


def worsening(task: Any, dense: float, value: float) -> float:
    """How much worse `value` is than `dense`: points lost (higher-is-better), or the relative increase
    (lower-is-better; inf when the dense value is 0 and the value grew)."""
    if higher_is_better(task):
        return dense - value
    if dense == 0:
        return 0.0 if value == 0 else math.inf
    return (value - dense) / abs(dense)


def gate_name(task: Any) -> str:
    """The gate that holds the task's primary metric."""
    return "max_accuracy_drop" if higher_is_better(task) else "max_metric_increase"


def gate_limit(task: Any, gates: Any) -> Optional[float]:
    """The recipe's limit on the task's primary metric (gates.max_accuracy_drop or gates.max_metric_increase)."""
    return getattr(gates, gate_name(task))


def change_text(task: Any, dense: Optional[float], value: Optional[float], digits: int = 2) -> str:
    """`value` against `dense`: "+0.52 pp" / "-1.30 pp" (higher-is-better), "+4.9%" (lower-is-better)."""
    if dense is None or value is None:
        return "-"
    if higher_is_better(task):
        return f"{value - dense:+.{digits}f} pp"
    relative = worsening(task, dense, value)
    return f"{relative:+.1%}" if math.isfinite(relative) else "+inf%"


def limit_text(task: Any, limit: float) -> str:
    """A gate's limit as the metric's change reads: "1.0 pp" or "5.0%"."""
    return f"{limit:g} pp" if higher_is_better(task) else f"{limit:.1%}"


def metric_text(task: Any, value: float) -> str:
    """The primary metric alone: "top-1 93.41%", "perplexity 12.300"."""
    info = _info(task)
    digits = 2 if higher_is_better(info) else 3
    return f"{info['label']} {value:.{digits}f}{info['unit']}"


def arrow_text(task: Any, dense: float, value: float) -> str:
    """"top-1 93.41% -> 92.10% (-1.31 pp)", "perplexity 12.300 -> 12.900 (+4.9%)"."""
    info = _info(task)
    digits = 2 if higher_is_better(info) else 3
    return (f"{info['label']} {dense:.{digits}f}{info['unit']} -> {value:.{digits}f}{info['unit']} "
            f"({change_text(info, dense, value)})")
