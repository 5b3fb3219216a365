"""TensorRT engine builds from the exported ONNX (TensorRT 10 and 11 Python API).

Two ways to reduced precision. Explicit (TensorRT 10 and 11): the engine is built from the quantized ONNX that
export.quantize wrote (model.int8.onnx in QDQ form, or model.fp16.onnx) as a strongly typed network, so the
precision of every layer is the ONNX file's. Implicit (TensorRT 10 only; deprecated there and removed in 11): the
FP16 / INT8 builder flags with an entropy calibrator over training samples.

The build configuration (profile shapes, flags, network flags, workspace) is a pure function of the recipe and CLI
options, tested without a GPU. The build writes the engine, the build log and the builder's per-layer information
next to the ONNX.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from compressor.deploy.tensorrt_runtime import require_tensorrt, tensorrt_missing
from compressor.errors import ExportError
from compressor.rundir import atomic_path, write_json, write_text


def tensorrt_available() -> tuple[bool, str]:
    """(True, '') when an engine can be built and run here, else (False, what is missing)."""
    missing = tensorrt_missing()
    return (not missing, "" if not missing else "this machine lacks " + ", ".join(missing))


@dataclass(frozen=True)
class EngineSettings:
    """Everything the builder is configured with."""

    input_name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    flags: tuple[str, ...]  # names of trt.BuilderFlag members
    workspace_bytes: int
    calib_samples: int = 0
    precision: str = "fp32"  # the lowest precision allowed: fp32, fp16 or int8 (sets parity tolerances)
    strongly_typed: bool = False  # built from a quantized ONNX: precisions come from the file, no precision flags


def engine_settings(input_shape: Sequence[int], batch_sizes: Sequence[int], *, fp16: bool = False,
                    int8_calib: int = 0, sparse: bool = False, workspace_gb: float = 4.0,
                    input_name: str = "input", quantized: Optional[str] = None) -> EngineSettings:
    """Profile over the batch sizes (min 1, median as opt, max) and the builder flags for the precision options.
    The profile starts at batch 1 so that every batch verify_engine infers (the last one holds the remainder) and
    every bench batch lies inside it. `quantized` ("int8" / "fp16"): the ONNX is export.quantize's file, built
    strongly typed with no precision flags (fp16 / int8_calib are then ignored)."""
    if not batch_sizes or any(b <= 0 for b in batch_sizes):
        raise ExportError(f"TensorRT batch sizes must be positive, got {list(batch_sizes)}.")
    batches = sorted(set(int(b) for b in batch_sizes))
    sample = tuple(int(d) for d in input_shape)
    flags = []
    if fp16 and not quantized:
        flags.append("FP16")
    if int8_calib and not quantized:
        flags.append("INT8")
    if sparse:
        flags.append("SPARSE_WEIGHTS")
    precision = quantized or ("int8" if int8_calib else "fp16" if fp16 else "fp32")
    return EngineSettings(input_name=input_name, min_shape=(1, *sample),
                          opt_shape=(batches[(len(batches) - 1) // 2], *sample), max_shape=(batches[-1], *sample),
                          flags=tuple(flags), workspace_bytes=int(workspace_gb * (1 << 30)),
                          calib_samples=0 if quantized else int(int8_calib), precision=precision,
                          strongly_typed=bool(quantized))


def profile_covers(settings: EngineSettings, batches: Sequence[int]) -> bool:
    """Whether every batch size lies within the optimisation profile."""
    return all(settings.min_shape[0] <= b <= settings.max_shape[0] for b in batches)


def inference_batches(count: int, max_batch: int) -> list[int]:
    """The batch sizes TrtEngine.infer runs `count` samples in (chunks of `max_batch`, then the remainder)."""
    return [min(max_batch, count - i) for i in range(0, count, max_batch)]


def network_flags(trt, settings: EngineSettings) -> int:
    """create_network()'s flags: STRONGLY_TYPED for a quantized ONNX (TensorRT 11 is always strongly typed and
    keeps the flag for compatibility)."""
    if not settings.strongly_typed:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def check_builder_flags(trt, settings: EngineSettings) -> None:
    """ExportError when the settings need builder flags this TensorRT does not have (11 removed FP16 and INT8)."""
    missing = [f for f in settings.flags if not hasattr(trt.BuilderFlag, f)]
    if missing:
        raise ExportError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no {', '.join(missing)} builder flag (TensorRT 11 "
            "removed the implicit-precision flags and the INT8 calibrators).",
            hint="Quantize the ONNX instead: export.quantize.mode: int8 (or fp16); the engine is then built from "
                 "model.int8.onnx / model.fp16.onnx as a strongly typed network.")


def settings_from_recipe(recipe, *, fp16: Optional[bool] = None, int8_calib: Optional[int] = None,
                         sparse: Optional[bool] = None, batch_sizes: Optional[Sequence[int]] = None,
                         quantized: Optional[str] = None) -> EngineSettings:
    """Recipe export.tensorrt values, each overridable from the CLI; batches default to the bench batch sizes.
    `quantized`: the engine is built from export.quantize's file of that mode."""
    cfg = recipe.export.tensorrt
    calib = int8_calib if int8_calib is not None else (cfg.calib_samples if cfg.int8 else 0)
    return engine_settings(recipe.model.input_shape, batch_sizes or recipe.bench.batch_sizes,
                           fp16=cfg.fp16 if fp16 is None else fp16, int8_calib=calib,
                           sparse=cfg.sparse if sparse is None else sparse, workspace_gb=cfg.workspace_gb,
                           quantized=quantized)


def parser_errors(parser) -> list[str]:
    """The ONNX parser's errors, each with the node name and operator when TensorRT reports them."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = getattr(error, "node_name", lambda: "")() or f"#{error.node()}"
        op = getattr(error, "node_operator", lambda: "")()
        lines.append(f"node {node}{f' ({op})' if op else ''}: {error.desc()}")
    return lines


def _calibrator(trt, batches: list[np.ndarray], cache: Path):
    """An entropy calibrator feeding the given float32 batches through device memory."""
    from compressor.deploy.tensorrt_runtime import _check, _cudart

    cudart = _cudart()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches, self.index = batches, 0
            self.device = _check(cudart.cudaMalloc(max(b.nbytes for b in batches)))

        def get_batch_size(self) -> int:
            return int(batches[0].shape[0])

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            batch = np.ascontiguousarray(self.batches[self.index], dtype=np.float32)
            _check(cudart.cudaMemcpy(self.device, batch.ctypes.data, batch.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            self.index += 1
            return [int(self.device)]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data) -> None:
            cache.write_bytes(bytes(data))

        def free(self) -> None:
            """Release the device buffer (after the build; the calibrator is not used again)."""
            if self.device is not None:
                _check(cudart.cudaFree(self.device))
                self.device = None

    return EntropyCalibrator()


def calibration_batches(calibration: np.ndarray, opt_batch: int) -> list[np.ndarray]:
    """Calibration input cut into batches of the profile's opt size, or into one batch of all samples when there
    are fewer (a calibration batch may be anything within the profile; an empty list crashed the build). Samples
    that do not fill a last batch are left out."""
    if not len(calibration):
        return []
    batch = max(1, min(int(opt_batch), len(calibration)))
    return [calibration[i:i + batch] for i in range(0, len(calibration) - batch + 1, batch)]


def calibration_cache_path(engine_path: Path, onnx_path: Path, batches: list[np.ndarray]) -> Path:
    """The calibration cache of exactly this model and these samples: its name carries a hash of both, so a
    cache written for another model or other samples is never read back (it was, silently)."""
    digest = hashlib.sha256(Path(onnx_path).read_bytes())
    for b in batches:
        digest.update(np.ascontiguousarray(b, dtype=np.float32).tobytes())
    return engine_path.with_name(f"{engine_path.stem}.calib-{digest.hexdigest()[:16]}.cache")


def build_engine(onnx_path: str | Path, settings: EngineSettings, engine_path: str | Path,
                 calibration: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Build and serialize an engine; writes ENGINE, ENGINE.build.log and ENGINE.layers.json."""
    require_tensorrt("a TensorRT engine build")
    import tensorrt as trt

    engine_path = Path(engine_path)
    log: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            log.append(f"[{severity.name}] {msg}")

    logger = Logger()
    check_builder_flags(trt, settings)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, settings))  # always explicit-batch since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ExportError(f"the TensorRT ONNX parser rejected {onnx_path}: " + "; ".join(parser_errors(parser)))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in settings.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, settings.min_shape, settings.opt_shape, settings.max_shape)
    config.add_optimization_profile(profile)
    if "INT8" in settings.flags:
        if calibration is None or not len(calibration):
            raise ExportError("INT8 needs calibration samples from the recipe's data (--int8-calib N).")
        chunks = calibration_batches(calibration, settings.opt_shape[0])
        calibrator = _calibrator(trt, chunks, calibration_cache_path(engine_path, Path(onnx_path), chunks))
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if "INT8" in settings.flags:
            calibrator.free()
    write_text(engine_path.with_suffix(".build.log"), "\n".join(log) + "\n")
    if serialized is None:
        errors = [line for line in log if line.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
        raise ExportError(f"TensorRT could not build an engine from {onnx_path}: {'; '.join(errors[-3:]) or 'see the build log'}.")
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    layers = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    write_json(engine_path.with_suffix(".layers.json"), json.loads(layers))
    return {"status": "built", "path": str(engine_path), "bytes": engine_path.stat().st_size,
            "tensorrt_version": trt.__version__, "settings": asdict(settings),
            "build_log": str(engine_path.with_suffix(".build.log")),
            "layers": str(engine_path.with_suffix(".layers.json"))}


def verify_engine(engine_path: str | Path, reference: np.ndarray, inputs: np.ndarray, recipe_verify, precision: str,
                  max_batch: int):
    """Engine outputs vs the PyTorch outputs with the tolerance of the engine's precision, inferred in batches the
    engine's optimisation profile accepts (at most `max_batch`; it inferred at 32 and failed on profiles up to 8)."""
    from compressor.deploy.tensorrt_runtime import TrtEngine
    from compressor.deploy.verify import check, compare_outputs

    engine = TrtEngine(engine_path)
    try:
        outputs = engine.infer(inputs.astype(np.float32), batch_size=max_batch)
    finally:
        engine.close()
    return check(compare_outputs(reference, outputs), recipe_verify, f"TensorRT {Path(engine_path).name}",
                 precision=precision)


def build_and_verify(model, onnx_path: Path, samples, recipe, settings: Optional[EngineSettings] = None,
                     calibration=None) -> dict[str, Any]:
    """`compress` and `export --format tensorrt`: build next to the ONNX (INT8 calibrated on `calibration`,
    training samples), then check parity on the real validation `samples`."""
    from compressor.deploy.verify import torch_outputs

    settings = settings or settings_from_recipe(recipe)
    inputs = samples.numpy().astype(np.float32)
    engine_path = Path(onnx_path).with_suffix(".engine")
    calib = calibration.numpy().astype(np.float32) if calibration is not None else None
    info = build_engine(onnx_path, settings, engine_path, calibration=calib)
    info["parity"] = verify_engine(engine_path, torch_outputs(model, samples), inputs, recipe.verify, settings.precision,
                                   max_batch=settings.max_shape[0])
    return info
