"""Physical slimming support: reshape a freshly built model to a pruned model's widths, save and reload slim models."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from compressor.models.attention import HEAD_SUFFIX, attention_modules, conform_heads, head_count
from compressor.models.layers import is_depthwise


def _resize_tensors(module: nn.Module, prefix: str, state: Mapping[str, torch.Tensor]) -> bool:
    """Give the module's own parameters and buffers the shapes stored in `state`; True if any changed."""
    changed = False
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        key = f"{prefix}{name}"
        if tensor is None or key not in state or state[key].shape == tensor.shape:
            continue
        new = torch.empty(state[key].shape, dtype=tensor.dtype, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            module._buffers[name] = new
        changed = True
    return changed


def fix_attributes(module: nn.Module) -> None:
    """Update the width attributes that forward() and repr() read, after the tensors were resized."""
    if isinstance(module, nn.modules.conv._ConvNd):
        out_ch, in_per_group = module.weight.shape[:2]
        transposed = module.transposed
        if transposed:
            in_per_group, out_ch = out_ch, in_per_group
        if is_depthwise(module) and not transposed and in_per_group == 1:
            module.groups = out_ch
        module.out_channels = out_ch * (module.groups if transposed else 1)
        module.in_channels = in_per_group * (1 if transposed else module.groups)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape


def conform_to_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Resize `model`'s layers in place so `state` (from a pruned copy of the same arch) loads strictly.

    Returns the names of the modules that changed width (attention layers that kept fewer heads included). A decoder
    LM (models/decoder) first loses the layers the state lacks, and its head counts, widths and config follow after.
    """
    from compressor.models.decoder.conform import start_conform

    decoder = start_conform(model, state)
    changed = conform_heads(model, {k: tuple(v.shape) for k, v in state.items()})
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if _resize_tensors(module, prefix, state):
            fix_attributes(module)
            changed.append(name)
    return changed + (decoder.finish() if decoder is not None else [])


# ---------------------------------------------------------------------------------------------- save / load
SLIM_FORMAT = "compressor-slim/1"


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv / linear / norm layer, and the heads of every attention layer whose heads can be
    removed (`<layer>:heads`), by module name."""
    widths = {f"{name}{HEAD_SUFFIX}": head_count(module, family) for name, module, family, _ in attention_modules(model)
              if family is not None}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            widths[name] = module.out_features
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            widths[name] = module.num_features
    return widths


def save_slim(model: nn.Module, out_dir, model_cfg) -> dict[str, str]:
    """Write model.pt (whole module, for torch users), slim.json + weights.safetensors (reload without pickle).

    Every file is written atomically; returns their paths. A model without an architecture reference (model_cfg.arch
    None: the Python API's in-memory model) whose module does not pickle (a class defined inside a function) gets
    no model.pt; its slim.json and weights reload into a fresh instance with load_slim(path, model=...).
    """
    import json
    import pickle
    from pathlib import Path

    from safetensors.torch import save_model

    from compressor.rundir import atomic_path, save_torch, write_text

    out_dir = Path(out_dir)
    model = model.cpu().eval()
    state = model.state_dict()
    with atomic_path(out_dir / "weights.safetensors") as tmp:
        # save_model writes a tensor that several modules share (timm's CoaT reuses one conv) once and records the
        # other names in the file's metadata; load_slim restores them
        save_model(model, str(tmp), force_contiguous=True)
    meta = {"format": SLIM_FORMAT, "arch": model_cfg.arch, "num_classes": model_cfg.num_classes,
            "in_channels": model_cfg.in_channels, "inputs": model_cfg.inputs, "input_shape": list(model_cfg.input_shape),
            "widths": layer_widths(model), "shapes": {k: list(v.shape) for k, v in state.items()}}
    write_text(out_dir / "slim.json", json.dumps(meta, indent=1) + "\n")
    saved = {"slim_json": str(out_dir / "slim.json"), "weights": str(out_dir / "weights.safetensors")}
    try:
        save_torch(model, out_dir / "model.pt")
    except (pickle.PicklingError, AttributeError, TypeError):
        if model_cfg.arch is not None:
            raise
        return saved
    return {"model_pt": str(out_dir / "model.pt"), **saved}


def load_slim(path, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild a slim model from slim.json (arch + shapes) and weights.safetensors, without unpickling.

    `model`: a fresh instance of the dense architecture to load into instead of building slim.json's reference; the
    way to reload a run of the Python API's compress(model=...), whose slim.json records no reference (its layers
    are resized to the recorded shapes, then the weights are loaded strictly).
    """
    import json
    from pathlib import Path

    from compressor.errors import ModelLoadError
    from compressor.models.loading import build_arch, load_state_dict_strict

    path = Path(path)
    meta_path = path / "slim.json" if path.is_dir() else path
    weights = meta_path.parent / "weights.safetensors"
    if not meta_path.is_file():
        raise ModelLoadError(f"{path} is not a slim model: {meta_path} is missing.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{meta_path} is not valid JSON ({exc}).") from exc
    if meta.get("format") != SLIM_FORMAT:
        raise ModelLoadError(f"{meta_path} has format {meta.get('format')!r}; expected {SLIM_FORMAT}.")
    if not meta.get("arch") and model is None:
        raise ModelLoadError(f"{meta_path} records no architecture reference (the model came from a pickled module "
                             "or from the Python API).",
                             hint=f"Load {meta_path.parent / 'model.pt'} with --trust-checkpoint instead, or in Python "
                                  "pass a fresh instance of the model: load_slim(path, model=MyModel()).")
    if not weights.is_file():
        raise ModelLoadError(f"{weights} is missing next to {meta_path}.")
    arch = meta.get("arch") or type(model).__qualname__
    if model is None:
        model = build_arch(meta["arch"], meta["num_classes"], meta["in_channels"])
    conform_to_state_dict(model, {k: torch.empty(shape, device="meta") for k, shape in meta["shapes"].items()})
    load_state_dict_strict(model, _read_weights(weights), arch)
    return model.eval()


def _read_weights(path) -> dict:
    """weights.safetensors as a state dict, with the shared tensors that save_model wrote once (metadata: alias ->
    stored name) under each of their names again."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = f.metadata() or {}
    state.update({alias: state[name] for alias, name in aliases.items() if name in state and alias not in state})
    return state


def read_model_config(path):
    """The ModelConfig recorded in a slim model's slim.json, or None when `path` is not a slim model."""
    import json
    from pathlib import Path

    from compressor.models.config import ModelConfig

    path = Path(path)
    meta_path = path / "slim.json" if path.is_dir() else path
    if meta_path.name != "slim.json" or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return ModelConfig(arch=meta.get("arch"), num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                       inputs=meta.get("inputs", "image"), input_shape=meta["input_shape"])
