"""`prune.round_to: auto`, decided by measurement on the machine that runs the compression.

Which channel multiple runs fastest depends on the runtime, its version and the CPU (ONNX Runtime 1.32 on an AVX-512
Xeon pads 13-channel convolutions into its 16-channel blocks, so a 17-wide layer costs as much as a 32-wide one;
on AVX2 the block is 8), so a fixed rule per instruction set is a guess. Here each candidate multiple is tried on
the model itself: plan the recipe's final target with magnitude scores on a copy, remove, export, and time every
candidate round-robin on the recipe's first CPU bench backend at its batch sizes; the finest multiple within 3% of
the fastest (geometric mean of the per-batch medians) wins, since a finer multiple leaves the importance ranking
more freedom. Under `auto` a group narrower than twice the multiple keeps the largest power of two
it can still lose (a 16-wide layer under 16 keeps multiples of 8), so the multiple never locks a layer whole.

GPU backends keep the static rule of hardware.auto_round_to (a TensorRT engine build per candidate would take
minutes). The choice is saved in the run directory, so --resume and every DDP rank use the same value.
Spec: docs/planning.md.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from compressor.deploy.hardware import auto_round_to
from compressor.deploy.runners import gpu_backends
from compressor.ranks import main_then_share

if TYPE_CHECKING:
    from torch import nn

    from compressor.app.recipe import Recipe

CANDIDATES = (1, 4, 8, 16, 32)
MEASURE_SECONDS = 0.5  # per candidate and batch size, after a 200 ms warm-up
TIE = 0.03  # candidates this close to the fastest count as equally fast: the finest of them wins (more freedom to
# keep the important channels, MACs closer to the target)
STATE_FILE = "round_to.json"


def resolve_round_to(recipe: "Recipe", model: Optional["nn.Module"] = None, *,
                     out: Optional[Path] = None) -> tuple["Recipe", Optional[str]]:
    """A copy of the recipe with `auto` replaced by a number, and a note saying which and why.

    With a model the number is measured (see the module docstring) and saved to out/round_to.json; a saved choice
    is reused. Without a model (inspect) the static rule of hardware.auto_round_to gives an estimate."""
    if recipe.prune.round_to != "auto":
        return recipe, None
    saved = out / STATE_FILE if out is not None else None
    if recipe.prune.target.table is not None and not (saved is not None and saved.is_file()):
        value, reason = _table_step(recipe.prune.target.table)  # the table's curves choose each group's widths
        result = {"value": value, "reason": reason, "measured": False}
    elif (model is None or _backend(recipe) is None) and not (saved is not None and saved.is_file()):
        value, reason = auto_round_to(recipe)
        result = {"value": value, "reason": reason, "measured": False}
    else:  # under DDP rank 0 reads or measures and writes; every rank adopts its result
        result = main_then_share(lambda: saved_or_measured(saved, lambda: measure_round_to(model, recipe)))
    resolved = recipe.model_copy(deep=True)
    resolved.prune.round_to = int(result["value"])
    resolved.prune._round_to_auto = True
    return resolved, f"prune.round_to auto -> {result['value']}: {result['reason']}."


def _table_step(path: str) -> tuple[int, str]:
    try:
        step = int(json.loads(Path(path).read_text()).get("step") or 1)
    except (OSError, ValueError, AttributeError, TypeError):
        step = 1  # the latency target reports what is wrong with the file
    return step, (f"the latency table {path} was sampled every {step} channels; each tabled group keeps only the "
                  "widths where its measured latency steps down, layers without a row multiples of this")


def _backend(recipe: "Recipe") -> Optional[str]:
    """The runtime the measurement uses: the first CPU bench backend (ort-cpu when none is listed), None for GPUs."""
    backends = list(recipe.bench.backends)
    if set(backends) & gpu_backends() or recipe.export.tensorrt.enabled is True:
        return None
    return next((b for b in backends if b in ("ort-cpu", "torch")), "ort-cpu")


def saved_or_measured(saved: Optional[Path], measure) -> dict[str, Any]:
    """The record saved in the run directory (--resume), else a new measurement, saved there."""
    if saved is not None and saved.is_file():
        return json.loads(saved.read_text())
    result = measure()
    if saved is not None:
        from compressor.rundir import write_json

        write_json(saved, result)
    return result


def measure_round_to(model: "nn.Module", recipe: "Recipe", candidates: tuple[int, ...] = CANDIDATES) -> dict[str, Any]:
    """Time the recipe's target at every candidate multiple; {value, reason, measured, backend, rows}."""
    from compressor.prune.op_count import snapshot_macs
    from compressor.prune.planning import constraints_from, plan_for_target
    from compressor.prune.removal import remove
    from compressor.prune.snapshot import recipe_snapshot
    from compressor.deploy.timing import Budget, close_all, time_in_turn
    from compressor.models.loading import example_inputs

    backend = _backend(recipe) or "ort-cpu"
    example = example_inputs(recipe.model)
    base, snap = magnitude_snapshot(model, recipe)
    widest = max(c.width for c in snap.candidates)
    tried = [c for c in candidates if c == 1 or c <= widest // 2]
    cfg = recipe.bench
    rows, runners = [], []
    with tempfile.TemporaryDirectory(prefix="compressor-round-to-") as tmp:
        try:
            for step in tried:
                cons = constraints_from(recipe, round_to=step, clamp=True)
                work = copy.deepcopy(base)
                remove(work, example, plan_for_target(snap, recipe.prune.target, cons))
                rows.append({"round_to": step, "macs": snapshot_macs(work, example)[0] / snap.total_macs})
                runners.append(timing_runner(work, recipe, backend, Path(tmp) / f"round_to_{step}.onnx"))
            for batch in cfg.batch_sizes:
                for row, ms in zip(rows, time_in_turn(runners, batch, Budget(200.0, 10, MEASURE_SECONDS)).p50_ms):
                    row[f"ms_b{batch}"] = ms
        finally:
            close_all(runners)
    for row in rows:
        row["score_ms"] = math.exp(statistics.mean(math.log(row[f"ms_b{b}"]) for b in cfg.batch_sizes))
    fastest = min(r["score_ms"] for r in rows)
    best = next(r for r in rows if r["score_ms"] <= fastest * (1 + TIE))  # rows ascend: the finest of the fastest
    timings = ", ".join(f"{r['round_to']}: {r['score_ms']:.3f} ms" for r in rows)
    reason = (f"the finest multiple within {TIE:.0%} of the fastest among {', '.join(str(r['round_to']) for r in rows)}, "
              f"measured on {backend} at batch {', '.join(map(str, cfg.batch_sizes))} for this model at its target "
              f"({timings}; geometric mean of median latencies)")
    return {"value": best["round_to"], "reason": reason, "measured": True, "backend": backend, "rows": rows}


def magnitude_snapshot(model: "nn.Module", recipe: "Recipe"):
    """An eval-mode copy of the model and its planning snapshot with magnitude scores (what the measurements of
    round_to and latency targets plan on: the method's own scores need training)."""
    from compressor.models.loading import example_inputs
    from compressor.prune.op_count import snapshot_macs
    from compressor.prune.planning import constraints_from, plan_for_target
    from compressor.prune.removal import remove
    from compressor.prune.snapshot import recipe_snapshot
    from compressor.prune.importance import ImportanceConfig, build_scorer

    base = copy.deepcopy(model).cpu().eval()
    snap = recipe_snapshot(base, example_inputs(recipe.model), recipe, build_scorer(ImportanceConfig(kind="magnitude")))
    return base, snap


def timing_runner(model: "nn.Module", recipe: "Recipe", backend: str, onnx_path: Path):
    """A bench runner for `model` on `backend`: the module itself for torch, else its ONNX export at `onnx_path`
    with the recipe's export settings (simplification included): what is timed is what the run will deploy. An
    unsimplified export of a pruned SSDlite timed 10% slower than the simplified one (1.69 vs 1.54 ms), its dense
    model's did not (3.25 vs 3.22 ms), so a loop timing unsimplified files stopped at x2.01 where the final bench
    measured x2.13."""
    from compressor.deploy.timing import make_runner
    from compressor.deploy.export import export_onnx
    from compressor.models.loading import example_inputs

    artifact: Any = model
    if backend != "torch":
        export_onnx(model, example_inputs(recipe.model), onnx_path, recipe.export.onnx)
        artifact = onnx_path
    return make_runner(backend, artifact, recipe.bench.threads, list(recipe.model.input_shape), interleaved=True)
