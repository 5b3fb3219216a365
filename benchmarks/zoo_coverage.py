"""What `compressor compress` handles across the torchvision classification zoo, and how much of the MAC cut
becomes ONNX Runtime CPU latency.

    python benchmarks/zoo_coverage.py [--models NAME ...] [--macs 0.7] [--timeout 900] [--rerun] [--keep-artifacts]

For every model of torchvision.models.list_models(module=torchvision.models): inspect (dependency groups), prune
to the MAC target with no fine-tuning on synthetic data at the input size the model expects (the DEFAULT weights'
crop size; a ViT's own image_size), slim, export to ONNX, check parity against PyTorch, and time dense vs slim at
batch 1 (ORT-CPU, 2 threads, interleaved). Every model runs in its own process with a time limit, so a crash or
an out-of-memory kill is a row, not the end of the sweep. Rows are kept in results/zoo_coverage.json (re-run a
model with --models NAME --rerun); the table is results/zoo_coverage.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, informative_init, input_size, parity_cell, parity_fields, table, write_result, zoo_overrides

STORE = RESULTS / "zoo_coverage.json"
HEADER = ["model", "input", "groups", "MACs dense", "MACs kept", "params dense → slim", "parity max diff (relative)",
          "speedup b1", "realised ratio b1", "status", "seconds"]


def gflops(name: str) -> float:
    import torchvision

    return float(torchvision.models.get_model_weights(name).DEFAULT.meta.get("_ops", 0.0))


def one(name: str, macs: float, out: Path, bench: bool = True, keep: bool = False) -> dict:
    """Run the whole pipeline on one model (in this process) and return its row fields."""
    import torch

    from compressor.errors import CompressorError
    from compressor.inspection import inspect_checkpoint
    from compressor.pipeline import compress
    from compressor.recipe import load_recipe

    torch.set_num_threads(2)
    size = input_size(name)
    overrides = zoo_overrides(name, size, macs) + ["bench.batch_sizes=[1]", "bench.min_runs=10", "bench.min_seconds=2",
                                                   "bench.warmup_ms=500", "bench.threads=2"]
    overrides += [] if bench else ["bench.backends=[]"]
    row = {"model": name, "input": size}
    start = time.perf_counter()
    checkpoint, row["redrawn"] = informative_init(name, out / f"{name}.init.pt")
    try:
        recipe = load_recipe("resnet50-imagenet-latency", overrides)
        row["groups"] = len(inspect_checkpoint(checkpoint, recipe).groups)
        report = compress(checkpoint, recipe, out / name, overwrite=True)
        row.update(macs_dense=report["dense"]["macs"], macs_kept=report["compressed"]["macs"] / report["dense"]["macs"],
                   params_dense=report["dense"]["params"], params_slim=report["compressed"]["params"],
                   **parity_fields(report), status="ok")
        if not report["target"]["met"]:
            row["status"] = "ok, target not met"
        for timing in report["latency"]:
            row.update(speedup=timing["speedup"], realised=timing["realised_ratio"])
    except CompressorError as exc:
        row["status"] = f"{type(exc).__name__}: {exc.render().splitlines()[0]}"
    except Exception as exc:  # a bug in compressor: recorded, then fixed or turned into a clear error
        row["status"] = f"CRASH {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    finally:
        Path(out / f"{name}.init.pt").unlink(missing_ok=True)
        if not keep:  # 80 models' ONNX files and weights filled 60 GB: keep the reports only
            for pattern in ("*.onnx", "*.onnx.data", "*.pt", "*.safetensors"):
                for artifact in (out / name).glob(pattern):
                    artifact.unlink()
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def run_isolated(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--macs", str(args.macs), "--out", str(args.out)]
    cmd += ([] if args.bench else ["--no-bench"]) + (["--keep-artifacts"] if args.keep else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": f"timeout after {args.timeout} s", "seconds": args.timeout}
    lines = [l for l in done.stdout.splitlines() if l.startswith("ROW ")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "status": f"process died (exit {done.returncode}): {tail}"[:300]}
    return json.loads(lines[-1][4:])


def fmt(row: dict) -> list:
    def get(key, form):
        return form(row[key]) if key in row else "-"
    return [row["model"], get("input", str), get("groups", str), get("macs_dense", lambda v: f"{v / 1e9:.2f} G"),
            get("macs_kept", lambda v: f"{v:.3f}"),
            f"{row['params_dense'] / 1e6:.1f} M → {row['params_slim'] / 1e6:.1f} M" if "params_slim" in row else "-",
            parity_cell(row), get("speedup", lambda v: f"x{v:.2f}"),
            get("realised", lambda v: f"{v:.2f}"), row["status"].replace("|", "/"), get("seconds", str)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--macs", type=float, default=0.7)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--no-bench", dest="bench", action="store_false", help="skip latency (a busy machine)")
    parser.add_argument("--keep-artifacts", dest="keep", action="store_true",
                        help="keep each run's ONNX files and weights (default: only report.json / report.md)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("runs/zoo"))
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one, args.macs, args.out, args.bench, args.keep)), flush=True)
        return
    import torchvision

    models = args.models or sorted(torchvision.models.list_models(module=torchvision.models), key=gflops)
    rows = json.loads(STORE.read_text()) if STORE.is_file() else {}
    for name in models:
        if name in rows and not args.rerun:
            continue
        rows[name] = run_isolated(name, args)
        print(fmt(rows[name]), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        STORE.write_text(json.dumps(rows, indent=1))
        write_table(rows, args.macs)  # after every row: a sweep stopped part-way still leaves its table
    write_table(rows, args.macs)


def write_table(rows: dict, macs: float) -> None:
    done = [rows[k] for k in sorted(rows)]
    ok = sum(r["status"].startswith("ok") for r in done)
    text = (f"# torchvision classification zoo through `compressor compress` (macs {macs}, no fine-tuning)\n\n"
            f"`python benchmarks/zoo_coverage.py`: {ok} of {len(done)} models end to end with parity "
            f"({ok / max(len(done), 1):.0%}). Synthetic data, recipe resnet50-imagenet-latency (uniform per-layer "
            "ranking, round_to 16), ORT-CPU 2 threads, batch 1, dense and slim interleaved; realised ratio = "
            "speedup / MAC reduction (\"-\" where the row was run with --no-bench on a busy machine). Models run "
            "from the cheapest (GFLOPs of torchvision's weights metadata) up. Parity: max abs diff on 4 samples, with "
            "diff / max |output| in brackets for rows run since it is recorded (untrained EfficientNets and MobileNets "
            "put out 1e-9 to 1e-14); layers torchvision initialises to zero (ViT heads) are redrawn so outputs differ "
            "per sample. Only report.json / report.md of each run are kept (--keep-artifacts keeps the rest).\n\n"
            + table(HEADER, [fmt(r) for r in done]))
    write_result("zoo_coverage.md", text)


if __name__ == "__main__":
    main()
