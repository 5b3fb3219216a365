"""Quantized copies of an exported ONNX model: static INT8 in QDQ form (onnxruntime.quantization) and FP16 (the
float16 converter onnxruntime ships). No torch import: this runs wherever onnxruntime does; calibration data and
evaluation come from the caller (app/quantization.py in `compress` and `compressor export`).

The CPU int8 settings follow onnxruntime's advice for its x86 kernels and are derived from the machine that runs
the quantization (docs/quantization.md): uint8 activations with int8 weights, and 7-bit weights (`reduce_range`)
on x86 CPUs without VNNI, where 8-bit products can saturate. GPU targets (TensorRT) get symmetric int8 for both.
"""
from __future__ import annotations

import inspect
import logging
import platform
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from compressor.deploy.agreement import top1_agreement
from compressor.deploy.hardware import cpu_flags
from compressor.errors import ExportError, RecipeError
from compressor.rundir import atomic_path

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CALIBRATION_BATCH = 32


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Int8Settings:
    """The onnxruntime quantization types, and why they were chosen."""

    activations: str  # "uint8" | "int8"
    symmetric_activations: bool
    reduce_range: bool
    reason: str


def int8_settings(activations: str = "auto", reduce_range: bool | str = "auto", *, gpu: bool = False,
                  flags: Optional[frozenset[str] | set[str]] = None, machine: Optional[str] = None) -> Int8Settings:
    """Resolve export.quantize.activations / reduce_range for a CPU or GPU target on this machine."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    x86 = machine in ("x86_64", "amd64", "i686", "x86")
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if gpu:
        act, why = "int8", "GPU target: symmetric int8 activations and weights (TensorRT's explicit quantization)"
    elif activations != "auto":
        act, why = activations, f"activations {activations} as the recipe asks"
    elif x86:
        act, why = "uint8", "x86 CPU: uint8 activations with int8 weights (onnxruntime's U8S8 kernels)"
    else:
        act, why = "int8", f"{machine} CPU: symmetric int8 activations (onnxruntime's advice for ARM)"
    if activations != "auto" and gpu:
        act, why = activations, f"activations {activations} as the recipe asks (GPU target)"
    if reduce_range == "auto":
        reduce = bool(x86 and not vnni and not gpu)
        why += ("; 7-bit weights: this x86 CPU has no VNNI, where 8-bit products can saturate" if reduce else
                "; 8-bit weights" + (" (VNNI present)" if x86 and vnni and not gpu else ""))
    else:
        reduce = bool(reduce_range)
        why += f"; reduce_range {reduce} as the recipe asks"
    return Int8Settings(activations=act, symmetric_activations=act == "int8", reduce_range=reduce, reason=why)


# ---------------------------------------------------------------------------------------------- layers
def module_name(node_name: str) -> str:
    """The PyTorch module path behind an exported node name: '/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1'
    (torch's exporter nests scope names; a part that extends the one before it is the full dotted path)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    current = ""
    for part in parts:
        current = part if not current or part.startswith(current + ".") else f"{current}.{part}"
    return current


def weight_nodes(model) -> list[str]:
    """Names of the nodes that carry weights (Conv, ConvTranspose, Gemm, MatMul), in graph order."""
    return [n.name for n in model.graph.node if n.op_type in WEIGHT_OPS and n.name]


def float_tail(model) -> list[str]:
    """Names of the nodes after the last weight layers: the nodes (not Conv/Gemm/MatMul themselves) from which no
    weight layer can be reached. int8 keeps them in float.

    They are cheap element-wise work (a detector's box decoding and class sigmoid, a segmenter's upsampling), and
    quantizing them is where a file goes wrong: YOLO's output concatenates boxes in pixels with class probabilities
    in [0, 1], and one int8 scale over both rounds every probability to a multiple of 0.6 (measured on the YOLO11n
    sample: best-class agreement with fp32 on its confident anchors 12.9% with the tail quantized, 99.3% kept in
    float)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    reaches: dict[int, bool] = {}
    order = list(model.graph.node)
    for node in reversed(order):  # graph order is topological: every consumer is decided before its producer
        reaches[id(node)] = any(c.op_type in WEIGHT_OPS or reaches.get(id(c), False)
                                for out in node.output for c in consumers.get(out, ()))
    return [n.name for n in order if n.name and n.op_type not in WEIGHT_OPS and not reaches[id(n)]]


def resolve_exclude(patterns: Sequence[str], nodes: Sequence[str]) -> list[str]:
    """Node names matched by export.quantize.exclude: a node name, a module name or a `re:` pattern over either.
    An entry that matches no weight layer is a RecipeError naming it (a typo would silently quantize the layer)."""
    chosen: list[str] = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            rx = re.compile(pattern[3:])
            hits = [n for n in nodes if rx.fullmatch(n) or rx.fullmatch(module_name(n))]
        else:
            hits = [n for n in nodes if pattern in (n, module_name(n))]
        if not hits:
            known = ", ".join(sorted({module_name(n) or n for n in nodes})[:8])
            raise RecipeError(f"export.quantize.exclude: {pattern!r} matches no Conv/Gemm/MatMul layer of the "
                              f"exported model.",
                              hint=f"Use module names as `compressor inspect` lists them (e.g. {known}), ONNX node "
                                   "names, or re: patterns.")
        chosen += [h for h in hits if h not in chosen]
    return chosen


# ---------------------------------------------------------------------------------------------- int8
def _reader(samples: np.ndarray, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([samples[i:i + CALIBRATION_BATCH] for i in range(0, len(samples), CALIBRATION_BATCH)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    return Reader()


@dataclass
class Int8Quantizer:
    """Quantizes one fp32 ONNX file again and again (other exclusions, single layers for the sensitivity scan)
    from one calibration: the first call measures the activation ranges, later calls read them from a cache that
    lives as long as this object (never reused for another model or other samples)."""

    fp32_path: Path
    calibration: np.ndarray
    method: str = "minmax"
    per_channel: bool = True
    settings: Int8Settings = field(default_factory=int8_settings)
    _work: Any = None

    def __post_init__(self) -> None:
        import onnx

        if not len(self.calibration):
            raise ExportError("int8 quantization needs calibration samples; export.quantize.calibration.samples "
                              "gave none from the training data.")
        if Path(f"{self.fp32_path}.data").exists():  # export.py's data_file (torch-free here)
            raise ExportError(f"{self.fp32_path.name} is over protobuf's 2 GB limit (its tensors are in "
                              f"{self.fp32_path.name}.data); export.quantize does not handle such models yet.",
                              hint="Set export.quantize.mode: none, or quantize with onnxruntime.quantization "
                                   "directly (use_external_data_format=True).")
        self.model = onnx.load(str(self.fp32_path), load_external_data=False)
        self.input_name = self.model.graph.input[0].name
        self.nodes = weight_nodes(self.model)
        self.tail = float_tail(self.model)
        self._work = tempfile.TemporaryDirectory(prefix="compressor-quant-")
        self._cache = Path(self._work.name) / "ranges.json"
        self._uses_cache = "calibration_cache_path" in inspect.signature(_quantize_static()).parameters

    def close(self) -> None:
        if self._work is not None:
            self._work.cleanup()
            self._work = None

    def quantize(self, out: Path, *, exclude: Iterable[str] = (), only: Optional[Sequence[str]] = None) -> dict:
        """Write the QDQ model to `out` (atomically); `only`: quantize just these nodes (sensitivity scan). The
        nodes after the last weight layers stay in float beside `exclude` (float_tail)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        quantize_static = _quantize_static()
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.method]
        act = QuantType.QInt8 if self.settings.activations == "int8" else QuantType.QUInt8
        extra: dict[str, Any] = {"ActivationSymmetric": self.settings.symmetric_activations}
        kwargs: dict[str, Any] = {}
        if self._uses_cache:
            kwargs["calibration_cache_path"] = str(self._cache)
        exclude = list(exclude)
        out = Path(out)
        with atomic_path(out) as tmp, _quiet():
            try:
                quantize_static(str(self.fp32_path), str(tmp), _reader(self.calibration, self.input_name),
                                quant_format=QuantFormat.QDQ, per_channel=self.per_channel,
                                reduce_range=self.settings.reduce_range, activation_type=act,
                                weight_type=QuantType.QInt8, nodes_to_exclude=(exclude + self.tail) or None,
                                nodes_to_quantize=list(only) if only is not None else None,
                                calibrate_method=method, extra_options=extra, **kwargs)
            except Exception as exc:  # onnxruntime raises many types for models it can not quantize
                raise ExportError(f"int8 quantization of {self.fp32_path.name} failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}).",
                                  hint="Exclude the layer it names with export.quantize.exclude, or use "
                                       "export.quantize.mode: fp16.") from exc
        return {"path": str(out), "mode": "int8", "excluded": exclude, "float_tail": len(self.tail),
                **qdq_summary(out, exclude)}


def _quantize_static():
    from onnxruntime.quantization import quantize_static

    return quantize_static


class _quiet:
    """onnxruntime.quantization logs a line per tensor at INFO and warns about every model it pre-processes."""

    def __enter__(self):
        self.logger = logging.getLogger()
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def qdq_summary(path: Path, excluded: Sequence[str] = ()) -> dict[str, Any]:
    """QuantizeLinear / DequantizeLinear counts and which weight layers read a dequantized weight."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    produced = {o: n for n in model.graph.node for o in n.output}
    quantized = []
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1:
            source = produced.get(node.input[1])
            if source is not None and source.op_type == "DequantizeLinear":
                quantized.append(node.name)
    ops = [n.op_type for n in model.graph.node]
    return {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
            "quantized_layers": quantized, "float_layers": [n for n in weight_nodes(model) if n not in quantized],
            "excluded_but_quantized": [n for n in excluded if n in quantized]}


# ---------------------------------------------------------------------------------------------- fp16
def convert_fp16(fp32_path: Path, out: Path, *, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """FP16 weights and activations, float32 inputs and outputs (keep_io_types), excluded nodes kept in float."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    with _quiet():
        try:
            half = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(exclude) or None)
        except Exception as exc:  # noqa: BLE001 - the converter raises many types
            raise ExportError(f"fp16 conversion of {Path(fp32_path).name} failed ({type(exc).__name__}: {exc}).",
                              hint="Exclude the layer it names with export.quantize.exclude.") from exc
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save(half, str(tmp))
    return {"path": str(out), "mode": "fp16", "excluded": list(exclude), "float_layers": list(exclude)}


# ---------------------------------------------------------------------------------------------- sensitivity
def output_error(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (agreement.py: per sample, or per pixel of a segmentation map) and max abs diff relative to
    max |reference| of two (N, classes, ...) outputs."""
    scale = float(np.abs(reference).max()) or 1.0
    return {"top1_agreement": top1_agreement(reference, candidate),
            "relative_diff": float(np.abs(reference - candidate).max()) / scale}


def rank_sensitivity(quantizer: Int8Quantizer, run, samples: np.ndarray, work: Path) -> list[dict[str, Any]]:
    """Each weight layer quantized alone, its outputs on `samples` compared with fp32: the layers ordered from
    the most to the least harmful (lowest agreement first, then largest relative diff). `run(path, x)` infers."""
    reference = run(quantizer.fp32_path, samples)
    rows = []
    for i, node in enumerate(quantizer.nodes):
        path = work / f"single-{i}.onnx"
        quantizer.quantize(path, only=[node])
        rows.append({"node": node, "module": module_name(node), **output_error(reference, run(path, samples))})
        path.unlink(missing_ok=True)
    return sorted(rows, key=lambda r: (r["top1_agreement"], -r["relative_diff"]))
