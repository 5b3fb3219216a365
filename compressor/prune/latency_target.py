"""`prune.target: {latency: F}` or `{latency_speedup: S}`: a measured latency as the target, closed by a
measure-prune loop on the machine that runs the compression (docs/planning.md, "Latency targets").

Every structured method plans to a MAC fraction; which MAC fraction gives a latency speedup S depends on the model,
the runtime and the CPU (realised ratios 0.4-1.2 across torchvision). So before training the target is translated:
plan a MAC fraction m with magnitude scores on a copy of the model, remove, export, and time it interleaved with
the dense model on the target's backend and batch; then move m until the measured speedup is within 5% of S. The
speedup is modelled locally as S(m) = m^(-r): the first try at m = 1/S measures r, later tries interpolate
between the two nearest measured points in log space (secant), bounded to MAX_TRIES measurements; a try that
was not faster than dense halves m. The measured speedup is a noisy step function of the widths (a layout or kernel
change at some width), so when the secant lands on a fraction already tried the loop bisects the tightest bracket
instead, and it ends when no untried fraction is left between the two. The chosen m
becomes the run's MAC target, so oneshot, iterative, DPM (release and backfill included), FGGP structured and
OCSP all plan to it; after fine-tuning the report measures the speedup again and says whether the target held.

The loop is saved in the run directory (latency_target.json): --resume and every DDP rank use the same m.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from torch import nn

    from compressor.app.recipe import Recipe

TOLERANCE = 0.05  # a measured speedup within 5% of the asked one ends the loop
MAX_TRIES = 8
MEASURE_SECONDS = 2.0  # per model and try, after a 300 ms warm-up, dense and pruned interleaved (at least 10 runs):
# two separate measurements of the same pair differed by up to 10% at 1 s on a shared 2-core machine
MIN_RUNS = 10
STATE_FILE = "latency_target.json"
MAC_RANGE = (0.02, 0.98)


def target_backend(recipe: "Recipe") -> tuple[str, int]:
    """The backend and batch a latency target is measured on: its own, else the recipe's first bench ones."""
    t = recipe.prune.target
    backend = t.backend or (recipe.bench.backends[0] if recipe.bench.backends else "ort-cpu")
    return backend, int(t.batch or recipe.bench.batch_sizes[0])


def next_macs(points: list[tuple[float, float]], asked: float) -> float:
    """The MAC fraction to try next for a speedup `asked`, from measured (macs, speedup) points: with one point
    S = m^(-r) through it, with more the secant (log-log) between the two points that bracket the asked speedup
    or, without a bracket, the two nearest to it."""
    log_s = math.log(asked)
    pts = sorted({(round(m, 6), s) for m, s in points if m > 0 and s > 0})
    if len(pts) == 1 or all(p[0] == pts[0][0] for p in pts):
        m, s = pts[0]
        if s <= 1 or m >= 1:  # pruning made nothing faster: remove twice as much
            guess = m * 0.5
        else:
            r = math.log(s) / -math.log(m)
            guess = math.exp(-log_s / max(r, 0.05))
    else:
        below = [p for p in pts if p[1] <= asked]
        above = [p for p in pts if p[1] > asked]
        if below and above:  # the fastest point still too slow, and the slowest already too fast
            a = max(below, key=lambda p: p[1])
            b = min(above, key=lambda p: p[1])
        else:
            a, b = sorted(pts, key=lambda p: abs(math.log(p[1]) - log_s))[:2]
        (m1, s1), (m2, s2) = a, b
        if abs(math.log(s2) - math.log(s1)) < 1e-9:
            guess = min(m1, m2) * 0.8 if s1 < asked else max(m1, m2) * 1.2
        else:
            slope = (math.log(m2) - math.log(m1)) / (math.log(s2) - math.log(s1))
            guess = math.exp(math.log(m1) + slope * (log_s - math.log(s1)))
    return min(MAC_RANGE[1], max(MAC_RANGE[0], guess))


def next_try(points: list[tuple[float, float]], asked: float, *, resolution: float = 2e-3) -> Optional[float]:
    """next_macs, or, when that was tried already (speedup is a step function of the widths, and noisy), the
    log-midpoint of the tightest bracket around the asked speedup; None when no untried fraction is left."""
    tried = [m for m, _ in points]
    following = next_macs(points, asked)
    if all(abs(following - m) >= resolution for m in tried):
        return following
    slower = [m for m, s in points if s < asked]  # not fast enough: more MACs than the answer
    faster = [m for m, s in points if s >= asked]
    if not slower or not faster:
        return None
    high, low = min(slower), max(faster)  # the answer lies between (speedup falls as the MACs grow)
    if high <= low:
        return None  # the measurements contradict each other (noise or a step): keep the best of them
    middle = math.sqrt(high * low)
    return middle if all(abs(middle - m) >= resolution for m in tried) else None


def resolve_latency_target(recipe: "Recipe", model: "nn.Module", *,
                           out: Optional[Path] = None) -> tuple["Recipe", Optional[dict[str, Any]]]:
    """A copy of the recipe whose latency target is replaced by the measured MAC fraction, and the loop's record
    (None when the target is not a latency one). A record saved in `out` is reused."""
    target = recipe.prune.target
    if not target.is_latency:
        return recipe, None
    saved = out / STATE_FILE if out is not None else None
    if saved is not None and saved.is_file():
        record = json.loads(saved.read_text())
    else:
        from compressor.prune.round_to import _shared

        record = _shared(lambda: measure_latency_target(model, recipe))
        if saved is not None:
            from compressor.rundir import write_json

            write_json(saved, record)
    return with_mac_target(recipe, record["macs"]), record


def with_mac_target(recipe: "Recipe", macs: float) -> "Recipe":
    """The recipe planning to `macs`, remembering the latency target it came from."""
    from compressor.prune.config import TargetConfig

    resolved = recipe.model_copy(deep=True)
    resolved.prune.target = TargetConfig(macs=macs)
    resolved.prune._latency_target = recipe.prune.target
    return resolved


def measure_latency_target(model: "nn.Module", recipe: "Recipe") -> dict[str, Any]:
    """The loop of the module docstring; {asked, backend, batch, macs, measured, met, tries}."""
    from compressor.deploy.bench import measure_round_robin
    from compressor.models.loading import example_inputs
    from compressor.prune import selection as sel
    from compressor.prune.config import TargetConfig
    from compressor.prune.round_to import magnitude_snapshot, timing_runner
    from compressor.progress import info

    asked = recipe.prune.target.asked_latency_speedup()
    backend, batch = target_backend(recipe)
    example = example_inputs(recipe.model)
    base, snap = magnitude_snapshot(model, recipe)
    cons = sel.constraints_from(recipe)
    tries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as tmp:
        dense = timing_runner(base, recipe, backend, Path(tmp) / "dense.onnx")
        try:
            macs = 1.0 / asked
            for i in range(MAX_TRIES):
                work = copy.deepcopy(base)
                sel.remove(work, example, sel.plan_for_target(snap, TargetConfig(macs=macs), cons))
                achieved = sel.snapshot_macs(work, example)[0] / snap.total_macs
                pruned = timing_runner(work, recipe, backend, Path(tmp) / f"try{i}.onnx")
                try:
                    t_dense, t_pruned = measure_round_robin([dense, pruned], batch, 300.0, MIN_RUNS,
                                                            MEASURE_SECONDS)
                finally:
                    pruned.close()
                dense_ms, pruned_ms = statistics.median(t_dense) * 1e3, statistics.median(t_pruned) * 1e3
                speedup = dense_ms / pruned_ms
                tries.append({"asked_macs": macs, "macs": achieved, "dense_ms": dense_ms, "pruned_ms": pruned_ms,
                              "speedup": speedup})
                info(f"      latency target x{asked:.2f} on {backend} batch {batch}: MACs {achieved:.3f} -> "
                     f"{dense_ms:.3f} / {pruned_ms:.3f} ms (x{speedup:.2f})")
                if abs(speedup / asked - 1) <= TOLERANCE:
                    break
                following = next_try([(t["asked_macs"], t["speedup"]) for t in tries], asked)
                if following is None:
                    break  # the bracket is narrower than the planner's granularity: nothing new to try
                macs = following
        finally:
            dense.close()
    best = min(tries, key=lambda t: abs(math.log(t["speedup"] / asked)))
    return {"asked_speedup": asked, "backend": backend, "batch": batch, "macs": best["asked_macs"],
            "achieved_macs": best["macs"], "measured_speedup": best["speedup"],
            "met": abs(best["speedup"] / asked - 1) <= TOLERANCE, "tolerance": TOLERANCE, "tries": tries}
