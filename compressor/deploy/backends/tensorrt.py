"""The native TensorRT backend: serialized engines (.engine / .plan), no torch."""
from __future__ import annotations

from typing import Any

from compressor.deploy.runners import BACKENDS, ENGINE_SUFFIXES, Runner, RunnerOptions, _model_path, bench_input
from compressor.deploy.tensorrt_runtime import require_tensorrt
from compressor.errors import UsageError


@BACKENDS.register("tensorrt")
class TensorRTRunner(Runner):
    """A native TensorRT engine (.engine/.plan): host latency per run (H2D + compute + D2H, like trtexec's
    latency), with the GPU compute time of each run in `gpu_ms`. No torch import."""

    gpu = True

    @classmethod
    def require(cls) -> None:
        require_tensorrt()

    def __init__(self, model: Any, options: RunnerOptions) -> None:
        from compressor.deploy.tensorrt_runtime import TrtEngine

        require_tensorrt()  # a missing runtime or GPU is the first thing to report (exit 3)
        path = _model_path(model)
        if path.suffix not in ENGINE_SUFFIXES:
            raise UsageError(f"backend tensorrt runs serialized engines (.engine, .plan), not {path.name!r}; build one "
                             "with `compressor export MODEL --format tensorrt`, or use --backend ort-trt for .onnx.")
        self.engine = TrtEngine(path)
        self.input_shape = options.input_shape
        self.gpu_ms = self.engine.gpu_ms
        self.pool = options.inputs

    def prepare(self, batch_size: int) -> None:
        sample = self.input_shape or tuple(self.engine.input_shape()[1:])
        if any(int(d) <= 0 for d in sample):
            raise UsageError("the engine's input has dynamic dims besides the batch; give --input-shape C,H,W.")
        self.engine.prepare(bench_input([batch_size, *sample], pool=self.pool))

    def run_once(self) -> None:
        self.engine.run()

    def close(self) -> None:
        self.engine.close()
