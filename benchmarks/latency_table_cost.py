"""What a latency table costs to measure on this machine: ResNet-50 (torchvision, 224x224) exported to ONNX,
then `compressor latency-table` at batch 1 and 8 with its defaults (issue 16: under 5 minutes on 2 cores).

    python benchmarks/latency_table_cost.py [--model resnet50] [--batch 1 8]

Writes benchmarks/results/latency_table_cost.json (one entry per model and CPU class, "resnet50 @ <CPU>") with
the wall time, the number of layers, of distinct layers measured and of probes, and the share of the model's
end-to-end time the layers explain.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, cpu_label, input_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    import torch
    import torchvision

    from compressor.deploy.bench import environment
    from compressor.deploy.config import OnnxConfig
    from compressor.deploy.export import export_onnx
    from compressor.deploy.latency_table import measure_table

    size = input_size(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.model}.onnx"
        export_onnx(torchvision.models.get_model(args.model, weights=None).eval(), torch.randn(1, 3, size, size),
                    path, OnnxConfig(simplify=False))
        start = time.perf_counter()
        table = measure_table(path, "ort-cpu", tuple(args.batch))
        wall = time.perf_counter() - start
    rows = table["layers"]
    explained = {b: sum(r["p50_ms"][b][-1] - r["overhead_ms"][b] for r in rows) / table["model_p50_ms"][b]
                 for b in table["model_p50_ms"]}
    result = {"model": args.model, "input": [3, size, size], "batches": args.batch, "wall_s": wall,
              "layers": len(rows), "distinct": sum(1 for r in rows if "same_as" not in r),
              "probes": sum(len(r["widths"]) + 1 for r in rows if "same_as" not in r) * len(args.batch),
              "model_p50_ms": table["model_p50_ms"], "layers_share_of_model": explained,
              "cpu": cpu_label(), "onnxruntime": environment()["onnxruntime_version"],
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    store = RESULTS / "latency_table_cost.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    done[f"{args.model} @ {result['cpu']}"] = result
    store.write_text(json.dumps(done, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
