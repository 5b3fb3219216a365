"""Helpers shared by the benchmark scripts: run compress quietly, format markdown tables, write results."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

from compressor.pipeline import compress
from compressor.recipe import load_recipe

RESULTS = Path(__file__).resolve().parent / "results"


def run_compress(checkpoint: str, recipe: str, out: Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """One `compressor compress` run (library call) with overrides; returns the report and its wall time."""
    start = time.perf_counter()
    report = compress(checkpoint, load_recipe(recipe, list(overrides)), out, overwrite=True)
    report["wall_s"] = time.perf_counter() - start
    return report


def cached_compress(checkpoint: str, recipe: str, out: Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """run_compress, or the report a finished (status ok) earlier run left in `out`, so long benchmarks resume and
    their training runs can be split over processes; the report carries its `run_dir`."""
    done = out / "report.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "ok":
        return json.loads(done.read_text()) | {"run_dir": str(out)}
    print(f"run {out}", flush=True)
    return run_compress(checkpoint, recipe, out, overrides) | {"run_dir": str(out)}


def latency(report: dict[str, Any], backend: str, batch: int) -> dict[str, Any]:
    return next(r for r in report["latency"] if r["backend"] == backend and r["batch_size"] == batch)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    print(text)
    return path


def onnx_speed(dense_onnx: Path, model_onnx: Path, batch: int, threads: int = 2, seconds: float = 2.0) -> dict[str, float]:
    """ORT-CPU p50 (ms) of a dense and a compressed ONNX timed interleaved, for runs benchmarked after the fact."""
    from compressor.bench import make_runner, measure_interleaved, summarize

    runners = [make_runner("ort-cpu", path, threads) for path in (dense_onnx, model_onnx)]
    times_dense, times = measure_interleaved(*runners, batch, warmup_ms=300, min_runs=100, min_seconds=seconds)
    for runner in runners:
        runner.close()
    dense_p50, p50 = summarize(times_dense, batch).p50, summarize(times, batch).p50
    return {"dense_p50": dense_p50, "p50": p50, "speedup": dense_p50 / p50}


def input_size(name: str) -> int:
    """The input size a torchvision classification model expects: a ViT's own image_size, else the crop size of
    its DEFAULT weights' transforms."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    if hasattr(model, "image_size"):  # VisionTransformer checks its input against this
        return int(model.image_size)
    crop = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size
    return int(crop[0])


def zoo_overrides(name: str, size: int, macs: float) -> list[str]:
    """Overrides of the resnet50-imagenet-latency recipe for any torchvision classifier: no fine-tuning, synthetic
    data, every layer but the classifier prunable, a few parity samples."""
    return [f"model.arch=torchvision:{name}", "model.ignore=[]", f"model.input_shape=[3, {size}, {size}]",
            f"prune.target={{macs: {macs}}}", "verify.samples=4", "data.synthetic.val_size=8",
            "data.synthetic.train_size=8"]


def informative_init(name: str, path: Path) -> tuple[str, list[str]]:
    """torchvision initialises some layers to zero (a ViT's head): every output is then 0 and parity proves nothing.
    Such weights are redrawn (normal, std 0.02, seeded) into a state-dict checkpoint; other models run as
    `torchvision:NAME`. Returns the checkpoint to compress and the redrawn layers."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    zero = [n for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.detach().any()]
    if not zero:
        return f"torchvision:{name}", []
    for layer in zero:
        torch.nn.init.normal_(model.get_submodule(layer).weight, std=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return str(path), zero


def parity_fields(report: dict) -> dict:
    """The ONNX parity of a compress report as row fields: max abs diff, relative diff, whether it proves anything."""
    parity = report["parity"]["onnx"]
    return {"parity": parity["max_abs_diff"], "parity_rel": parity.get("relative_diff"),
            "parity_uninformative": parity.get("same_output_for_all", False)}


def parity_cell(row: dict) -> str:
    """Max abs diff, with the relative diff (diff / max |output|) for rows run since it is recorded."""
    if "parity" not in row:
        return "-"
    if row.get("parity_uninformative"):
        return f"{row['parity']:.1e} (same output for every sample: proves nothing)"
    rel = row.get("parity_rel")
    return f"{row['parity']:.1e}" + (f" ({rel:.0e})" if rel is not None else "")


class Shard:
    """`--shard K/N`: this process trains only every N-th configuration (from the K-th), so a benchmark's runs can
    be split over processes; a later run without --shard reuses them all and writes the table."""

    def __init__(self, spec: str | None) -> None:
        self.k, self.n = (int(v) for v in spec.split("/")) if spec else (0, 1)
        self.count = -1

    def mine(self) -> bool:
        self.count += 1
        return self.count % self.n == self.k
