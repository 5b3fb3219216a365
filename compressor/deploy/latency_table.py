"""Per-layer latency tables measured in the target runtime, without torch (runs on an edge device that has only
onnxruntime, onnx and numpy). Spec: docs/latency-table.md.

For every convolution and fully connected layer of an exported model (Conv, Gemm, and MatMul with a constant
weight), a one-node probe graph is built with onnx at the layer's own input shape, attributes and batch, for each
output width the table samples, and timed with bench's statistics: every width of one layer runs in turn (round
robin) after a warm-up, so machine noise hits all widths of a layer alike. The table records what its numbers
depend on (model hash and input shape, runtime, versions, CPU, threads, batch) so that a compress run can refuse a
table measured for something else.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from compressor.errors import UsageError

FORMAT = "compressor-latency-table/1"
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
NCHWC_BLOCKS = (8, 16)  # ORT-CPU's blocked-layout channel blocks: MLAS picks 8 on AVX2, 16 on AVX-512


@dataclass(frozen=True)
class Layer:
    """A layer whose output width pruning changes: its node, input shape without the batch axis, weight shape and
    attributes (Conv: kernel_shape, strides, pads, dilations, group)."""

    name: str
    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    attributes: dict[str, Any]

    @property
    def width(self) -> int:
        """Output channels (Conv) or features (Gemm / MatMul)."""
        if self.op == "Conv":
            return self.weight_shape[0]
        if self.op == "Gemm" and self.attributes.get("transB", 0):
            return self.weight_shape[0]
        return self.weight_shape[-1]

    @property
    def depthwise(self) -> bool:
        group = int(self.attributes.get("group", 1))
        return self.op == "Conv" and group > 1 and group == self.input_shape[0]


def file_digest(path: str | Path) -> str:
    """sha256 of a file (with its external data file next to it, if any), identifying the model a table is for."""
    digest = hashlib.sha256()
    path = Path(path)
    for part in (path, path.with_name(path.name + ".data")):
        if part.is_file():
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def prunable_layers(model: Any) -> list[Layer]:
    """The Conv / Gemm / MatMul nodes with a constant weight and a known input shape (onnx shape inference)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:  # weights folded into Constant nodes by some exporters
        if node.op_type == "Constant" and node.attribute:
            weights[node.output[0]] = tuple(numpy_helper.to_array(node.attribute[0].t).shape)
    layers = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        shape = shapes.get(node.input[0])
        if not shape or any(d <= 0 for d in shape[1:]):
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = weights[node.input[1]]
        if node.op_type == "MatMul" and len(weight) != 2:
            continue
        layers.append(Layer(node.name or node.output[0], node.op_type, tuple(shape[1:]), weight, attributes))
    return layers


def probe_graph(layer: Layer, width: int, seed: int = 0) -> Any:
    """A one-node ONNX model computing `layer` with `width` output channels (a depthwise conv also takes `width`
    input channels: its channels are pruned together), random weights, a free batch axis."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    in_shape = list(layer.input_shape)
    attributes = dict(layer.attributes)
    inits = []
    if layer.op == "Conv":
        if layer.depthwise:
            in_shape[0] = width
            attributes["group"] = width
        w = rng.standard_normal((width, *layer.weight_shape[1:])).astype(np.float32)
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(width, np.float32), "B")]
        node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], **attributes)
    elif layer.op == "Gemm":
        shape = (width, layer.weight_shape[1]) if attributes.get("transB", 0) else (layer.weight_shape[0], width)
        inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "W"),
                 numpy_helper.from_array(np.zeros(width, np.float32), "B")]
        node = helper.make_node("Gemm", ["X", "W", "B"], ["Y"], **attributes)
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((layer.weight_shape[0], width)).astype(np.float32), "W")]
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", *in_shape])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="compressor-probe")


def identity_graph(layer: Layer) -> Any:
    """A one-node Identity model over the layer's input: the cost of a probe's run call without its layer."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "probe-identity",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", *layer.input_shape])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="compressor-probe")


def sample_widths(width: int, step: int, max_widths: Optional[int] = None) -> list[int]:
    """The kept widths a table measures for a layer of `width`: every multiple of `step` below it, and the width;
    with max_widths, every multiple of the smallest multiple of `step` that keeps the count within it (a
    2048-wide layer at step 8 and 16 widths: multiples of 128)."""
    if max_widths is not None and max_widths > 1:
        step = step * max(1, math.ceil(width / (step * max_widths)))
    return sorted({w for w in range(step, width, step)} | {width})


def _signature(layer: Layer) -> tuple:
    """What a probe's time depends on: layers alike in it are measured once."""
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in layer.attributes.items()))
    return layer.op, layer.input_shape, layer.weight_shape, frozen


def default_step(backend: str) -> int:
    """The width step a table samples at by default: on ORT-CPU its channel block on this CPU (16 with AVX-512,
    8 with AVX2: widths between two blocks run padded to the next one, so sampling finer measures the same time
    twice and, worse, makes round_to auto take the finer step), 8 on the GPU backends."""
    from compressor.deploy.hardware import ort_cpu_block

    return ort_cpu_block() if backend == "ort-cpu" else 8


def measure_table(model_path: str | Path, backend: str = "ort-cpu", batches: Sequence[int] = (1,), *,
                  step: Optional[int] = None,
                  max_widths: Optional[int] = 16, threads: Optional[int] = None, warmup_ms: float = 100.0,
                  min_runs: int = 20, min_seconds: float = 0.05, layers: Optional[Sequence[str]] = None,
                  progress: Any = None) -> dict[str, Any]:
    """The latency table of `model_path` on `backend` (an ONNX Runtime backend) at each batch size; a layer
    with the same operator, shapes and attributes as one measured before shares its row's times."""
    from compressor.deploy.bench import environment
    from compressor.deploy.runners import load_onnx_proto
    from compressor.deploy.timing import Budget, time_models

    step = step or default_step(backend)

    if not backend.startswith("ort-"):
        raise UsageError(f"--backend {backend}: latency tables are measured with ONNX Runtime probe graphs "
                         "(ort-cpu, ort-cuda or ort-trt).")
    model = load_onnx_proto(model_path)
    if model is None:
        raise UsageError("latency tables need the onnx package to build their probe graphs: pip install onnx.")
    found = prunable_layers(model)
    if layers:
        found = [layer for layer in found if layer.name in set(layers)]
    if not found:
        raise UsageError(f"{model_path}: no Conv, Gemm or MatMul layer with a constant weight and a known input "
                         "shape (export with a fixed input size, e.g. `compressor export`).")
    budget = Budget(warmup_ms, min_runs, min_seconds)
    rows = []
    measured: dict[tuple, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="compressor-lut-") as tmp:
        for index, layer in enumerate(found):
            twin = measured.get(_signature(layer))
            if twin is not None:
                rows.append({**asdict(layer), "width": layer.width, "depthwise": layer.depthwise,
                             "widths": twin["widths"], "p50_ms": twin["p50_ms"], "overhead_ms": twin["overhead_ms"],
                             "same_as": twin["name"]})
                if progress is not None:
                    progress(index + 1, len(found), f"{layer.name} (as {twin['name']})")
                continue
            widths = sample_widths(layer.width, step, max_widths)
            paths = []
            for w in widths:
                path = Path(tmp) / f"probe-{index}-{w}.onnx"
                path.write_bytes(probe_graph(layer, w).SerializeToString())
                paths.append(path)
            empty = Path(tmp) / f"probe-{index}-identity.onnx"
            empty.write_bytes(identity_graph(layer).SerializeToString())
            ms: dict[str, list[float]] = {}
            overhead: dict[str, float] = {}
            # the identity probe times what every probe pays besides its layer (the run call)
            for timed in time_models(backend, [empty, *paths], batches, budget, threads=threads, interleaved=True,
                                     input_shapes=[_probe_input(layer, w) for w in [layer.width, *widths]]):
                overhead[str(timed.batch)], *ms[str(timed.batch)] = timed.p50_ms
            rows.append({**asdict(layer), "width": layer.width, "depthwise": layer.depthwise, "widths": widths,
                         "p50_ms": ms, "overhead_ms": overhead})
            measured[_signature(layer)] = rows[-1]
            if progress is not None:
                progress(index + 1, len(found), layer.name)
    # the model end to end (interleaved, as the probes and the bench): what the layers do not account for is the
    # planner's fixed part
    whole = {str(timed.batch): timed.p50_ms[0]
             for timed in time_models(backend, [model_path], batches, Budget(warmup_ms, min_runs, max(min_seconds, 0.5)),
                                      threads=threads, interleaved=True)}
    context = {str(b): measure_context(model_path, backend, b, found, rows, whole[str(b)], threads) for b in batches}
    return {"format": FORMAT, "model": {"path": str(model_path), "sha256": file_digest(model_path),
                                        "input_shape": _model_input_shape(model)},
            "backend": backend, "batches": [int(b) for b in batches], "step": step, "max_widths": max_widths,
            "threads": threads,
            "environment": environment(threads=threads), "model_p50_ms": whole, "context": context, "layers": rows}


CONTEXT_RUNS = 30


def output_shape(layer: Layer) -> tuple[int, ...]:
    """The layer's output shape without the batch axis (Conv: channels and the strided spatial size)."""
    if layer.op != "Conv":
        return (*layer.input_shape[:-1], layer.width)
    spatial = layer.input_shape[1:]
    kernel = list(layer.attributes.get("kernel_shape") or layer.weight_shape[2:])
    strides = list(layer.attributes.get("strides") or [1] * len(spatial))
    dilations = list(layer.attributes.get("dilations") or [1] * len(spatial))
    pads = list(layer.attributes.get("pads") or [0] * (2 * len(spatial)))
    n = len(spatial)
    return (layer.width, *((size + pads[i] + pads[i + n] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                           for i, size in enumerate(spatial)))


def _layer_key(layer: Layer) -> tuple:
    weight = layer.weight_shape if layer.op == "Conv" else ()
    return "conv" if layer.op == "Conv" else "linear", layer.input_shape, output_shape(layer), weight


def _layer_keys(layer: Layer) -> list[tuple]:
    """The keys a layer's node may carry in the profile, most literal first: its own shapes, then its shapes in
    ORT-CPU's blocked layout, whose block (8 channels with AVX2, 16 with AVX-512) pads the output channels, and
    the input channels where the previous node's output was padded (an input narrower than the block stays
    unblocked); a depthwise convolution's groups pad with its channels."""
    keys = [_layer_key(layer)]
    if layer.op != "Conv":
        return keys
    out_c, in_c = layer.weight_shape[0], layer.input_shape[0]
    out_shape = output_shape(layer)
    for block in NCHWC_BLOCKS:
        pad_out = -(-out_c // block) * block
        for pad_in in dict.fromkeys((-(-in_c // block) * block if in_c >= block else in_c, in_c)):
            if layer.depthwise:
                weight = (pad_out, *layer.weight_shape[1:])
            else:
                weight = (pad_out, pad_in // int(layer.attributes.get("group", 1)), *layer.weight_shape[2:])
            key = ("conv", (pad_in, *layer.input_shape[1:]), (pad_out, *out_shape[1:]), weight)
            if key not in keys:
                keys.append(key)
    return keys


def _node_key(node: dict[str, Any]) -> Optional[tuple]:
    """The profiled node's _layer_key: ONNX Runtime reports a convolution's logical input and weight shapes even
    when it runs it blocked (NCHWc) or fused with its activation or residual add; a Gemm / MatMul's pre-packed
    weight is not reported, its input and output shapes are."""
    inputs, out = node.get("input_shapes") or [], node.get("output_shape")
    if not inputs or not out:
        return None
    op = node["op"]
    if op in ("Conv", "FusedConv") and len(inputs) >= 2:
        return "conv", tuple(inputs[0][1:]), tuple(out[1:]), tuple(inputs[1])
    if op in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul"):
        return "linear", tuple(inputs[0][1:]), tuple(out[1:]), ()
    return None


def measure_context(model_path: str | Path, backend: str, batch: int, found: Sequence[Layer],
                    rows: list[dict[str, Any]], whole_ms: float, threads: Optional[int]) -> dict[str, Any]:
    """Each layer's time inside the whole model (docs/latency-table.md, "In-context calibration"): the model run
    with ONNX Runtime's profiler, every convolution / linear node matched to its layer by shapes (layers alike
    share the median of their nodes), scaled by the unprofiled end-to-end time over the profiled one (the
    profiler slows every node). Sets row["context_ms"][batch]; returns what was matched."""
    from compressor.deploy.ort_profile import profile_onnx

    try:
        profile = profile_onnx(model_path, batch, runs=CONTEXT_RUNS, warmup=5, threads=threads, backend=backend)
    except Exception as exc:  # noqa: BLE001 - a runtime without a usable profiler leaves the probes uncalibrated
        return {"matched": 0, "layers": len(found), "error": f"{type(exc).__name__}: {exc}"}
    by_key: dict[tuple, list[float]] = {}
    for node in profile["nodes"]:
        key = _node_key(node)
        if key is not None:
            by_key.setdefault(key, []).append(float(node["us"]))
    run_us = profile.get("model_run_us")
    scale = whole_ms * 1e3 / run_us if run_us else 1.0
    matched = 0
    for layer, row in zip(found, rows):
        times = next((by_key[key] for key in _layer_keys(layer) if key in by_key), None)
        if times:
            row.setdefault("context_ms", {})[str(batch)] = sorted(times)[len(times) // 2] / 1e3 * scale
            matched += 1
    return {"matched": matched, "layers": len(found), "profiled_run_ms": (run_us or 0) / 1e3, "scale": scale}


def probe_ms(row: dict[str, Any], batch: int | str) -> list[float]:
    """A row's probe times at its widths less the identity probe (the run call), each at least 2% of the
    smallest raw time: a layer cheaper than the timing noise still costs something."""
    key = str(batch)
    times = [float(t) for t in row["p50_ms"][key]]
    overhead = float((row.get("overhead_ms") or {}).get(key, 0.0))
    floor = 0.02 * min(times)
    return [max(t - overhead, floor) for t in times]


def layer_factors(table: dict[str, Any], batch: int) -> list[float]:
    """Per row, in-context over probe time of the dense layer (probe_ms at the layer's width); rows the profile did
    not match take the median factor of those it did; 1.0 for tables without a context."""
    key = str(batch)
    ratios = [float(row["context_ms"][key]) / probe_ms(row, key)[-1]
              if key in (row.get("context_ms") or {}) and probe_ms(row, key)[-1] > 0 else None for row in table["layers"]]
    known = sorted(r for r in ratios if r is not None and math.isfinite(r) and r > 0)
    default = known[len(known) // 2] if known else 1.0
    return [r if r is not None and math.isfinite(r) and r > 0 else default for r in ratios]


def _model_input_shape(model: Any) -> Optional[list[int]]:
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims][1:] or None


def _probe_input(layer: Layer, width: int) -> tuple[int, ...]:
    shape = list(layer.input_shape)
    if layer.depthwise:
        shape[0] = width
    return tuple(shape)


def write_table(table: dict[str, Any], out: str | Path) -> Path:
    from compressor.rundir import write_json

    return write_json(out, table, indent=1)


def read_table(path: str | Path, *, backend: str, batch: int) -> dict[str, Any]:
    """A table for this runtime and batch; UsageError (exit 2) naming what differs. Whether it is for this model is
    checked layer by layer where it is used (prune/latency_cost.py: the shapes a layer's latency depends on)."""
    path = Path(path)
    where = f"latency table {path} (prune.target.table / --latency-table)"
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: not a readable latency table ({type(exc).__name__}: {exc}).",
                         hint="Make one with `compressor latency-table MODEL.onnx --out lut.json`.") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise UsageError(f"{where}: format {table.get('format') if isinstance(table, dict) else None!r}"
                         f", expected {FORMAT!r}.", hint="Measure it again with this version of compressor.")
    missing = [k for k in ("model", "backend", "batches", "layers") if k not in table]
    if missing or not isinstance(table["layers"], list):
        raise UsageError(f"{where}: {', '.join(missing) or 'layers'} missing or malformed.",
                         hint="Measure it again with `compressor latency-table`.")
    problems = []
    if table["backend"] != backend:
        problems.append(f"its runtime is {table['backend']}, the target is {backend}")
    if str(batch) not in {str(b) for b in table["batches"]}:
        problems.append(f"it has batch {', '.join(map(str, table['batches']))}, the target is batch {batch}")
    if problems:
        raise UsageError(f"{where}: " + "; ".join(problems) + ".",
                         hint=f"Measure a table for this target: `compressor latency-table model.onnx --backend "
                              f"{backend} --batch {batch}` (on the target device).")
    return table
