"""Dense vs host single-step (oneshot) vs host iterative vs DPM at macs 0.5 on the sample ResNet-20 / Fashion-MNIST.

    python benchmarks/host_baselines.py [--epochs 3] [--out runs/bench-hosts]

Full 10k test set, the same fine-tune epochs for every method (DPM: the quickstart recipe, DPM-SP+SR around
the same DepGraph host); ORT-CPU latency of dense and compressed measured
interleaved (batch 1 and 8) with the realised ratio (latency speedup / MAC reduction).
Writes benchmarks/results/host_baselines.md.
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

from common import latency, run_compress, table, write_result

SAMPLE = "samples/resnet20-fmnist.safetensors"
LABELS = {"oneshot": "host single-step (oneshot)", "iterative": "host iterative (4 events)",
          "dpm": "DPM-SP+SR around the host (quickstart)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-hosts"))
    args = parser.parse_args()
    common = [f"finetune.epochs={args.epochs}", "bench.backends=[ort-cpu]", "bench.min_runs=200",
              "bench.min_seconds=3", "bench.threads=2", "gates.max_accuracy_drop=null"]
    reports = {m: run_compress(SAMPLE, f"resnet20-fmnist-{m}", args.out / m, common)
               for m in ("oneshot", "iterative", "dpm")}
    dense = reports["oneshot"]["dense"]
    rows = [["dense (sample)", f"{dense['top1']:.2f}", "1.000", f"{dense['params'] / 1e3:.1f} K", "-", "-", "-", "-"]]
    for method, r in reports.items():
        c = r["compressed"]
        b1, b8 = latency(r, "ort-cpu", 1), latency(r, "ort-cpu", 8)
        rows.append([LABELS[method], f"{c['top1']:.2f}", f"{c['macs'] / dense['macs']:.3f}", f"{c['params'] / 1e3:.1f} K",
                     f"x{b1['speedup']:.2f} / x{b8['speedup']:.2f}", f"{b1['realised_ratio']:.2f} / {b8['realised_ratio']:.2f}",
                     f"{b1['compressed']['p50']:.3f} / {b8['compressed']['p50']:.3f}", f"{r['wall_s'] / 60:.1f}"])
    text = (f"# Host baselines and DPM on the sample ResNet-20 (Fashion-MNIST), target macs 0.5, seed 0\n\n"
            f"`python benchmarks/host_baselines.py --epochs {args.epochs}` on {platform.processor() or platform.machine()}, "
            f"{args.epochs} fine-tune epochs each, full 10k test set, ORT-CPU with 2 threads, dense and compressed "
            "interleaved.\n\n"
            + table(["model", "top-1 %", "MACs (of dense)", "params", "ORT speedup b1 / b8", "realised ratio b1 / b8",
                     "p50 ms b1 / b8", "run minutes"], rows))
    write_result("host_baselines.md", text)


if __name__ == "__main__":
    main()
