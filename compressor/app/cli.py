"""The `compressor` command line. Commands are thin adapters: parse, call one library function, print.

Heavy imports (torch, onnx) happen inside the commands so `--help` is instant and `bench` of an ONNX file works
on a device with only numpy and onnxruntime.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from compressor import progress  # noqa: F401  before rich: it imports rich keeping Python's random state
from compressor.errors import CompressorError, UsageError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Structured pruning, slimming, export and benchmarking of PyTorch models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
recipes_app = typer.Typer(help="List, show, validate shipped and user recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
STATE = {"debug": False}

RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe file, or the name of a shipped recipe.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: --set finetune.epochs=3 (repeatable).")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow unpickling a whole nn.Module (runs code from the file: only for trusted files).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]


INTERNAL_ERROR_EXIT = 1


def _typer_exceptions() -> tuple[type[BaseException], ...]:
    """Typer's own exits and usage errors, which must pass through: typer 0.2x vendors click (typer._click), older
    versions use the click package."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # typer that depends on click
        from click.exceptions import ClickException
    return (typer.Exit, typer.Abort, ClickException)


PASS_THROUGH = _typer_exceptions()


def handles_errors(fn: Callable) -> Callable:
    """Turn CompressorError into one message on stderr and its exit code, and anything unexpected into one
    "internal error" paragraph and exit 1. With --debug both are re-raised: the traceback shows, with the chained
    cause of a wrapped error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PASS_THROUGH:
            raise  # typer's own exits and usage errors (Exit and Abort are RuntimeErrors)
        except CompressorError as exc:
            if STATE["debug"]:
                raise
            err.print(f"[bold red]{exc.title}:[/] {escape(exc.render())}", markup=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's safety net: never a bare traceback
            if STATE["debug"]:
                raise
            err.print(f"[bold red]internal error:[/] {escape(internal_error_message(exc))}", markup=True)
            raise typer.Exit(INTERNAL_ERROR_EXIT) from None

    return wrapper


def internal_error_message(exc: BaseException) -> str:
    """One paragraph for an exception compressor did not expect: its type, the first line of its message, and
    what to do."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    more = " (first line of the message)" if len(lines) > 1 else ""
    return (f"{type(exc).__name__}: {text}{more}. This was not expected and is likely a bug in compressor or a "
            "library it uses; rerun with --debug for the traceback and report it "
            "(compressor --debug COMMAND ...).")


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False) -> None:
    STATE["debug"] = debug


def _load_recipe(recipe: Optional[str], overrides: Optional[list[str]], *, required: bool = True):
    from compressor.app.recipe import load_recipe

    if recipe is None:
        if required:
            raise UsageError("this command needs --recipe FILE (or the name of a shipped recipe).")
        if overrides:
            raise UsageError(f"--set {overrides[0]} needs --recipe: --set overrides a value of the recipe given "
                             "with --recipe FILE.")
        return None
    return load_recipe(recipe, overrides or [])


def _check_json_out(path: Optional[Path]) -> None:
    """Refuse a --json path that cannot be written before any work is done."""
    if path is not None:
        from compressor.rundir import check_output_file

        check_output_file(path, "--json")


# ---------------------------------------------------------------------------------------------- recipes
@recipes_app.command("list")
@handles_errors
def recipes_list() -> None:
    """The recipes shipped in recipes/."""
    from compressor.app.recipe import load_recipe, shipped_recipes

    table = Table("name", "method", "target", "model", "data")
    for name, path in shipped_recipes().items():
        r = load_recipe(path)
        target = ", ".join(f"{k}={v}" for k, v in r.prune.target.model_dump().items() if v is not None)
        table.add_row(name, r.prune.method, target, r.model.arch or "-", r.data.kind)
    out.print(table)


@recipes_app.command("show")
@handles_errors
def recipes_show(name: Annotated[str, typer.Argument(help="Shipped recipe name or file.")],
                 overrides: SetOpt = None) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied)."""
    from compressor.app.recipe import dump_recipe

    out.print(dump_recipe(_load_recipe(name, overrides)), end="", markup=False)


@recipes_app.command("validate")
@handles_errors
def recipes_validate(files: Annotated[list[str], typer.Argument(help="Recipe files or shipped names.")],
                     overrides: SetOpt = None) -> None:
    """Validate recipe files; exit 2 naming the field on the first invalid one."""
    for file in files:
        recipe = _load_recipe(file, overrides)
        out.print(f"ok: {file} ({recipe.name}, method {recipe.prune.method})")


@recipes_app.command("schema")
@handles_errors
def recipes_schema() -> None:
    """The recipe's JSON schema."""
    from compressor.app.recipe import recipe_schema

    out.print(json.dumps(recipe_schema(), indent=2), markup=False)


# ---------------------------------------------------------------------------------------------- eval
@app.command("eval")
@handles_errors
def eval_cmd(model: Annotated[str, typer.Argument(help="Checkpoint (.pt/.safetensors), slim model folder, or model.onnx.")],
             recipe: RecipeOpt = None, overrides: SetOpt = None, trust_checkpoint: TrustOpt = False,
             device: DeviceOpt = "cpu",
             json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics as JSON.")] = None) -> None:
    """Top-1, top-5 and loss of a model on the recipe's validation data."""
    from compressor.app.evaluation import evaluate_artifact
    from compressor.models.loading import check_device

    r = _load_recipe(recipe, overrides)
    check_device(device)
    _check_json_out(json_out)
    metrics = evaluate_artifact(model, r, trust_checkpoint=trust_checkpoint, device=device)
    if r.task == "classification":
        out.print(f"{model}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
                  f"({metrics['count']} samples of {r.data.kind})")
    else:
        task = r.build_task()
        out.print(f"{model}: {task.summary(metrics)}  ({int(metrics['count'])} {task.count_label} of {r.data.kind})")
    if json_out is not None:
        from compressor.rundir import write_json

        write_json(json_out, metrics)


# ---------------------------------------------------------------------------------------------- inspect
@app.command("inspect")
@handles_errors
def inspect_cmd(checkpoint: Annotated[Optional[str], typer.Argument(help="Checkpoint file or model reference (zoo:resnet20).")] = None,
                recipe: RecipeOpt = None, overrides: SetOpt = None, trust_checkpoint: TrustOpt = False,
                onnx_file: Annotated[Optional[Path], typer.Option("--onnx", help="Check an exported ONNX against the ops the TensorRT 10 parser supports.")] = None,
                json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the inspection as JSON.")] = None,
                layers: Annotated[bool, typer.Option("--layers/--no-layers", help="Show the per-layer table.")] = True) -> None:
    """Preflight: per-layer MACs/params, prunable dependency groups, ignored and unprunable layers; --onnx adds
    the TensorRT compatibility of an exported model (runs anywhere, no GPU needed)."""
    if checkpoint is None and onnx_file is None:
        raise UsageError("give a CHECKPOINT to inspect, --onnx FILE, or both.")
    _check_json_out(json_out)
    if onnx_file is not None and not onnx_file.is_file():
        raise UsageError(f"--onnx {onnx_file}: " + ("is a directory, not an ONNX file." if onnx_file.is_dir()
                                                    else "no such file."))
    result: dict = {}
    if checkpoint is not None:
        from compressor.app.inspection import inspect_checkpoint, render_inspection

        r = _load_recipe(recipe, overrides, required=False)
        report = inspect_checkpoint(checkpoint, r, trust_checkpoint=trust_checkpoint)
        render_inspection(report, out, show_layers=layers)
        result = report.to_dict()
    if onnx_file is not None:
        from compressor.app.inspection import render_compatibility
        from compressor.deploy.trt_compat import check_onnx

        compat = check_onnx(onnx_file)
        render_compatibility(compat, out)
        result["tensorrt_compatibility"] = compat.to_dict()
    if json_out is not None:
        from compressor.rundir import write_json

        write_json(json_out, result)


# ---------------------------------------------------------------------------------------------- compress
@app.command("compress")
@handles_errors
def compress_cmd(checkpoint: Annotated[str, typer.Argument(help="Checkpoint file or model reference (zoo:resnet20).")],
                 recipe: RecipeOpt = None, overrides: SetOpt = None,
                 out_dir: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<recipe name>).")] = None,
                 device: DeviceOpt = "cpu",
                 resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last complete epoch.")] = False,
                 overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in --out.")] = False,
                 latency_table: Annotated[Optional[Path], typer.Option("--latency-table", help="A `compressor latency-table` JSON of this model on the latency target's backend and batch: plan by importance per ms (sets prune.target.table).")] = None,
                 trust_checkpoint: TrustOpt = False) -> None:
    """Prune, fine-tune, slim, export, verify and benchmark a model as the recipe says."""
    from compressor.models.loading import check_device
    from compressor.app.pipeline import compress
    from compressor.progress import is_main_process
    from compressor.rundir import check_output_dir

    if latency_table is not None:
        if not latency_table.is_file():
            raise UsageError(f"--latency-table {latency_table}: no such file.",
                             hint="Measure one on the target device: `compressor latency-table model.onnx --out lut.json`.")
        overrides = [*(overrides or []), f"prune.target.table={latency_table}"]
    r = _load_recipe(recipe, overrides)
    check_device(device)
    if out_dir is not None:
        check_output_dir(out_dir, "--out")
    report = compress(checkpoint, r, out_dir, device=device, resume=resume, overwrite=overwrite,
                      trust_checkpoint=trust_checkpoint)
    if not is_main_process():
        return
    from compressor.app.metric_change import arrow_text

    d, c = report["dense"], report["compressed"]
    speed = ""
    if report.get("latency"):
        first = report["latency"][0]
        speed = (f", {first['backend']} decode tokens/s x{first['speedup']:.2f}, prefill "
                 f"x{first['prefill_speedup']:.2f}" if first.get("kind") == "language-model" else
                 f", {first['backend']} batch {first['batch_size']} latency speedup x{first['speedup']:.2f}")
    task = r.build_task()
    key = task.primary
    out.print(f"{r.name}: {arrow_text(task, d[key], c[key])}, MACs x{c['macs'] / d['macs']:.3f}, "
              f"params x{c['params'] / d['params']:.3f}{speed}; report: {report['run_dir']}/report.md")


# ---------------------------------------------------------------------------------------------- export
@app.command("export")
@handles_errors
def export_cmd(model: Annotated[str, typer.Argument(help="Checkpoint, slim model folder or slim.json.")],
               recipe: RecipeOpt = None, overrides: SetOpt = None,
               fmt: Annotated[str, typer.Option("--format", help="onnx or tensorrt.")] = "onnx",
               out_file: Annotated[Optional[Path], typer.Option("--out", help="Output file (default next to MODEL).")] = None,
               opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default from the recipe).")] = None,
               fp16: Annotated[Optional[bool], typer.Option("--fp16/--no-fp16", help="TensorRT: allow FP16 kernels (default from the recipe).")] = None,
               int8_calib: Annotated[Optional[int], typer.Option("--int8-calib", min=0, help="TensorRT: INT8 with an entropy calibrator over N training samples.")] = None,
               sparse: Annotated[Optional[bool], typer.Option("--sparse/--no-sparse", help="TensorRT: SPARSE_WEIGHTS for 2:4-sparse models.")] = None,
               batch: Annotated[Optional[str], typer.Option("--batch", help="TensorRT: batch sizes the optimisation profile covers, e.g. 1,8,32.")] = None,
               quantize: Annotated[Optional[str], typer.Option("--quantize", help="none|int8|fp16|auto (language models: int8|int4, weight-only): also write MODEL.int8.onnx / .fp16.onnx / .int4.onnx (needs --recipe; sets export.quantize.mode).")] = None,
               trust_checkpoint: TrustOpt = False) -> None:
    """Export to ONNX (verified against PyTorch on the recipe's validation samples) or a TensorRT engine."""
    from compressor.deploy.bench import parse_ints
    from compressor.app.exporting import export_model

    if quantize is not None:
        if recipe is None:
            raise UsageError("--quantize needs --recipe (calibration samples from its training data, accuracy on "
                             "its validation data).")
        overrides = [*(overrides or []), _quantize_override(quantize)]
    r = _load_recipe(recipe, overrides, required=False)
    if out_file is not None:
        from compressor.rundir import check_output_file

        check_output_file(out_file, "--out", "model.onnx" if fmt == "onnx" else "model.engine")
    trt_options = {"fp16": fp16, "int8_calib": int8_calib, "sparse": sparse,
                   "batch_sizes": parse_ints(batch, "--batch") if batch else None}
    result = export_model(model, r, fmt=fmt, out=out_file, opset=opset, trust_checkpoint=trust_checkpoint,
                          trt_options=trt_options)
    if result.get("kv_cache"):  # a language model (app/lm_deploy.py)
        from compressor.app.lm_deploy import summary_lines

        for line in summary_lines(result):
            out.print(line)
        return
    parity = result.get("parity", {})
    out.print(f"wrote {result['path']} ({result['bytes'] / 1024:.1f} KiB, opset {result['opset']}); parity max abs diff "
              f"{parity.get('max_abs_diff', float('nan')):.2e} on {parity.get('samples', 0)} samples "
              f"({parity.get('source', '')})")
    if parity.get("note"):
        out.print(f"note: {parity['note']}")
    if "quantized" in result:
        q, task = result["quantized"], r.build_task()  # quantizing needs a recipe
        agreement = q["parity"].get("top1_agreement")
        out.print(f"wrote {q['path']} ({q['mode']}, {q['bytes'] / 1024:.1f} KiB): {task.primary_label} "
                  f"{q[q.get('metric_key', task.primary)]:.2f}{task.primary_unit}, "
                  + ("" if agreement is None else f"top-1 agreement {agreement:.4f} with PyTorch, ")
                  + f"layers in float: {', '.join(q.get('float_layers') or []) or 'none'}")
    if "tensorrt" in result:
        engine = result["tensorrt"]
        out.print(f"wrote {engine['path']} ({engine['settings']['precision']}); parity max abs diff "
                  f"{engine['parity']['max_abs_diff']:.2e} (atol {engine['parity']['atol']})")


def _quantize_override(mode: str) -> str:
    """--quantize as a --set value (validated with the recipe like any other)."""
    if mode not in ("none", "int8", "int4", "fp16", "auto"):
        raise UsageError(f"--quantize {mode!r}: use none, int8, fp16 or auto (int4: language models).")
    return "export.quantize=auto" if mode == "auto" else f"export.quantize.mode={mode}"


# ---------------------------------------------------------------------------------------------- bench
@app.command("bench")
@handles_errors
def bench_cmd(model: Annotated[str, typer.Argument(help="model.onnx (ort-*), .engine/.plan (tensorrt), .pt/.safetensors/slim folder (torch).")],
              baseline: Annotated[Optional[str], typer.Option("--baseline", help="Dense model timed interleaved with MODEL, for the speedup.")] = None,
              backend: Annotated[Optional[list[str]], typer.Option("--backend", help="ort-cpu|ort-cuda|ort-trt|tensorrt|torch; repeatable or a,b (default: from MODEL's suffix).")] = None,
              batch: Annotated[Optional[str], typer.Option("--batch", help="Batch sizes, comma separated (default 1,8; a language model: 1).")] = None,
              warmup_ms: Annotated[float, typer.Option("--warmup-ms", min=0, help="Warm-up time per model and batch size.")] = 500.0,
              min_runs: Annotated[int, typer.Option("--min-runs", min=1, help="Timed runs at least.")] = 50,
              min_seconds: Annotated[float, typer.Option("--min-seconds", min=0, help="Timed seconds at least (per model).")] = 2.0,
              threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Intra-op CPU threads (default: the runtime's).")] = None,
              input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="One sample's shape, e.g. 3,224,224 (torch; ONNX with dynamic sizes).")] = None,
              images: Annotated[Optional[Path], typer.Option("--images", help="Time on a folder's images (resized to the input, [0, 1]) instead of random inputs: a detector's NMS cost depends on what it sees.")] = None,
              trust_checkpoint: TrustOpt = False,
              fp16: Annotated[bool, typer.Option("--fp16", help="ort-trt: allow FP16 kernels in the TensorRT provider.")] = False,
              trt_cache: Annotated[Optional[Path], typer.Option("--trt-cache", help="ort-trt: engine cache folder.")] = None,
              prompt_tokens: Annotated[Optional[int], typer.Option("--prompt-tokens", min=1, help="Language models (ONNX with a key/value cache): the prompt's length for the prefill (default 128).")] = None,
              new_tokens: Annotated[Optional[int], typer.Option("--new-tokens", min=1, help="Language models: tokens decoded with the cache after the prompt (default 32).")] = None,
              json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report (raw timings, environment) as JSON.")] = None) -> None:
    """Latency percentiles and throughput per backend and batch size; with --baseline, an interleaved A/B speedup.
    A language model exported with its key/value cache: prefill ms and decode tokens/s (batch 1)."""
    from compressor.deploy.bench import default_backend, is_language_model_file, parse_ints, render_report, run_benchmark

    _check_json_out(json_out)
    backends = [name.strip() for item in backend or [default_backend(model)] for name in item.split(",") if name.strip()]
    if is_language_model_file(model):
        _bench_language_model(model, baseline, backends, batch, warmup_ms=warmup_ms, min_runs=min_runs,
                              min_seconds=min_seconds, threads=threads, prompt_tokens=prompt_tokens,
                              new_tokens=new_tokens, json_out=json_out)
        return
    if prompt_tokens is not None or new_tokens is not None:
        raise UsageError(f"--prompt-tokens / --new-tokens time a language model exported with its key/value cache; "
                         f"{model} is not one.", hint="Leave them out for this model.")
    report = run_benchmark(model, baseline=baseline, backends=backends, batch_sizes=parse_ints("1,8" if batch is None else batch, "--batch"),
                           warmup_ms=warmup_ms, min_runs=min_runs, min_seconds=min_seconds, threads=threads,
                           input_shape=parse_ints(input_shape, "--input-shape") if input_shape else None,
                           trust_checkpoint=trust_checkpoint, fp16=fp16, cache_dir=trt_cache, images=images)
    render_report(report, out)
    if json_out is not None:
        from compressor.rundir import write_json

        write_json(json_out, report)


def _bench_language_model(model: str, baseline: Optional[str], backends: list[str], batch: Optional[str], *,
                          warmup_ms: float, min_runs: int, min_seconds: float, threads: Optional[int],
                          prompt_tokens: Optional[int], new_tokens: Optional[int], json_out: Optional[Path]) -> None:
    """`compressor bench` of an ONNX causal LM with its key/value cache (deploy/lm_bench.py, torch-free): prefill
    ms and decode tokens/s, the baseline timed in turn with it, on each ONNX Runtime backend."""
    from compressor.deploy.bench import parse_ints, render_lm_report
    from compressor.deploy.config import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT_TOKENS
    from compressor.deploy.lm_bench import bench_lms

    if batch is not None and parse_ints(batch, "--batch") != [1]:
        raise UsageError(f"--batch {batch}: {model} is a language model with a key/value cache, timed on one sequence "
                         "(batch 1).", hint="Leave --batch out (or give --batch 1).")
    others = [b for b in backends if not b.startswith("ort-")]
    if others:
        raise UsageError(f"--backend {others[0]}: {model} is a language model with a key/value cache, timed on ONNX "
                         "Runtime.", hint="Use --backend ort-cpu (or ort-cuda).")
    reports = []
    for name in backends:
        report = bench_lms([*([baseline] if baseline else []), model], backend=name,
                           prompt_tokens=prompt_tokens or DEFAULT_PROMPT_TOKENS,
                           new_tokens=new_tokens or DEFAULT_NEW_TOKENS, threads=threads, warmup_ms=warmup_ms,
                           min_runs=min_runs, min_seconds=min_seconds)
        render_lm_report(report, out)
        reports.append(report)
    if json_out is not None:
        from compressor.rundir import write_json

        write_json(json_out, reports[0] if len(reports) == 1 else {"backends": reports})


@app.command("profile")
@handles_errors
def profile_cmd(model: Annotated[Path, typer.Argument(help="model.onnx to profile on ONNX Runtime CPU.")],
                baseline: Annotated[Optional[Path], typer.Option("--baseline", help="Dense model.onnx: compare operator times and layouts.")] = None,
                batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size.")] = 1,
                runs: Annotated[int, typer.Option("--runs", min=1, help="Profiled runs (after 5 warm-up runs).")] = 30,
                threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Intra-op CPU threads (default: the runtime's).")] = None,
                input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="One sample's shape for ONNX inputs with dynamic sizes, e.g. 3,224,224.")] = None,
                top: Annotated[int, typer.Option("--top", min=1, help="How many of the slowest nodes to list.")] = 10,
                json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write every node's time as JSON.")] = None) -> None:
    """Per-node kernel times from onnxruntime's profiler: where the time goes, and why a pruned model is not faster."""
    from compressor.deploy.bench import parse_ints
    from compressor.deploy.ort_profile import profile_pair, render_profile

    _check_json_out(json_out)
    result = profile_pair(model, baseline, batch, runs=runs, threads=threads,
                          input_shape=parse_ints(input_shape, "--input-shape") if input_shape else None)
    render_profile(result, out, top)
    if json_out is not None:
        from compressor.rundir import write_json

        write_json(json_out, result)


@app.command("latency-table")
@handles_errors
def latency_table_cmd(model: Annotated[Path, typer.Argument(help="model.onnx (the dense export) to measure layer by layer.")],
                      out_path: Annotated[Path, typer.Option("--out", help="Where to write the table (JSON).")] = Path("lut.json"),
                      backend: Annotated[str, typer.Option("--backend", help="ort-cpu|ort-cuda|ort-trt: the runtime of the target device.")] = "ort-cpu",
                      batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma separated.")] = "1,8",
                      step: Annotated[Optional[int], typer.Option("--step", min=1, help="Kept widths measured: every multiple of this, and the full width (default: ORT-CPU's channel block on this CPU, 16 with AVX-512, else 8; 8 on GPU backends).")] = None,
                      max_widths: Annotated[int, typer.Option("--max-widths", min=2, help="At most this many widths per layer (a wide layer is sampled at a coarser multiple of --step).")] = 16,
                      threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Intra-op CPU threads (default: the runtime's).")] = None,
                      warmup_ms: Annotated[float, typer.Option("--warmup-ms", min=0, help="Warm-up time per probe and batch size.")] = 100.0,
                      min_runs: Annotated[int, typer.Option("--min-runs", min=1, help="Timed runs per width at least.")] = 20) -> None:
    """Latency of every prunable layer at the widths pruning can give it, measured in the target runtime (no torch
    needed: probe graphs are built with onnx from MODEL). The table names the model file, runtime, batch sizes,
    versions and CPU it was measured for."""
    from compressor.deploy.bench import parse_ints
    from compressor.deploy.latency_table import measure_table, write_table
    from compressor.rundir import check_output_file

    check_output_file(out_path, "--out", "lut.json")

    def progress(done: int, total: int, name: str) -> None:
        out.print(f"[{done}/{total}] {name}")

    table = measure_table(model, backend, parse_ints(batch, "--batch"), step=step, max_widths=max_widths, threads=threads,
                          warmup_ms=warmup_ms, min_runs=min_runs, progress=progress)
    write_table(table, out_path)
    out.print(f"{len(table['layers'])} layers, batch {batch}, {backend}: {out_path}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        sys.exit(code)
