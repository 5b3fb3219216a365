"""compressor: structured pruning (DPM, FGGP, OCSP), physical slimming, export, parity and latency reports.

The public API is small and imported lazily, so `compressor bench` of an ONNX file needs no torch:

    from compressor import compress, deploy, load_recipe, load_model
    report = compress("samples/resnet20-fmnist.safetensors", "recipes/resnet20-fmnist-dpm.yaml", "runs/demo")
    report = compress(model=net, example_inputs=batch, train_set=train, val_set=val, loss=my_loss,
                      recipe="recipes/resnet20-fmnist-dpm.yaml", out_dir="runs/mine")   # in-memory objects
    report = deploy(slim_net, batch, "runs/slim", dense_model=dense_net, val_set=val)   # pruned elsewhere

docs/api.md describes the API and its guarantees.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Pruner", "compress", "deploy", "load_model", "load_recipe", "__version__"]


def __getattr__(name: str):
    if name == "compress":
        from compressor.app.pipeline import compress

        return compress
    if name == "deploy":  # the compressor.deploy package, callable as compressor.app.deployment.deploy
        import importlib

        return importlib.import_module("compressor.deploy")
    if name == "Pruner":
        from compressor.pruner import Pruner

        return Pruner
    if name == "load_model":
        from compressor.models.loading import load_model

        return load_model
    if name == "load_recipe":
        from compressor.app.recipe import load_recipe

        return load_recipe
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
