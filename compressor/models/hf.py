"""`hf:DIR`: a Hugging Face `save_pretrained` directory as a model reference (the `[hf]` extra installs
transformers). Nothing is downloaded: the directory must hold config.json and the weights.

Image classification models (ViT, DeiT, ... : a config with `image_size` / `num_channels`) load through
AutoModelForImageClassification and are wrapped so that the pipeline calls them on one pixel tensor and gets
logits, as every other model. Text models need token inputs and a text data kind, which are not built yet: they
are a usage error that says so.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from compressor.errors import BackendUnavailable, ModelLoadError, UsageError


class HFLogits(nn.Module):
    """A Hugging Face model called with one keyword input, returning its logits."""

    def __init__(self, model: nn.Module, argument: str = "pixel_values") -> None:
        super().__init__()
        self.model, self.argument = model, argument

    def forward(self, x):
        return self.model(**{self.argument: x}).logits


def load_hf(directory: str, num_classes: int, in_channels: int) -> nn.Module:
    """The model in `directory` (config.json + weights), wrapped to return logits; ModelLoadError naming the file
    or recipe field that does not fit."""
    try:
        import transformers
    except ImportError:
        raise BackendUnavailable("hf: model references need transformers.",
                                 hint="pip install 'compressor[hf]' (or pip install transformers).") from None
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"hf:{directory}: {path / 'config.json'} does not exist; hf:DIR takes a directory written "
                             "by save_pretrained (config.json and model.safetensors), nothing is downloaded.")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"hf:{directory}: config.json is not a Hugging Face model config "
                             f"({type(exc).__name__}: {exc}).") from None
    if not hasattr(config, "num_channels") or not hasattr(config, "image_size"):
        raise UsageError(f"hf:{directory} is a {type(config).__name__.removesuffix('Config')} text model: text "
                         "inputs and a text data kind are not supported yet, only image classification models "
                         "(ViT, DeiT, ...).")
    problems = []
    if int(config.num_labels) != int(num_classes):
        problems.append(f"model.num_classes is {num_classes}, the model's config.json has num_labels "
                        f"{config.num_labels}")
    if int(config.num_channels) != int(in_channels):
        problems.append(f"model.in_channels is {in_channels}, the model's config.json has num_channels "
                        f"{config.num_channels}")
    if problems:
        raise ModelLoadError(f"hf:{directory}: " + "; ".join(problems) + ".",
                             hint="Set model.num_classes / model.in_channels in the recipe to the model's values.")
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"hf:{directory}: the weights do not load ({type(exc).__name__}: {exc}).") from None
    return HFLogits(model.eval(), "pixel_values")
