"""Prune to a measured latency: torchvision models at their own input size, pruned to a latency speedup on ONNX
Runtime CPU without fine-tuning (synthetic data), side by side with the MAC target 1/S that a user would
otherwise have asked for.

    python benchmarks/latency_target.py [--models resnet18 ...] [--speedups 1.5 2 3] [--batches 1 8] [--list]
                                        [--planner macs|table]

Each cell (model, asked speedup S, batch) is one `compress` with `prune.target: {latency_speedup: S, batch: B}`:
its measure-prune loop (prune/latency_target.py) starts at the MAC target 1/S (magnitude plan, the same planner),
so the loop's first try is the MAC-targeted model, measured in the same process; the final row is the speedup the
bench measured on the compressed model (dense and pruned interleaved). A cell counts as met when that final
speedup is within 5% of S. One JSON per finished cell in benchmarks/results/latency_target/ (a later run resumes);
benchmarks/results/latency_target.md is rewritten from them after every cell. Cells are kept per CPU class
(a subfolder named after common.cpu_label, the table one section per CPU), so a run on another machine adds its own
rows instead of resuming the other machine's. ViT-B/16 prunes its attention heads too
(`prune.attention.heads: true`): with heads locked its MLPs alone cannot reach x3. With `--planner table` each
model's dense export gets a latency table first (`compressor latency-table` at the cell's batch, kept in --out) and
the cells plan from it (results in latency_target_table/ and latency_target_table.md); their MAC-target columns
come from the same cell of the MAC planner's run, where it exists.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, cpu_folder, cpu_label, informative_init, input_size, table, write_result, zoo_overrides

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16"]
ROOT = RESULTS / "latency_target"  # one subfolder per CPU class (cpu_folder)
STORE = ROOT


def tag(model: str, speedup: float, batch: int) -> str:
    return f"{model}-x{speedup:g}-b{batch}"


def dense_table(model: str, checkpoint: str, batch: int, args: argparse.Namespace) -> Path:
    """The latency table of the model's dense export at `batch` (measured once per model and batch, kept in --out)."""
    from compressor.app.exporting import export_model
    from compressor.app.recipe import load_recipe
    from compressor.deploy.latency_table import measure_table, write_table

    lut = args.out / f"{model}-b{batch}.lut.json"
    if not lut.is_file():
        dense = args.out / f"{model}.dense.onnx"
        if not dense.is_file():
            export_model(checkpoint, load_recipe("resnet50-imagenet-latency", zoo_overrides(model, input_size(model), 0.5)),
                         out=dense)
        write_table(measure_table(dense, "ort-cpu", (batch,), threads=args.threads), lut)
    return lut


def run_cell(model: str, speedup: float, batch: int, args: argparse.Namespace) -> dict:
    from compressor.app.pipeline import compress
    from compressor.app.recipe import load_recipe

    checkpoint, _ = informative_init(model, args.out / f"{model}.init.pt")
    table = f", table: {dense_table(model, checkpoint, batch, args)}" if args.planner == "table" else ""
    heads = ["prune.attention.heads=true"] if model.startswith("vit") else []
    overrides = zoo_overrides(model, input_size(model), 0.5) + heads + [
        f"prune.target={{latency_speedup: {speedup}, batch: {batch}{table}}}", f"bench.batch_sizes=[{batch}]",
        "bench.backends=[ort-cpu]", f"bench.threads={args.threads}", "bench.min_runs=20", "bench.min_seconds=3",
        "bench.warmup_ms=500", "export.onnx.simplify=false"]
    start = time.perf_counter()
    report = compress(checkpoint, load_recipe("resnet50-imagenet-latency", overrides), args.out / tag(model, speedup, batch),
                      overwrite=True)
    t = report["target"]["latency"]
    first = t["tries"][0]
    if args.planner == "table":  # the table's first try is a latency budget, not the MAC target 1/S
        twin = RESULTS / "latency_target" / cpu_folder(cpu_label()) / f"{tag(model, speedup, batch)}.json"
        first = json.loads(twin.read_text())["tries"][0] if twin.is_file() else None
    return {"model": model, "asked": speedup, "batch": batch, "tries": t["tries"], "planned_macs": t["macs"],
            "loop_speedup": t["measured_speedup"], "final_speedup": t["final_speedup"], "final_met": t["final_met"],
            "macs_kept": report["compressed"]["macs"] / report["dense"]["macs"],
            "mac_target": first and {"macs": first["macs"], "speedup": first["speedup"],
                                     "realised_ratio": first["speedup"] * first["macs"]},
            "dense_ms": report["latency"][0]["dense"]["p50"], "pruned_ms": report["latency"][0]["compressed"]["p50"],
            "loop_seconds": report["timings_s"].get("latency_target"), "wall_s": time.perf_counter() - start,
            "cpu": cpu_label(), "threads": args.threads, "planner": args.planner, "heads": bool(heads),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def _mac_cells(m: dict | None) -> list[str]:
    return ["", ""] if not m else [f"{m['macs']:.3f}", f"x{m['speedup']:.2f} ({m['realised_ratio']:.2f})"]


def _cells(rows: list[dict]) -> list[list]:
    return [[r["model"], r["batch"], f"x{r['asked']:g}", *_mac_cells(r.get("mac_target")),
             f"{r['macs_kept']:.3f}", len(r["tries"]), f"x{r['loop_speedup']:.2f}",
             f"x{r['final_speedup']:.2f}", "yes" if r["final_met"] else "**no**",
             f"{r['dense_ms']:.2f} / {r['pruned_ms']:.2f}", f"{r['loop_seconds']:.0f}"] for r in rows]


def render(planner: str = "macs") -> str:
    rows = [json.loads(p.read_text()) for p in sorted(ROOT.glob("*/*.json"))]
    rows.sort(key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99, r["batch"], r["asked"]))
    text = ("# Latency targets on ONNX Runtime CPU\n\n`python benchmarks/latency_target.py`: torchvision models at "
            "their own input size, no fine-tuning (synthetic data), `prune.target: {latency_speedup: S, batch: B}` on "
            f"ort-cpu with 2 threads{', planned from each model`s latency table (--planner table)' if planner == 'table' else ''}"
            ". MAC target 1/S: the loop's first try (the plan a `macs: 1/S` recipe gets), its measured speedup and "
            "realised ratio (speedup x MACs kept). Latency target: the MAC fraction the loop settled on, its tries, "
            "the speedup it measured, and the speedup the final bench measured on the compressed model (dense and "
            "pruned interleaved, p50). One section per CPU class.\n")
    header = ["model", "batch", "asked", "MAC target 1/S: MACs", "its speedup (realised)", "latency target: MACs",
              "tries", "loop speedup", "final speedup", "within 5%", "dense / pruned ms", "loop s"]
    for cpu in sorted({r["cpu"] for r in rows}):
        own = [r for r in rows if r["cpu"] == cpu]
        met = sum(1 for r in own if r["final_met"])
        loop = sum(1 for r in own if abs(r["loop_speedup"] / r["asked"] - 1) <= 0.05)
        text += (f"\n## {cpu}\n\nFinal bench within 5% of the asked speedup in **{met} of {len(own)}** cells (the "
                 f"loop's own measurement in {loop}); finished {min(r['finished'] for r in own)[:10]} to "
                 f"{max(r['finished'] for r in own)[:10]}.\n\n" + table(header, _cells(own)))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--planner", choices=["macs", "table"], default="macs",
                        help="table: each model's latency table (measured here first) plans by importance per ms")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-latency-target"))
    args = parser.parse_args()
    global ROOT, STORE
    if args.planner == "table":
        ROOT = RESULTS / "latency_target_table"
    STORE = ROOT / cpu_folder(cpu_label())
    STORE.mkdir(parents=True, exist_ok=True)
    name = "latency_target.md" if args.planner == "macs" else "latency_target_table.md"
    for model in args.models:
        for batch in args.batches:
            for speedup in args.speedups:
                path = STORE / f"{tag(model, speedup, batch)}.json"
                if args.list:
                    print(("done " if path.exists() else "todo ") + path.stem)
                    continue
                if path.exists():
                    continue
                row = run_cell(model, speedup, batch, args)
                path.write_text(json.dumps(row, indent=1) + "\n")
                print(f"{path.stem}: MACs {row['macs_kept']:.3f}, loop x{row['loop_speedup']:.2f}, final "
                      f"x{row['final_speedup']:.2f} ({'met' if row['final_met'] else 'missed'})", flush=True)
                write_result(name, render(args.planner), echo=False)
    if not args.list:
        write_result(name, render(args.planner))


if __name__ == "__main__":
    main()
