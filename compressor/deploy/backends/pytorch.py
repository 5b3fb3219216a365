"""The eager PyTorch backend (CPU): torch is imported only when a runner is built."""
from __future__ import annotations

from typing import Any

import numpy as np

from compressor.deploy.runners import (BACKENDS, ENGINE_SUFFIXES, ONNX_SUFFIXES, Runner, RunnerOptions, _model_path,
                                       bench_input)
from compressor.errors import UsageError


@BACKENDS.register("torch")
class TorchRunner(Runner):
    """Eager PyTorch on the CPU under inference_mode, with `threads` intra-op threads while it lives.

    A given nn.Module is put in eval mode while benchmarked and back in its former mode on close().
    """

    def __init__(self, model: Any, options: RunnerOptions) -> None:
        import torch

        self.module = _load_torch_model(model, options)
        self.was_training = self.module.training
        self.module.eval()
        self.input_shape = list(options.input_shape)
        self.previous_threads = torch.get_num_threads()
        if options.threads:
            torch.set_num_threads(options.threads)
        self.example = None
        self.pool = options.inputs

    def prepare(self, batch_size: int) -> None:
        import torch

        from compressor.models.hf import HFText

        dtype = np.int64 if isinstance(self.module, HFText) else np.float32  # a text model takes token ids
        self.example = torch.from_numpy(bench_input([batch_size, *self.input_shape], dtype, self.pool))

    def run_once(self) -> None:
        import torch

        with torch.inference_mode():
            self.module(self.example)

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.previous_threads)
        self.module.train(self.was_training)


def _load_torch_model(model: Any, options: RunnerOptions):
    """An nn.Module as given, or loaded from a checkpoint or slim folder via compressor.models.loading."""
    from torch import nn

    given = isinstance(model, nn.Module)
    if not given and _model_path(model).suffix in ONNX_SUFFIXES + ENGINE_SUFFIXES:
        raise UsageError("the torch backend runs PyTorch models (.pt, slim folder); give an .onnx to an ort-* backend.")
    input_shape = options.input_shape
    if input_shape is None:
        raise UsageError("the torch backend needs the input shape of one sample: --input-shape C,H,W.")
    if given:
        return model
    if len(input_shape) not in (1, 3):
        raise UsageError(f"--input-shape must be C,H,W (or a text model's sequence length) for the torch backend, "
                         f"not {','.join(map(str, input_shape))}.")
    from compressor.models.loading import load_model
    from compressor.models.config import ModelConfig

    kind = "tokens" if len(input_shape) == 1 else "image"
    return load_model(model, ModelConfig(arch=None, inputs=kind, input_shape=list(input_shape),
                                         in_channels=input_shape[0] if kind == "image" else 3),
                      trust_checkpoint=options.trust_checkpoint)
