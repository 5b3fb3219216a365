"""Markdown tables for report.md and the methods' report sections."""
from __future__ import annotations

from typing import Any, Optional


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table as lines, followed by a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def number(value: Any, digits: int = 3) -> str:
    """A float with `digits` decimals, '-' for None, anything else as str."""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def speedup_label(value: Optional[float]) -> str:
    """'x1.23', or 'n/a' for a speedup that has no value (a latency table that prices a plan at no time)."""
    return "n/a" if value is None else f"x{value:.2f}"
