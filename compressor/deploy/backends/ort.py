"""ONNX Runtime backends: ort-cpu, ort-cuda and ort-trt, each on exactly the provider it names."""
from __future__ import annotations

from typing import Any

import numpy as np

from compressor.deploy.onnx_runtime import model_input, require_provider
from compressor.deploy.runners import (BACKENDS, ONNX_SUFFIXES, Runner, RunnerOptions, _model_path,
                                       _onnx_input_shape, bench_input, open_onnx_session)
from compressor.errors import UsageError


class OrtRunner(Runner):
    """An ONNX Runtime session on exactly the provider its backend names (ort-cpu, ort-cuda, ort-trt)."""

    backend = "ort-cpu"

    @classmethod
    def require(cls) -> None:
        require_provider(cls.backend)

    def __init__(self, model: Any, options: RunnerOptions) -> None:
        backend = self.backend
        path = _model_path(model)
        if path.suffix not in ONNX_SUFFIXES:
            raise UsageError(f"backend {backend} runs .onnx files, not {path.name!r}; "
                             "use --backend torch for PyTorch models.")
        self.name, self.input_shape = backend, options.input_shape
        self.session = open_onnx_session(path, backend, threads=options.threads, fp16=options.fp16,
                                         cache_dir=options.cache_dir, profile_prefix=options.profile_prefix,
                                         spinning=options.spinning)
        self.input, self.dtype = model_input(self.session, repr(path.name))
        self.feed: dict[str, np.ndarray] = {}
        self.pool = options.inputs

    def prepare(self, batch_size: int) -> None:
        tokens = np.issubdtype(self.dtype, np.integer)  # a text model: [batch, sequence] ids
        shape = _onnx_input_shape(self.input.shape, batch_size, self.input_shape,
                                  "128 (the sequence length of the token ids)" if tokens else "3,224,224")
        self.feed = {self.input.name: bench_input(shape, self.dtype, self.pool)}

    def run_once(self) -> None:
        self.session.run(None, self.feed)

    def close(self) -> None:
        self.session = None


for _backend in ("ort-cpu", "ort-cuda", "ort-trt"):
    BACKENDS.register(_backend)(type(f"OrtRunner[{_backend}]", (OrtRunner,),
                                     {"backend": _backend, "gpu": _backend != "ort-cpu"}))
