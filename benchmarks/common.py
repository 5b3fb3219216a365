"""Helpers shared by the benchmark scripts: run compress quietly, format markdown tables, write results."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Iterable

from compressor.pipeline import compress
from compressor.recipe import load_recipe

RESULTS = Path(__file__).resolve().parent / "results"


def run_compress(checkpoint: str, recipe: str, out: Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """One `compressor compress` run (library call) with overrides; returns the report and its wall time."""
    start = time.perf_counter()
    report = compress(checkpoint, load_recipe(recipe, list(overrides)), out, overwrite=True)
    report["wall_s"] = time.perf_counter() - start
    return report


def latency(report: dict[str, Any], backend: str, batch: int) -> dict[str, Any]:
    return next(r for r in report["latency"] if r["backend"] == backend and r["batch_size"] == batch)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    print(text)
    return path
