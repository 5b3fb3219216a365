"""DPM against its hosts on the sample ResNet-20 / Fashion-MNIST, with the same fine-tune budget for every variant.

    python benchmarks/dpm_vs_host.py [--targets 0.5 0.33] [--hosts depgraph gate-decorator] [--seeds 0 1 2]
                                     [--epochs 3] [--train-subset N] [--sweep]

Variants per host and MAC target: host single-step (oneshot), host iterative, DPM-SP (rectify off), DPM-SP+SR.
Reports mean ± std top-1 over seeds (full 10k test set), achieved MACs, params and ORT-CPU batch-1 latency.
--sweep adds the N (dpm.steps) and t_rate/t_len sweeps used to choose the defaults (depgraph, first target, seed 0).
Writes benchmarks/results/dpm_vs_host.md.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import latency, mean_std, run_compress, table, write_result

SAMPLE = "samples/resnet20-fmnist.safetensors"
VARIANTS = {
    "host single-step": ("oneshot", []),
    "host iterative": ("iterative", []),
    "DPM-SP": ("dpm", ["prune.dpm.rectify=false"]),
    "DPM-SP+SR": ("dpm", ["prune.dpm.rectify=true"]),
}


def budget(args, seed: int) -> list[str]:
    overrides = [f"finetune.epochs={args.epochs}", f"finetune.seed={seed}", "bench.backends=[ort-cpu]",
                 "bench.batch_sizes=[1]", "bench.min_runs=100", "bench.min_seconds=1", "bench.threads=2",
                 "gates.max_accuracy_drop=null", f"prune.schedule.end_epoch={max(1, args.epochs // 2)}"]
    if args.train_subset:
        overrides.append(f"data.train_subset={args.train_subset}")
    return overrides


def run(args, host: str, target: float, method: str, extra: list[str], seed: int, tag: str) -> dict:
    overrides = budget(args, seed) + [f"prune.method={method}", f"prune.host={host}", f"prune.target={{macs: {target}}}",
                                      *extra]
    return run_compress(SAMPLE, "resnet20-fmnist-dpm", args.out / f"{tag}-s{seed}", overrides)


def summarise(reports: list[dict]) -> list[str]:
    top1 = [r["compressed"]["top1"] for r in reports]
    dense = reports[0]["dense"]
    macs = statistics.mean(r["compressed"]["macs"] / dense["macs"] for r in reports)
    params = statistics.mean(r["compressed"]["params"] for r in reports)
    p50 = statistics.mean(latency(r, "ort-cpu", 1)["compressed"]["p50"] for r in reports)
    released = sum(r["method"].get("totals", {}).get("released", 0) for r in reports)
    return [mean_std(top1), f"{statistics.mean(top1) - dense['top1']:+.2f}", f"{macs:.3f}", f"{params / 1e3:.1f} K",
            f"{p50:.3f}", released]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.33])
    parser.add_argument("--hosts", nargs="+", default=["depgraph", "gate-decorator"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dpm"))
    args = parser.parse_args()
    header = ["host", "macs target", "variant", "top-1 % (mean ± std)", "vs dense pp", "MACs kept", "params",
              "ORT p50 ms (b1)", "released"]
    rows, dense_top1 = [], None
    for target in args.targets:
        for host in args.hosts:
            for variant, (method, extra) in VARIANTS.items():
                reports = [run(args, host, target, method, extra, s, f"{host}-{target}-{method}-{variant}".replace(" ", "_"))
                           for s in args.seeds]
                dense_top1 = reports[0]["dense"]["top1"]
                rows.append([host, target, variant, *summarise(reports)])
                print(rows[-1], flush=True)
    subset = f"first {args.train_subset} training images" if args.train_subset else "the full training set"
    text = (f"# DPM vs host on the sample ResNet-20 (Fashion-MNIST)\n\n`python benchmarks/dpm_vs_host.py --epochs "
            f"{args.epochs}{f' --train-subset {args.train_subset}' if args.train_subset else ''} --seeds "
            f"{' '.join(map(str, args.seeds))}`: {args.epochs} fine-tune epochs on {subset}, events over the first "
            f"{max(1, args.epochs // 2)} epoch(s), full 10k test set, dense sample {dense_top1:.2f}%.\n\n"
            + table(header, rows))
    if args.sweep:
        text += sweep(args)
    write_result("dpm_vs_host.md", text)


def sweep(args) -> str:
    target, seed = args.targets[0], args.seeds[0]
    rows = []
    for steps in (2, 4, 8, 16, 32):
        r = run(args, "depgraph", target, "dpm", [f"prune.dpm.steps={steps}"], seed, f"sweep-N{steps}")
        rows.append([f"steps={steps}", *summarise([r])])
    for t_rate, t_len in ((0.05, 0.5), (0.1, 1.0), (0.2, 2.0), (0.5, 4.0)):
        r = run(args, "depgraph", target, "dpm", [f"prune.dpm.t_rate={t_rate}", f"prune.dpm.t_len={t_len}"], seed,
                f"sweep-t{t_rate}-{t_len}")
        rows.append([f"t_rate={t_rate}, t_len={t_len}", *summarise([r])])
    return (f"\n## Sweeps (depgraph, macs {target}, seed {seed})\n\n"
            + table(["setting", "top-1 %", "vs dense pp", "MACs kept", "params", "ORT p50 ms (b1)", "released"], rows))


if __name__ == "__main__":
    main()
