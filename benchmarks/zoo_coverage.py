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

from pathlib import Path

from common import (RESULTS, bench_overrides, cell, coverage_parser, coverage_row, input_size, params_cell,
                    parity_cell, print_row, run_isolated, sweep, table, write_result, zoo_overrides)

STORE = RESULTS / "zoo_coverage.json"
HEADER = ["model", "input", "groups", "MACs dense", "MACs kept", "params dense → slim", "parity max diff (relative)",
          "speedup b1", "realised ratio b1", "status", "seconds"]


def gflops(name: str) -> float:
    import torchvision

    return float(torchvision.models.get_model_weights(name).DEFAULT.meta.get("_ops", 0.0))


def one(name: str, macs: float, out: Path, bench: bool = True, keep: bool = False) -> dict:
    """Run the whole pipeline on one model (in this process) and return its row fields."""
    size = input_size(name)
    overrides = zoo_overrides(name, size, macs) + (bench_overrides(threads=2, seconds=2.0) if bench
                                                   else ["bench.backends=[]"])
    return coverage_row(name, "torchvision", size, overrides, out, keep, threads=2)


def fmt(row: dict) -> list:
    return [row["model"], cell(row, "input"), cell(row, "groups"), cell(row, "macs_dense", lambda v: f"{v / 1e9:.2f} G"),
            cell(row, "macs_kept", lambda v: f"{v:.3f}"), params_cell(row), parity_cell(row),
            cell(row, "speedup", lambda v: f"x{v:.2f}"), cell(row, "realised", lambda v: f"{v:.2f}"),
            row["status"].replace("|", "/"), cell(row, "seconds")]


def main() -> None:
    args = coverage_parser(__doc__, Path("runs/zoo"), timeout=900).parse_args()
    if args.one:
        print_row(one(args.one, args.macs, args.out, args.bench, args.keep))
        return
    import torchvision

    models = args.models or sorted(torchvision.models.list_models(module=torchvision.models), key=gflops)
    sweep(models, STORE, lambda name: run_isolated(__file__, name, args), lambda rows: write_table(rows, args.macs),
          rerun=args.rerun, show=fmt)


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
