"""How much of a MAC reduction becomes ONNX Runtime CPU latency: torchvision models at 224 pruned to a MAC target
without fine-tuning (synthetic data), dense and pruned timed interleaved, medians over repeats.

    python benchmarks/realised_speedup.py [--models resnet18 resnet50 mobilenet_v2] [--round-to 1 8 16] [--repeats 3]

realised_speedup.json keeps every (model, round_to) row measured so far; the table lists them all.

Writes benchmarks/results/realised_speedup.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import RESULTS, informative_init, latency, parity_cell, parity_fields, run_compress, table, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--round-to", nargs="+", type=int, default=[8])
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--global-ranking", action="store_true", help="rank globally (default: uniform per layer)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-realised"))
    args = parser.parse_args()
    store = RESULTS / "realised_speedup.json"  # rows of earlier invocations are kept, so models can be added later
    kept = json.loads(store.read_text()) if store.is_file() else {}
    for model in args.models:
        for round_to in args.round_to:
            overrides = [f"model.arch=torchvision:{model}", "model.ignore=[]", f"prune.target={{macs: {args.macs}}}",
                         f"prune.round_to={round_to if round_to > 1 else 'null'}",
                         f"prune.global={'true' if args.global_ranking else 'false'}", "bench.threads=2",
                         "bench.min_runs=30", "bench.min_seconds=3"]
            ratios = {1: [], 8: []}
            report = None
            checkpoint, _ = informative_init(model, args.out / f"{model}.init.pt")
            for repeat in range(args.repeats):
                report = run_compress(checkpoint, "resnet50-imagenet-latency",
                                      args.out / f"{model}-r{round_to}-{repeat}", overrides)
                for batch in ratios:
                    ratios[batch].append(latency(report, "ort-cpu", batch)["realised_ratio"])
            mac = report["compressed"]["macs"] / report["dense"]["macs"]
            b1, b8 = statistics.median(ratios[1]), statistics.median(ratios[8])
            layout = report.get("ort_cpu_layout")
            nchwc = (f"{layout['dense']['nchwc']}/{sum(layout['dense'].values())} → "
                     f"{layout['compressed']['nchwc']}/{sum(layout['compressed'].values())}") if layout else "-"
            kept[f"{model}/{round_to}"] = [model, round_to, f"{report['dense']['macs'] / 1e9:.2f} G", f"{mac:.3f}",
                         f"x{b1 / mac:.2f} / x{b8 / mac:.2f}", f"{b1:.2f} / {b8:.2f}", nchwc,
                         parity_cell(parity_fields(report)), args.repeats]
            RESULTS.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(kept, indent=1))
    # rows from before the layout and repeats columns existed were measured with --repeats 2
    order = sorted(kept, key=lambda k: (k.split("/")[0], int(k.split("/")[1])))
    rows = [row if len(row) == 9 else row[:6] + ["-", row[6], 2] for row in (kept[k] for k in order)]
    ranking = "global" if args.global_ranking else "uniform per layer"
    text = (f"# Realised speedup on ONNX Runtime CPU (2 threads), pruned to macs {args.macs} without fine-tuning\n\n"
            f"`python benchmarks/realised_speedup.py --models MODEL... --round-to R... --repeats N` ({ranking} "
            "ranking; rows accumulate over invocations). Realised ratio = latency speedup / MAC reduction, median over "
            "repeats of the interleaved p50 ratio.\n\n"
            + "NCHWc convs: convolutions ONNX Runtime runs in its blocked layout, dense → pruned (\"-\": row from "
            "before this column existed).\n\n"
            + table(["model", "round_to", "dense MACs", "MACs kept", "speedup b1 / b8", "realised ratio b1 / b8",
                     "NCHWc convs", "parity max diff (relative)", "repeats"], rows))
    write_result("realised_speedup.md", text)


if __name__ == "__main__":
    main()
