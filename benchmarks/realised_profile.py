"""Where the realised speedup is lost: onnxruntime's per-node profile of the dense and pruned ONNX of every
realised_speedup.py setting whose realised ratio is below 0.9, summed per operator kind and layout.

    python benchmarks/realised_profile.py [--threshold 0.9] [--runs 20] [--runs-dir runs/bench-realised]

Reads benchmarks/results/realised_speedup.json and the run directories realised_speedup.py left (repeat 0); writes
benchmarks/results/realised_profile.md. Operator rows are the kinds that took >= 5% of either model's kernel time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, table, write_result

from compressor.deploy.ort_profile import profile_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-realised"))
    args = parser.parse_args()
    rows = json.loads((RESULTS / "realised_speedup.json").read_text())
    sections = []
    for key, row in sorted(rows.items()):
        model, round_to, mac = row[0], row[1], float(row[3])
        ratios = [float(v) for v in row[5].split(" / ")]
        run = args.runs_dir / f"{model}-r{round_to}-0"
        for batch, ratio in zip((1, 8), ratios):
            if ratio >= args.threshold or not (run / "model.onnx").is_file():
                continue
            result = profile_pair(run / "model.onnx", run / "dense.onnx", batch, runs=args.runs, threads=args.threads)
            dense, pruned, comparison = result["baseline"], result["model"], result["comparison"]
            big = [r for r in comparison["rows"] if max(r["dense_us"] / dense["kernel_us"],
                                                        r["compressed_us"] / pruned["kernel_us"]) >= 0.05]
            body = table(["operator (layout)", "dense ms", "pruned ms", "share of dense", "speedup"], [
                [r["kind"], f"{r['dense_us'] / 1e3:.2f}", f"{r['compressed_us'] / 1e3:.2f}",
                 f"{r['dense_us'] / dense['kernel_us']:.0%}",
                 f"x{r['dense_us'] / r['compressed_us']:.2f}" if r["compressed_us"] and r["dense_us"] else "-"]
                for r in big])
            layout = (f"NCHWc convolutions {dense['conv_layout']['nchwc']}/{sum(dense['conv_layout'].values())} → "
                      f"{pruned['conv_layout']['nchwc']}/{sum(pruned['conv_layout'].values())}")
            findings = "".join(f"- {f}\n" for f in comparison["diagnosis"])
            sections.append(f"## {model}, round_to {round_to}, batch {batch}: realised ratio {ratio:.2f}\n\n"
                            f"MACs kept {mac:.3f} (x{1 / mac:.2f} fewer); all kernels x{comparison['kernel_speedup']:.2f} "
                            f"({dense['kernel_us'] / 1e3:.2f} → {pruned['kernel_us'] / 1e3:.2f} ms); whole session run "
                            f"x{dense['model_run_us'] / pruned['model_run_us']:.2f} ({dense['model_run_us'] / 1e3:.2f} → "
                            f"{pruned['model_run_us'] / 1e3:.2f} ms, kernels {pruned['kernel_us'] / pruned['model_run_us']:.0%}"
                            f" of it); {layout}.\n\n"
                            + body + ("\n" + findings if findings else ""))
            print(sections[-1], flush=True)
    text = (f"# Where the realised speedup is lost (ORT-CPU, {args.threads} threads)\n\n"
            f"`python benchmarks/realised_profile.py --runs {args.runs}`: every realised_speedup.md setting with a "
            f"realised ratio below {args.threshold}, dense and pruned ONNX profiled with onnxruntime's profiler "
            f"(median kernel time per node over {args.runs} runs, summed per operator kind).\n\n" + "\n".join(sections))
    write_result("realised_profile.md", text)


if __name__ == "__main__":
    main()
