"""Where ONNX Runtime's CPU provider spends the time: per-node kernel times from onnxruntime's profiler, grouped by
operator and memory layout, for one model or a dense / compressed pair (`compressor profile`).

The layout matters because MLAS runs convolutions in its blocked NCHWc layout only when their channel counts fit
its block (8 floats with AVX2, 16 with AVX-512); other convolutions run as NCHW im2col + GEMM with layout
conversions (ReorderInput / ReorderOutput) around them, which is how a pruned model can be slower than dense.
No torch import: this runs wherever `compressor bench` runs.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence


from compressor.deploy.runners import BACKENDS, RunnerOptions, check_onnx_file
from compressor.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

CONV_OPS = ("Conv", "FusedConv")
NCHWC_SUFFIX = "_nchwc"


def profile_onnx(path: str | Path, batch: int = 1, *, runs: int = 30, warmup: int = 5, threads: Optional[int] = None,
                 input_shape: Optional[Sequence[int]] = None, backend: str = "ort-cpu") -> dict[str, Any]:
    """Run `path` on an ONNX Runtime backend (ort-cpu unless told) `warmup + runs` times with the profiler on; the
    per-node medians of the timed runs."""
    import compressor.deploy.backends  # noqa: F401  (registers the runners)

    if Path(path).suffix != ".onnx":
        raise UsageError(f"compressor profile reads ONNX files, not {Path(path).name!r}; export the model first "
                         "(compressor export MODEL).")
    check_onnx_file(path)  # before the profiling session: a failed one also logs a confusing line of its own
    shape = None if input_shape is None else tuple(int(d) for d in input_shape)
    with tempfile.TemporaryDirectory(prefix="compressor-profile-") as tmp:
        runner = BACKENDS.get(backend)(path, RunnerOptions(threads, shape, profile_prefix=str(Path(tmp) / "ort")))
        runner.prepare(batch)
        for _ in range(warmup + runs):
            runner.run_once()
        events = json.loads(Path(runner.session.end_profiling()).read_text())
        runner.close()
    return {"model": str(path), "batch": batch, "runs": runs, "threads": threads, **summarize_trace(events, warmup)}


def summarize_trace(events: list[dict[str, Any]], skip_runs: int = 0) -> dict[str, Any]:
    """Per-node median kernel time (µs) over the runs after the first `skip_runs`, by operator and layout."""
    durations: dict[str, list[float]] = defaultdict(list)
    meta: dict[str, dict[str, Any]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        durations[node].append(float(event["dur"]))
        args = event.get("args", {})
        meta[node] = {"op": args.get("op_name", "?"), "layout": "nchwc" if node.endswith(NCHWC_SUFFIX) else "nchw",
                      "output_shape": _shape(args.get("output_type_shape")),
                      "input_shapes": _shapes(args.get("input_type_shape"))}
    nodes = [{"node": node, **meta[node], "us": statistics.median(times[skip_runs:] or times)}
             for node, times in durations.items()]
    nodes.sort(key=lambda n: -n["us"])
    by_op: dict[str, float] = defaultdict(float)
    for n in nodes:
        by_op[op_kind(n)] += n["us"]
    runs = [float(e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    convs = [n for n in nodes if n["op"] in CONV_OPS]
    return {"model_run_us": statistics.median(runs[skip_runs:] or runs) if runs else None,
            "kernel_us": sum(n["us"] for n in nodes), "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "conv_layout": {"nchwc": sum(n["layout"] == "nchwc" for n in convs),
                            "nchw": sum(n["layout"] == "nchw" for n in convs)},
            "reorders": sum(n["op"].startswith("Reorder") for n in nodes), "nodes": nodes}


def op_kind(node: dict[str, Any]) -> str:
    """`Conv (nchwc)` / `FusedConv (nchw)` for convolutions, the operator name otherwise."""
    return f"{node['op']} ({node['layout']})" if node["op"] in CONV_OPS else node["op"]


def _shape(value: Any) -> Optional[list[int]]:
    shapes = _shapes(value)
    return shapes[0] if shapes else None


def _shapes(value: Any) -> list[list[int]]:
    """The shapes of a profiler event's `input_type_shape` / `output_type_shape` ([{"float": [1, 3, 8, 8]}, ...])."""
    if not isinstance(value, list):
        return []
    return [next(iter(v.values())) for v in value if isinstance(v, dict) and v]


def compare(dense: dict[str, Any], compressed: dict[str, Any]) -> dict[str, Any]:
    """Kernel time per operator kind, dense vs compressed, and what the layout counts say."""
    kinds = list(dict.fromkeys([*dense["by_op"], *compressed["by_op"]]))
    rows = [{"kind": k, "dense_us": dense["by_op"].get(k, 0.0), "compressed_us": compressed["by_op"].get(k, 0.0)}
            for k in kinds]
    return {"rows": rows, "kernel_speedup": dense["kernel_us"] / max(compressed["kernel_us"], 1e-9),
            "diagnosis": diagnose(dense, compressed)}


ROUND_TO_ADVICE = "prune with `prune.round_to: auto`"


def diagnose(dense: dict[str, Any], compressed: dict[str, Any], advice: str = ROUND_TO_ADVICE) -> list[str]:
    """Plain-language findings: convolutions that left the NCHWc layout, and the conversions that came with them;
    `advice` ends the layout finding (what the user can change)."""
    findings = []
    lost = compressed["conv_layout"]["nchw"] - dense["conv_layout"]["nchw"]
    if lost > 0:
        total = sum(compressed["conv_layout"].values())
        slow = sum(n["us"] for n in compressed["nodes"] if n["op"] in CONV_OPS and n["layout"] == "nchw")
        findings.append(
            f"{lost} more of {total} convolutions run outside ONNX Runtime's NCHWc layout than in the dense model "
            f"({slow / max(compressed['kernel_us'], 1e-9):.0%} of the compressed model's kernel time); their channel "
            f"counts are not multiples of the CPU's block: {advice}.")
    extra = compressed["reorders"] - dense["reorders"]
    if extra > 0:
        findings.append(f"{extra} more layout conversions (ReorderInput/ReorderOutput) than in the dense model.")
    return findings


def profile_pair(model: str | Path, baseline: Optional[str | Path], batch: int, **kwargs: Any) -> dict[str, Any]:
    """The `compressor profile` result: one model's profile, and with a baseline the comparison."""
    result: dict[str, Any] = {"model": profile_onnx(model, batch, **kwargs)}
    if baseline is not None:
        result["baseline"] = profile_onnx(baseline, batch, **kwargs)
        result["comparison"] = compare(result["baseline"], result["model"])
    return result


def render_profile(result: dict[str, Any], console: "Console", top: int = 10) -> None:
    """Operator-kind totals (dense vs compressed with a baseline), the slowest nodes, and the findings."""
    from rich.table import Table

    model, base = result["model"], result.get("baseline")
    table = Table("operator (layout)", *(["baseline ms", "model ms", "ratio"] if base else ["ms", "share"]),
                  title=f"ONNX Runtime CPU kernel time per run, batch {model['batch']}, median of {model['runs']} runs")
    if base:
        for row in result["comparison"]["rows"]:
            ratio = ("new" if not row["dense_us"] else "gone" if not row["compressed_us"]
                     else f"x{row['dense_us'] / row['compressed_us']:.2f}")
            table.add_row(row["kind"], f"{row['dense_us'] / 1e3:.3f}", f"{row['compressed_us'] / 1e3:.3f}", ratio)
        table.add_row("all kernels", f"{base['kernel_us'] / 1e3:.3f}", f"{model['kernel_us'] / 1e3:.3f}",
                      f"x{result['comparison']['kernel_speedup']:.2f}")
    else:
        for kind, us in model["by_op"].items():
            table.add_row(kind, f"{us / 1e3:.3f}", f"{us / max(model['kernel_us'], 1e-9):.0%}")
    console.print(table)
    nodes = Table("node", "operator (layout)", "output shape", "ms", title=f"slowest {top} nodes of {model['model']}")
    for node in model["nodes"][:top]:
        nodes.add_row(node["node"], op_kind(node), str(node["output_shape"]), f"{node['us'] / 1e3:.3f}")
    console.print(nodes)
    layout = model["conv_layout"]
    console.print(f"convolutions in NCHWc layout: {layout['nchwc']} of {sum(layout.values())}"
                  + (f" (baseline: {base['conv_layout']['nchwc']} of {sum(base['conv_layout'].values())})" if base else ""))
    for finding in (result.get("comparison") or {}).get("diagnosis", []):
        console.print(f"- {finding}")


def layout_check(dense: str | Path, model: str | Path, *, threads: Optional[int] = None,
                 input_shape: Optional[Sequence[int]] = None, advice: str = ROUND_TO_ADVICE) -> dict[str, Any]:
    """How many convolutions ONNX Runtime CPU runs in its NCHWc layout, dense vs compressed (a few profiled runs
    at batch 1; the counts, not the times, are what this is for), and the findings."""
    kwargs = {"runs": 3, "warmup": 1, "threads": threads, "input_shape": input_shape}
    base, slim = profile_onnx(dense, 1, **kwargs), profile_onnx(model, 1, **kwargs)
    return {"dense": base["conv_layout"], "compressed": slim["conv_layout"], "findings": diagnose(base, slim, advice)}
