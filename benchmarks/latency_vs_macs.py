"""The Fashion-MNIST sample at the quickstart budget, 3 seeds: the MAC-targeted quickstart model against a
latency-targeted one asked for the speedup the MAC-targeted model measured (issue 16's accuracy must-show).

    python benchmarks/latency_vs_macs.py --phase mac        # the quickstart recipe, seeds 0 1 2
    python benchmarks/latency_vs_macs.py --phase latency    # prune.target: {latency_speedup: S(seed)} per seed
    python benchmarks/latency_vs_macs.py --phase table      # rewrite the markdown from the finished runs

Phase `mac` runs the quickstart recipe (DPM around DepGraph, macs 0.5, round_to auto, 3 epochs) with
finetune.seed = 0, 1, 2 and records its top-1 and the ORT-CPU speedups its bench measured. Phase `latency` times
each MAC-targeted model against its dense export again (interleaved, 5 s, on a quiet machine), runs the same
recipe with `prune.target: {latency_speedup: S, batch: 1}`, S that speedup, planned from a latency table
(measured once on the dense export at the start of the phase) unless `--no-table`, and times the result head to
head against the MAC-targeted model. Equal or better top-1 at the same measured speedup is the goal.
The bench runs ORT-CPU only (no torch rows), so a run costs less than the quickstart. One JSON per finished run in
benchmarks/results/latency_vs_macs/<CPU class>/ (a later session on the same CPU class resumes; another CPU class
gets its own rows, since the speedups and so the latency-targeted plans depend on the CPU); the markdown, one
section per CPU class, is rewritten after every run.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import RESULTS, cached_compress, cpu_folder, cpu_label, latency, onnx_speed, table, write_result

CHECKPOINT = "samples/resnet20-fmnist.safetensors"
RECIPE = "recipes/resnet20-fmnist-dpm.yaml"
ROOT = RESULTS / "latency_vs_macs"  # one subfolder per CPU class (common.cpu_folder)
BATCH = 1
# the accuracy gate off: a run that loses more than the quickstart's 2 pp is a result here, not a failure
COMMON = ["bench.backends=[ort-cpu]", "bench.batch_sizes=[1, 8]", "bench.min_seconds=3", "gates.max_accuracy_drop=null"]


def row(kind: str, seed: int, report: dict, extra: dict) -> dict:
    b1, b8 = latency(report, "ort-cpu", 1), latency(report, "ort-cpu", 8)
    return {"kind": kind, "seed": seed, "top1": report["compressed"]["top1"], "dense_top1": report["dense"]["top1"],
            "macs": report["compressed"]["macs"] / report["dense"]["macs"], "speedup_b1": b1["speedup"],
            "speedup_b8": b8["speedup"], "widths": report["compressed"]["widths"], "cpu": cpu_label(),
            "wall_s": report.get("wall_s"), **extra}


def run_mac(seed: int, out: Path) -> dict:
    report = cached_compress(CHECKPOINT, RECIPE, out / f"mac-s{seed}", COMMON + [f"finetune.seed={seed}"])
    return row("mac", seed, report, {})


def dense_table(out: Path) -> Path:
    """A latency table of the dense sample export (ORT-CPU, batch 1 and 8), measured once per phase."""
    from compressor.app.exporting import export_model
    from compressor.app.recipe import load_recipe
    from compressor.deploy.latency_table import measure_table, write_table

    lut = out / "lut.json"
    if not lut.is_file():
        dense = out / "dense.onnx"
        out.mkdir(parents=True, exist_ok=True)
        export_model(CHECKPOINT, load_recipe(RECIPE), out=dense)
        write_table(measure_table(dense, "ort-cpu", (1, 8)), lut)
    return lut


def run_latency(seed: int, out: Path, lut: Path | None) -> dict:
    """The latency-targeted run of `seed`, asked for the speedup the MAC-targeted model measures now (its dense and
    pruned exports timed interleaved, on a quiet machine: the MAC runs' own bench may have shared the cores),
    then timed head to head against that model."""
    mac = out / f"mac-s{seed}"
    ref = {b: onnx_speed(mac / "dense.onnx", mac / "model.onnx", b, seconds=5.0) for b in (1, 8)}
    asked = ref[BATCH]["speedup"]
    overrides = COMMON + [f"finetune.seed={seed}", "prune.target={latency_speedup: %.4f, batch: %d%s}"
                          % (asked, BATCH, f", table: {lut}" if lut else "")]
    run = out / f"latency-s{seed}{'-lut' if lut else ''}"
    report = cached_compress(CHECKPOINT, RECIPE, run, overrides)
    head = {b: onnx_speed(mac / "model.onnx", run / "model.onnx", b, seconds=5.0) for b in (1, 8)}
    t = report["target"]["latency"]
    return row("latency+table" if lut else "latency", seed, report,
               {"asked": asked, "loop_speedup": t["measured_speedup"], "tries": len(t["tries"]),
                "mac_model_speedup": {str(b): ref[b]["speedup"] for b in ref},
                "vs_mac_model": {str(b): head[b]["speedup"] for b in head}})


def render(rows: list[dict]) -> str:
    text = ("# Latency target vs MAC target: Fashion-MNIST sample at the quickstart budget\n\n"
            "`python benchmarks/latency_vs_macs.py`, one section per CPU class. The latency-targeted run of a seed "
            "asks for the ORT-CPU batch-1 speedup the MAC-targeted model of that seed measures (its dense and pruned "
            "exports timed again, interleaved, before the run; shown in parentheses); speedups in the b1 / b8 "
            "columns are the run's own bench; the last column times the latency-targeted model head to head "
            "against the MAC-targeted one (> 1: faster). `latency+table`: planned from a latency table of the "
            "dense export; `latency`: the closed loop with the MAC ranking alone (`--no-table`).\n")
    for cpu in sorted({r["cpu"] for r in rows}):
        text += f"\n## {cpu}\n\n" + _section([r for r in rows if r["cpu"] == cpu])
    return text


def _section(rows: list[dict]) -> str:
    by_seed = {r["seed"]: r for r in rows if r["kind"] == "mac"}
    lines = ["| run | seed | top-1 | Δ vs MAC run (pp) | MACs kept | ORT-CPU b1 (asked) | ORT-CPU b8 | "
             "vs the MAC model b1 / b8 |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kind"] != "mac", r["kind"], r["seed"])):
        ref = by_seed.get(r["seed"])
        delta = f"{r['top1'] - ref['top1']:+.2f}" if ref and r["kind"] != "mac" else ""
        asked = f" ({r['asked']:.2f})" if "asked" in r else ""
        versus = " / ".join(f"x{r['vs_mac_model'][b]:.2f}" for b in ("1", "8")) if "vs_mac_model" in r else ""
        lines.append(f"| {r['kind']} | {r['seed']} | {r['top1']:.2f} | {delta} | {r['macs']:.3f} | "
                     f"x{r['speedup_b1']:.2f}{asked} | x{r['speedup_b8']:.2f} | {versus} |")
    summary = []
    for kind in sorted({r["kind"] for r in rows}):
        top = [r["top1"] for r in rows if r["kind"] == kind]
        summary.append([kind, len(top), f"{statistics.mean(top):.2f}" + (f" ± {statistics.stdev(top):.2f}" if len(top) > 1 else ""),
                        f"x{statistics.median(r['speedup_b1'] for r in rows if r['kind'] == kind):.2f}"])
    return "\n".join(lines) + "\n\n" + table(["run", "seeds", "top-1", "median b1 speedup"], summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["mac", "latency", "table"], default="mac")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-table", action="store_true", help="latency phase: the closed loop alone, no table")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/latency_vs_macs"))
    args = parser.parse_args()
    store = ROOT / cpu_folder(cpu_label())
    store.mkdir(parents=True, exist_ok=True)
    lut = None if args.no_table or args.phase != "latency" else dense_table(args.out)
    for seed in args.seeds if args.phase != "table" else []:
        if args.phase == "mac":
            result, name = run_mac(seed, args.out), f"mac-s{seed}.json"
        else:
            result = run_latency(seed, args.out, lut)
            name = f"latency-s{seed}{'-lut' if lut else ''}.json"
        (store / name).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "widths"}), flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(ROOT.glob("*/*.json"))]
    if rows:
        write_result("latency_vs_macs.md", render(rows))


if __name__ == "__main__":
    main()
