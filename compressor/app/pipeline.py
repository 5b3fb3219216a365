"""`compress`: checkpoint + recipe -> pruned, fine-tuned, slimmed, exported, verified and benchmarked model, with
report.json / report.md / plots in the run directory. The library entry point behind `compressor compress`."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from compressor import rundir
from compressor.train.data import build_datasets, sample_batch
from compressor.errors import BackendUnavailable, GateError, ParityError, UsageError
from compressor.deploy.evaluation import evaluate_onnx
from compressor.deploy.export import export_onnx
from compressor.prune.round_to import resolve_round_to
from compressor.prune.methods import METHODS
from compressor.models.loading import example_inputs, load_model
from compressor.progress import info
from compressor.app.recipe import Recipe, dump_recipe, load_recipe
from compressor.prune.selection import MISS_TOLERANCE, relative_miss, snapshot_macs
from compressor.models.slim import layer_widths, save_slim
from compressor.train.loop import dense_teacher, evaluate, fit
from compressor.deploy.verify import verify_onnx


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Span()


def prepare_run_dir(out: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> Path:
    """Create the run directory; refuse to mix runs (a different recipe, or an old run without --resume)."""
    recipe_file = out / "recipe.yaml"
    rundir.check_output_dir(out, "--out")
    # a run that stopped before its first artifact (bad checkpoint or data) left only recipe.yaml: not a run to keep
    if out.exists() and any(p.name != recipe_file.name for p in out.iterdir()):
        if resume:
            if recipe_file.is_file() and recipe_file.read_text() != dump_recipe(recipe):
                raise UsageError(f"--resume: {recipe_file} differs from the recipe given now; resume with the same "
                                 "recipe and --set values, or start a new --out.")
        elif overwrite:
            for stale in ("report.json", "report.md", rundir.CHECKPOINT, "round_to.json"):  # round_to.py STATE_FILE
                (out / stale).unlink(missing_ok=True)
        else:
            raise UsageError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                             "or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_text(recipe_file, dump_recipe(recipe))
    return out


def preflight(recipe: Recipe, device: str) -> list[str]:
    """Fail before any training when an explicitly requested backend or device is missing (exit 3)."""
    notes = []
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device} was asked for but PyTorch sees no CUDA GPU.",
                                 hint="Use --device cpu, or install a CUDA build of PyTorch on a GPU machine.")
    from compressor.deploy.bench import check_backend

    for backend in recipe.bench.backends:
        check_backend(backend)
    trt = recipe.export.tensorrt.enabled
    if trt is not False:
        from compressor.deploy.tensorrt_engine import tensorrt_available

        ok, why = tensorrt_available()
        if not ok and trt is True:
            raise BackendUnavailable(f"export.tensorrt.enabled is true but {why}.",
                                     hint="Set export.tensorrt.enabled: auto (or false), or run on an NVIDIA GPU "
                                          "machine with the [gpu] extra installed.")
        if not ok:
            notes.append(f"TensorRT engine skipped: {why} (export.tensorrt.enabled: auto)")
    return notes


def compress(checkpoint: str | Path, recipe: Recipe | str | Path, out_dir: Optional[str | Path] = None, *,
             device: str = "cpu", resume: bool = False, overwrite: bool = False, trust_checkpoint: bool = False,
             overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the whole chain and return the report (also written to out_dir/report.json).

    Raises GateError (exit 1) after writing the report when a recipe gate fails, ParityError (exit 1) when an
    export disagrees with PyTorch.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, list(overrides))
    out = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    timer = Timer()
    notes = preflight(recipe, device)
    out = prepare_run_dir(out, recipe, resume=resume, overwrite=overwrite)
    is_main = rundir_is_main()
    with timer("load"):
        model = load_model(checkpoint, recipe.model, trust_checkpoint=trust_checkpoint)
        train_set, val_set = build_datasets(recipe.data, recipe.model)
    with timer("round_to"):  # recipe.yaml in the run keeps `auto` as written; the choice is in round_to.json
        recipe, round_note = resolve_round_to(recipe, model, out=out)
    if round_note:
        notes.append(round_note)
        info(round_note)
    example = example_inputs(recipe.model)
    eval_batch = recipe.data.eval_batch_size or max(recipe.data.batch_size, 256)

    info(f"[1/6] dense baseline: evaluating {checkpoint} on {len(val_set)} {recipe.data.kind} samples")
    with timer("dense_eval"):
        dense_metrics = evaluate(model, val_set, batch_size=eval_batch, device=device)
        dense_macs, dense_params = snapshot_macs(model.cpu(), example)
        dense_widths = layer_widths(model)
        dense = _copy_for_bench(model)
    info(f"      top-1 {dense_metrics['top1']:.2f}%, {dense_macs / 1e6:.1f} M MACs, {dense_params / 1e3:.1f} K params")

    info(f"[2/6] pruning with {recipe.prune.method} (host {recipe.prune.host}) and fine-tuning "
         f"{recipe.finetune.epochs} epochs")
    method = METHODS.get(recipe.prune.method)(recipe)
    teacher = dense_teacher(model) if recipe.finetune.distill.enabled else None
    from compressor.train.loop import check_method_schedule  # warnings (printed, noted in the report), or a RecipeError when strict

    notes += check_method_schedule(method, len(train_set), recipe.finetune, recipe.data)
    with timer("prune_finetune"):
        result = fit(model, train_set, val_set, recipe.finetune, recipe.data, method=method, teacher=teacher,
                     checkpoint=out / rundir.CHECKPOINT, resume=resume, device=device)
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)

    info("[3/6] evaluating the compressed model")
    with timer("eval"):
        metrics = evaluate(model, val_set, batch_size=eval_batch)
        macs, params = snapshot_macs(model, example)
    if not is_main:
        return {}
    info(f"      top-1 {metrics['top1']:.2f}% ({metrics['top1'] - dense_metrics['top1']:+.2f} pp), "
         f"MACs {macs / dense_macs:.3f} of dense, params {params / dense_params:.3f}")

    info("[4/6] saving the slim model and exporting to ONNX")
    with timer("export"):
        artifacts = save_slim(model, out, recipe.model)
        sparse = "sparsity" in method.summary()  # unstructured / 2:4 zeros: the file size that matters is zipped
        onnx_info = export_onnx(model, example, out / "model.onnx", recipe.export.onnx, zipped=sparse)
        dense_onnx = export_onnx(dense, example, out / "dense.onnx", recipe.export.onnx, zipped=sparse)
    samples, _ = sample_batch(val_set, recipe.verify.samples)

    report: dict[str, Any] = {
        "status": "running", "recipe": json.loads(recipe.model_dump_json(by_alias=True)), "checkpoint": str(checkpoint),
        "run_dir": str(out), "notes": notes,
        "dense": {**dense_metrics, "macs": dense_macs, "params": dense_params, "onnx_bytes": dense_onnx["bytes"],
                  "onnx_zipped_bytes": dense_onnx["zipped_bytes"], "widths": dense_widths},
        "compressed": {**metrics, "macs": macs, "params": params, "onnx_bytes": onnx_info["bytes"],
                       "onnx_zipped_bytes": onnx_info["zipped_bytes"], "widths": layer_widths(model)},
        "target": _target_summary(recipe, macs / dense_macs),
        "round_to": _round_to_summary(recipe, out, round_note),
        "method": method.summary(),
        "training": {"history": result.history, "seconds": result.seconds, "resumed_from": result.resumed_from},
        "exports": {"onnx": onnx_info, "dense_onnx": dense_onnx},
        "artifacts": {**artifacts, "onnx": str(out / "model.onnx")},
    }
    for event in report["method"].get("events", []):
        if event.get("note"):
            notes.append(f"pruning event {event.get('event', '?')}: {event['note']}")
    if report["target"]["met"] is False:
        notes.append(_target_missed(recipe, report["target"]))
        info(f"      note: {notes[-1]}")
    info("[5/6] verifying the export against PyTorch")
    try:
        with timer("verify"):
            report["parity"] = {"onnx": verify_onnx(model, out / "model.onnx", samples, recipe.verify)}
            report["compressed"]["onnx_top1"] = evaluate_onnx(out / "model.onnx", val_set, batch_size=eval_batch)["top1"]
        if "note" in report["parity"]["onnx"]:
            notes.append(report["parity"]["onnx"]["note"])
            info(f"      note: {notes[-1]}")
    except ParityError as exc:
        report["status"] = "failed: parity"
        report["parity"] = {"onnx": {"passed": False, "error": exc.render()}}
        _finish(report, out, timer)
        raise
    from compressor.deploy.trt_compat import check_onnx

    report["exports"]["tensorrt_compatibility"] = check_onnx(out / "model.onnx").to_dict()
    report["exports"]["tensorrt"] = _tensorrt_step(recipe, out, model, samples, train_set)
    if report["exports"]["tensorrt"].get("parity"):
        report["parity"]["tensorrt"] = report["exports"]["tensorrt"]["parity"]

    if recipe.bench.backends:
        info(f"[6/6] measuring latency ({', '.join(recipe.bench.backends)}; batch {recipe.bench.batch_sizes}), "
             "dense and compressed interleaved")
    else:
        info("[6/6] latency: skipped (bench.backends is empty)")
    with timer("bench"):
        report["latency"], report["environment"] = _bench(recipe, out, dense, model, macs, dense_macs)
        if "ort-cpu" in recipe.bench.backends:
            from compressor.deploy.ort_profile import ROUND_TO_ADVICE, layout_check

            advice = ROUND_TO_ADVICE if not recipe.prune.round_to else (
                f"this run kept multiples of {recipe.prune.round_to} (prune.round_to"
                f"{' auto' if recipe.prune._round_to_auto else ''}; narrower layers smaller ones under auto): compare "
                "other multiples with --set prune.round_to=N and `compressor profile`")
            report["ort_cpu_layout"] = layout_check(out / "dense.onnx", out / "model.onnx", threads=recipe.bench.threads,
                                                    input_shape=list(recipe.model.input_shape), advice=advice)
            for finding in report["ort_cpu_layout"]["findings"]:
                info(f"      note: {finding}")
    report["gates"] = evaluate_gates(recipe, report)
    failed = [g for g in report["gates"] if not g["passed"]]
    report["status"] = "failed: gates" if failed else "ok"
    _finish(report, out, timer)
    if failed:
        raise GateError("; ".join(f"{g['name']} {g['value']:.3f} vs limit {g['limit']}" for g in failed) +
                        f". The report is in {out}/report.md.")
    return report


def rundir_is_main() -> bool:
    from compressor.progress import is_main_process

    return is_main_process()


def _copy_for_bench(model):
    import copy

    return copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)


def _target_summary(recipe: Recipe, achieved: float) -> dict[str, Any]:
    target = recipe.prune.target
    if recipe.prune.method == "none" or (recipe.prune.method == "fggp" and recipe.prune.fggp.granularity != "structured"):
        return {"asked": None, "asked_macs_ratio": None, "achieved_macs_ratio": achieved,
                "achieved_mac_speedup": 1 / achieved if achieved > 0 else None, "met": None}
    asked = target.remaining_macs()
    return {"asked": target.model_dump(exclude_none=True), "asked_macs_ratio": asked, "achieved_macs_ratio": achieved,
            "achieved_mac_speedup": 1 / achieved if achieved > 0 else None, "tolerance": MISS_TOLERANCE,
            "met": None if asked is None else abs(relative_miss(achieved, asked)) <= MISS_TOLERANCE}


def _round_to_summary(recipe: Recipe, out: Path, note: Optional[str]) -> dict[str, Any]:
    """The channel multiple used and, for `auto`, how it was chosen (round_to.json holds the measured rows)."""
    from compressor.prune.round_to import STATE_FILE

    saved = out / STATE_FILE
    chosen = json.loads(saved.read_text()) if saved.is_file() else {}
    return {"value": recipe.prune.round_to, "auto": recipe.prune._round_to_auto, "note": note, **chosen}


def _target_missed(recipe: Recipe, target: dict[str, Any]) -> str:
    achieved, asked = target["achieved_macs_ratio"], target["asked_macs_ratio"]
    head = (f"MAC target missed by more than {MISS_TOLERANCE:.0%}: {achieved:.3f} of the dense MACs kept, "
            f"{asked:.3f} asked ({relative_miss(achieved, asked):+.1%}).")
    if achieved > asked:
        return (f"{head} The prunable groups cannot give more under prune.max_layer_ratio "
                f"{recipe.prune.max_layer_ratio} and prune.round_to {recipe.prune.round_to} (ignored layers, attention "
                "widths and unprunable layers stay as they are; `compressor inspect` lists them).")
    return (f"{head} More was removed than asked: prune.round_to {recipe.prune.round_to} leaves coarse steps for "
            "the few prunable groups, or torch-pruning removed coupled channels the plan did not count (the pruning "
            "events' notes say which).")


def _tensorrt_step(recipe: Recipe, out: Path, model, samples, train_set) -> dict[str, Any]:
    if recipe.export.tensorrt.enabled is False:
        return {"status": "disabled"}
    from compressor.deploy.tensorrt_engine import build_and_verify, settings_from_recipe, tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        return {"status": "skipped", "reason": why}
    settings = settings_from_recipe(recipe)
    calibration = sample_batch(train_set, settings.calib_samples)[0] if settings.calib_samples else None
    return build_and_verify(model, out / "model.onnx", samples, recipe, settings, calibration=calibration)


def _bench(recipe: Recipe, out: Path, dense, model, macs: float, dense_macs: float):
    from compressor.deploy.bench import environment, make_runner, measure_interleaved, summarize

    cfg = recipe.bench
    rows = []
    for backend in cfg.backends:
        artifact_dense = dense if backend == "torch" else out / "dense.onnx"
        artifact = model if backend == "torch" else out / "model.onnx"
        runner_dense = make_runner(backend, artifact_dense, cfg.threads, list(recipe.model.input_shape))
        runner = make_runner(backend, artifact, cfg.threads, list(recipe.model.input_shape))
        for batch in cfg.batch_sizes:
            times_dense, times = measure_interleaved(runner_dense, runner, batch, cfg.warmup_ms, cfg.min_runs,
                                                     cfg.min_seconds)
            dense_stats, stats = summarize(times_dense, batch), summarize(times, batch)
            speedup = dense_stats.p50 / stats.p50
            rows.append({"backend": backend, "batch_size": batch, "dense": asdict(dense_stats),
                         "compressed": asdict(stats), "speedup": speedup,
                         "realised_ratio": speedup / (dense_macs / macs),
                         "dense_ms": [t * 1e3 for t in times_dense], "compressed_ms": [t * 1e3 for t in times]})
            info(f"      {backend} batch {batch}: {dense_stats.p50:.3f} -> {stats.p50:.3f} ms (x{speedup:.2f})")
        runner_dense.close()
        runner.close()
    return rows, environment(threads=cfg.threads)


def evaluate_gates(recipe: Recipe, report: dict[str, Any]) -> list[dict[str, Any]]:
    gates = []
    g = recipe.gates
    if g.max_accuracy_drop is not None:
        drop = report["dense"]["top1"] - report["compressed"]["top1"]
        gates.append({"name": "max_accuracy_drop", "value": drop, "limit": g.max_accuracy_drop,
                      "passed": drop <= g.max_accuracy_drop})
    if g.min_speedup is not None and report.get("latency"):
        first = report["latency"][0]
        gates.append({"name": f"min_speedup ({first['backend']}, batch {first['batch_size']})",
                      "value": first["speedup"], "limit": g.min_speedup, "passed": first["speedup"] >= g.min_speedup})
    return gates


def _finish(report: dict[str, Any], out: Path, timer: Timer) -> None:
    from compressor.app.report import write_report

    report["timings_s"] = dict(timer.seconds)
    write_report(report, out)
