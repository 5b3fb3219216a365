"""Deployment: ONNX export, parity checks against PyTorch, TensorRT engines and their checks, the latency bench
(interleaved dense vs compressed, any runtime; runs without torch for ONNX and engines), ONNX Runtime profiles and
the hardware facts the planner needs. It imports nothing from prune, train or app at module level.

The package is also the Python API's `compressor.deploy(slim_model, example_inputs, out, ...)`: calling it runs
`compressor.app.deployment.deploy` (imported on the call), so that the name works whether or not this package was
imported before (a submodule import binds `compressor.deploy` to the package, which a plain function could not
survive).
"""
from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from compressor.app.deployment import deploy

        return deploy(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
