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
from rich.console import Console
from rich.table import Table

from .errors import CompressorError, UsageError

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


def handles_errors(fn: Callable) -> Callable:
    """Turn CompressorError into one message on stderr and its exit code (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompressorError as exc:
            if STATE["debug"]:
                raise
            err.print(f"[bold red]{exc.title}:[/] {exc.render()}", markup=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False) -> None:
    STATE["debug"] = debug


def _load_recipe(recipe: Optional[str], overrides: Optional[list[str]], *, required: bool = True):
    from .recipe import load_recipe

    if recipe is None:
        if required:
            raise UsageError("this command needs --recipe FILE (or the name of a shipped recipe).")
        return None
    return load_recipe(recipe, overrides or [])


# ---------------------------------------------------------------------------------------------- recipes
@recipes_app.command("list")
@handles_errors
def recipes_list() -> None:
    """The recipes shipped in recipes/."""
    from .recipe import load_recipe, shipped_recipes

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
    from .recipe import dump_recipe

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
    from .recipe import recipe_schema

    out.print(json.dumps(recipe_schema(), indent=2), markup=False)


# ---------------------------------------------------------------------------------------------- eval
@app.command("eval")
@handles_errors
def eval_cmd(model: Annotated[str, typer.Argument(help="Checkpoint (.pt/.safetensors), slim model folder, or model.onnx.")],
             recipe: RecipeOpt = None, overrides: SetOpt = None, trust_checkpoint: TrustOpt = False,
             device: DeviceOpt = "cpu",
             json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics as JSON.")] = None) -> None:
    """Top-1, top-5 and loss of a model on the recipe's validation data."""
    from .evaluation import evaluate_artifact

    r = _load_recipe(recipe, overrides)
    metrics = evaluate_artifact(model, r, trust_checkpoint=trust_checkpoint, device=device)
    out.print(f"{model}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
              f"({metrics['count']} samples of {r.data.kind})")
    if json_out is not None:
        from .rundir import write_json

        write_json(json_out, metrics)


# ---------------------------------------------------------------------------------------------- inspect
@app.command("inspect")
@handles_errors
def inspect_cmd(checkpoint: Annotated[str, typer.Argument(help="Checkpoint file or model reference (zoo:resnet20).")],
                recipe: RecipeOpt = None, overrides: SetOpt = None, trust_checkpoint: TrustOpt = False,
                json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the inspection as JSON.")] = None,
                layers: Annotated[bool, typer.Option("--layers/--no-layers", help="Show the per-layer table.")] = True) -> None:
    """Preflight: per-layer MACs/params, prunable dependency groups, ignored and unprunable layers."""
    from .inspection import inspect_checkpoint, render_inspection

    r = _load_recipe(recipe, overrides, required=False)
    report = inspect_checkpoint(checkpoint, r, trust_checkpoint=trust_checkpoint)
    render_inspection(report, out, show_layers=layers)
    if json_out is not None:
        from .rundir import write_json

        write_json(json_out, report.to_dict())


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        sys.exit(code)
