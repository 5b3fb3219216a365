"""Build architectures from references and load checkpoints safely (spec: docs/models.md).

A reference is `scheme:id` (zoo:resnet20, torchvision:resnet18, timm:NAME, python:pkg.mod:factory) and builds a
randomly initialised model, or hf:DIR, a Hugging Face save_pretrained directory with its weights (models/hf.py);
nothing is ever downloaded. A checkpoint file is a state dict (.pt/.pth/.bin or
.safetensors), a pickled nn.Module (only with --trust-checkpoint) or a slim model (directory or slim.json).
"""
from __future__ import annotations

import importlib
import inspect
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compressor.errors import BackendUnavailable, ModelLoadError, UsageError
from compressor.models.config import ModelConfig
from compressor.models.zoo import ZOO
from compressor.registry import did_you_mean
from compressor.tokens import TOKEN_ID_RANGE

SCHEMES = ("zoo", "torchvision", "timm", "python", "hf", "ultralytics")
ACCEPTED_FORMS = "zoo:NAME, torchvision:NAME, timm:NAME, python:pkg.module:factory, hf:DIR or ultralytics:NAME.yaml"
CONTAINER_KEYS = ("state_dict", "model", "module", "model_ema", "state_dict_ema", "ema")  # ema: Ultralytics' last.pt
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ARCH_HINT = "Check model.arch, model.num_classes and model.in_channels in the recipe."


def is_reference(text: str) -> bool:
    """True when `text` starts with one of the reference schemes (zoo:, torchvision:, timm:, python:, hf:)."""
    return any(text.startswith(f"{scheme}:") for scheme in SCHEMES)


ARCH_SEED = 0  # a reference without weights builds the same model whatever ran before


def build_arch(ref: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build a randomly initialised model from a `scheme:id` reference: initialised from torch's generator seeded
    with ARCH_SEED (the caller's random state is left as it was), so a run on a reference alone is repeatable."""
    scheme, sep, name = ref.partition(":")
    builders: dict[str, Callable[[str, int, int], nn.Module]] = {
        "zoo": _build_zoo,
        "torchvision": _build_torchvision,
        "timm": _build_timm,
        "python": _build_python,
        "hf": _build_hf,
        "ultralytics": _build_ultralytics,
    }
    if not sep or scheme not in builders or not name:
        raise ModelLoadError(f"model reference {ref!r} is not understood; use {ACCEPTED_FORMS}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ARCH_SEED)
        return builders[scheme](name, num_classes, in_channels)


def _build_hf(directory: str, num_classes: int, in_channels: int) -> nn.Module:
    from compressor.models.hf import load_hf

    return load_hf(directory, num_classes, in_channels)


def _build_ultralytics(name: str, num_classes: int, in_channels: int) -> nn.Module:
    from compressor.models.yolo import build_yolo

    return build_yolo(name, num_classes, in_channels)


def _build_zoo(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if name not in ZOO:
        raise ModelLoadError(
            f"unknown zoo model {name!r}{did_you_mean(name, tuple(ZOO))}; known: {', '.join(sorted(ZOO))}."
        )
    return ZOO[name](num_classes=num_classes, in_channels=in_channels)


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models.segmentation):
        from compressor.models.segmenters import build_torchvision_segmenter

        return build_torchvision_segmenter(name, num_classes, in_channels)
    if name in torchvision.models.list_models(module=torchvision.models.detection):
        from compressor.models.detectors import build_torchvision_detector

        return build_torchvision_detector(name, num_classes, in_channels)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ModelLoadError(
            f"unknown torchvision classification model {name!r}{did_you_mean(name, known)}.",
            hint="See torchvision.models.list_models(module=torchvision.models) for the names.",
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, f"torchvision:{name}")
    return model


def _replace_first_conv(model: nn.Module, in_channels: int, ref: str) -> None:
    """Swap the first Conv2d (in module order) for one taking `in_channels` inputs, other settings kept."""
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = qualname.rpartition(".")
            new = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=module.groups,
                bias=module.bias is not None, padding_mode=module.padding_mode,
            )
            setattr(model.get_submodule(parent_name), attr, new)
            return
    raise ModelLoadError(f"{ref} has no Conv2d layer, so in_channels={in_channels} cannot be applied.")


def _build_timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelLoadError(
            f"timm:{name} needs timm, which is not installed; install the [timm] extra: pip install -e '.[timm]'"
        ) from exc
    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}.")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def _build_python(target: str, num_classes: int, in_channels: int) -> nn.Module:
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"python:{target} is not understood; use python:pkg.module:factory.")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot import module {module_name!r} for python:{target} ({type(exc).__name__}: {exc}).",
            hint="Put the directory that holds it on PYTHONPATH.",
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"module {module_name!r} has no callable {attr!r}.")
    kwargs = _accepted_kwargs(factory, {"num_classes": num_classes, "in_channels": in_channels})
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"python:{target} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"python:{target} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def _accepted_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of `kwargs` that `fn` accepts by name (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def load_model(checkpoint: str | Path, model_cfg: ModelConfig, *, trust_checkpoint: bool = False) -> nn.Module:
    """Load a model from a reference, a state dict, a pickled module or a slim model, then check it before any work
    (ModelLoadError, exit 2): every weight finite, and one forward pass on model.input_shape."""
    model = _load(checkpoint, model_cfg, trust_checkpoint)
    check_finite(model, str(checkpoint))
    check_forward(model, model_cfg, str(checkpoint))
    return model


def check_finite(model: nn.Module, label: str) -> None:
    """ModelLoadError naming the parameters and buffers that hold NaN or infinite values (a checkpoint saved
    after its training diverged): training on them stops at its first step with a NaN loss."""
    bad = [(name, t) for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return
    shown = "; ".join(f"{name} ({int(t.isnan().sum())} NaN, {int(t.isinf().sum())} infinite of {t.numel()})"
                      for name, t in bad[:5]) + ("; ..." if len(bad) > 5 else "")
    raise ModelLoadError(f"{label}: {len(bad)} weight tensor(s) hold NaN or infinite values: {shown}.",
                         hint="Use a checkpoint saved before its training diverged, or repair these tensors; "
                              "fine-tuning cannot start from them.")


def check_forward(model: nn.Module, model_cfg: ModelConfig, label: str) -> None:
    """One forward pass (eval mode, no gradients) on example_inputs(model_cfg): ModelLoadError naming
    model.input_shape when the model's own code fails on it, or when it returns no tensor of class scores."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_inputs(model_cfg))
    except Exception as exc:  # whatever the model's own code raises on an input it cannot take
        raise ModelLoadError(
            f"{label} fails on one input of model.input_shape {list(model_cfg.input_shape)} (model.inputs "
            f"{model_cfg.inputs}): {type(exc).__name__}: {' '.join(str(exc).split())[:300]}.",
            hint="Set model.input_shape (and model.in_channels) to the input the model takes: [C, H, W] of its "
                 "images, or [sequence length] of its token ids.") from None
    finally:
        model.train(was_training)
    tensors = isinstance(out, torch.Tensor) or (isinstance(out, tuple) and getattr(model, "output_names", None)
                                                and all(isinstance(o, torch.Tensor) for o in out))
    if not tensors:  # a detector wrapper (compressor/models) returns its named raw head tensors as a tuple
        raise ModelLoadError(f"{label} returns a {type(out).__name__}, not a tensor of class scores; compressor "
                             "trains, exports and verifies models whose forward returns one [batch, classes] tensor.",
                             hint="Wrap the model so that forward returns its logits (e.g. output['out']) and load "
                                  "it with python:pkg.module:factory.")


def _load(checkpoint: str | Path, model_cfg: ModelConfig, trust_checkpoint: bool) -> nn.Module:
    path = Path(checkpoint)
    if isinstance(checkpoint, str) and is_reference(checkpoint) and not path.is_file():
        model = build_arch(checkpoint, model_cfg.num_classes, model_cfg.in_channels)
        if checkpoint.startswith("hf:"):
            from compressor.models.hf import check_inputs

            check_inputs(model, checkpoint, model_cfg.inputs, model_cfg.input_shape, model_cfg.num_classes)
        return model
    if not path.exists():
        scheme = re.match(r"([A-Za-z][\w.+-]*):", str(checkpoint))
        if scheme and len(scheme.group(1)) > 1 and scheme.group(1) not in SCHEMES:  # not a Windows drive letter
            raise ModelLoadError(f"{str(checkpoint)!r} is neither a checkpoint file nor a model reference: unknown "
                                 f"scheme {scheme.group(1)!r}{did_you_mean(scheme.group(1), SCHEMES)}.",
                                 hint=f"A model reference takes the form {ACCEPTED_FORMS}.")
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist.")
    if path.is_dir() or path.name == "slim.json":
        from compressor.models.slim import load_slim

        return load_slim(path)
    if path.suffix == ".safetensors":
        return _from_object(_load_safetensors(path), model_cfg)
    return _from_object(_torch_load(path, trust_checkpoint), model_cfg)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not a readable safetensors file ({exc}).") from exc


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive: a zip holding `*/constants.pkl` or a `*/code/` folder."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return any(name.split("/")[1:2] in (["constants.pkl"], ["code"]) for name in names)


def _torch_load(path: Path, trust_checkpoint: bool) -> Any:
    """torch.load with weights_only=True; pickled objects only when the user trusts the file."""
    if _is_torchscript(path):
        raise ModelLoadError(
            f"{str(path)!r} is a TorchScript archive; TorchScript models cannot be pruned (their graph is "
            "frozen); save the eager model's state_dict instead."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # the safe unpickler refuses a class it does not know ("Unsupported global"): a pickled object; any other
        # refusal (an unknown opcode, truncated data) means the bytes are not a pickle at all
        if not str(exc).startswith("Weights only load failed") or "Unsupported global" not in str(exc):
            raise _corrupt(path, exc) from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    if not trust_checkpoint:
        raise ModelLoadError(
            f"{str(path)!r} holds a pickled Python object (such as a whole nn.Module), not just tensors; "
            "unpickling it runs arbitrary code.",
            hint="Pass --trust-checkpoint only if the file comes from a trusted source, "
            "or save the model's state_dict instead.",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(
            f"{str(path)!r} could not be unpickled ({type(exc).__name__}: {exc}).",
            hint="The classes it was saved with must be importable here; a state_dict avoids this.",
        ) from exc


def _corrupt(path: Path, exc: Exception) -> ModelLoadError:
    text = str(exc).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail:
        reason = detail.group(1).strip()
    elif text.startswith("Weights only load failed"):
        reason = "unreadable pickle data"
    else:
        reason = text.splitlines()[0] if text else type(exc).__name__
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return ModelLoadError(f"{str(path)!r} is not a PyTorch checkpoint ({reason}); the file is damaged or of another "
                          "kind.", hint="Give a .pt/.pth/.bin state dict, a .safetensors file or a slim model folder.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _from_object(obj: Any, model_cfg: ModelConfig) -> nn.Module:
    """Turn what a checkpoint held (module, state dict or container dict) into a model."""
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next(
            (obj[k] for k in CONTAINER_KEYS if _is_state_dict(obj.get(k)) or isinstance(obj.get(k), nn.Module)),
            None,
        )
        if inner is None:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise ModelLoadError(f"the checkpoint is a dict without a state dict (keys: {keys}).")
        obj = inner
    if isinstance(obj, nn.Module):
        return _wrapped(obj)
    if not isinstance(obj, dict):
        raise ModelLoadError(f"the checkpoint holds a {type(obj).__name__}, not a model or a state dict.")
    if model_cfg.arch is None:
        raise ModelLoadError("a state dict needs model.arch in the recipe (e.g. zoo:resnet20).")
    model = build_arch(model_cfg.arch, model_cfg.num_classes, model_cfg.in_channels)
    load_state_dict_strict(model, strip_prefixes(obj), model_cfg.arch)
    return model


def _wrapped(module: nn.Module) -> nn.Module:
    """A pickled torchvision segmentation model (its forward returns a dict) as one returning its logits tensor; an
    Ultralytics checkpoint's DetectionModel as a YOLODetector (models/yolo.py)."""
    from compressor.models.segmenters import is_torchvision_segmenter, wrap_segmenter

    if type(module).__module__.startswith("ultralytics."):
        from compressor.models.yolo import wrap_ultralytics

        return wrap_ultralytics(module)

    return wrap_segmenter(module) if is_torchvision_segmenter(module) else module


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading `module.` (DataParallel) and `_orig_mod.` (torch.compile) prefixes, in any combination."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _listing(label: str, items: list[str]) -> str:
    """'3 missing keys: a, b, c', showing the first 8 items."""
    shown = ", ".join(items[:8]) + (", ..." if len(items) > 8 else "")
    return f"{len(items)} {label}: {shown}"


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    """Load strictly; on any mismatch raise ModelLoadError naming the keys and shapes involved."""
    expected = model.state_dict()
    mismatched = {
        k: f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    }
    result = model.load_state_dict({k: v for k, v in state_dict.items() if k not in mismatched}, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched]
    problems = []
    if missing:
        problems.append(_listing("missing keys", missing))
    if result.unexpected_keys:
        problems.append(_listing("unexpected keys", result.unexpected_keys))
    if mismatched:
        problems.append(_listing("shape mismatches", list(mismatched.values())))
    if problems:
        raise ModelLoadError(f"the state dict does not fit {arch}: {'; '.join(problems)}.", hint=ARCH_HINT)


DEVICE_FORMS = "cpu, cuda or cuda:N"


def check_device(device: str) -> str:
    """`--device` before any work: UsageError for a name other than cpu/cuda/cuda:N, BackendUnavailable (exit 3)
    when the CUDA GPU asked for is not there. Returns the device string."""
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device.strip())
    if not match:
        raise UsageError(f"--device {device!r} is not understood; use {DEVICE_FORMS}.")
    if match.group(1) == "cpu":
        return device
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device} was asked for but PyTorch sees no CUDA GPU.",
                                 hint="Use --device cpu, or install a CUDA build of PyTorch on a GPU machine.")
    index, count = int(match.group(2) or 0), torch.cuda.device_count()
    if index >= count:
        raise BackendUnavailable(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                 f"cuda:{count - 1}.", hint="Pick one of those, or set CUDA_VISIBLE_DEVICES.")
    return device


def example_inputs(model_cfg: ModelConfig, batch: int = 1) -> torch.Tensor:
    """A reproducible random input batch drawn with seed 0: (batch, C, H, W) floats, or for inputs: tokens
    (batch, sequence) int64 token ids in [0, TOKEN_ID_RANGE) (compressor/tokens.py)."""
    generator = torch.Generator().manual_seed(0)
    if model_cfg.inputs == "tokens":
        return torch.randint(0, TOKEN_ID_RANGE, (batch, *model_cfg.input_shape), generator=generator)
    return torch.randn((batch, *model_cfg.input_shape), generator=generator)
