"""`hf:DIR`: a Hugging Face `save_pretrained` directory as a model reference (the `[hf]` extra installs
transformers). Nothing is downloaded: the directory must hold config.json and the weights.

Image classification models (ViT, DeiT, ... : a config with `image_size` / `num_channels`) load through
AutoModelForImageClassification and are wrapped so that the pipeline calls them on one pixel tensor and gets
logits, as every other model. Text models (BERT, RoBERTa, DistilBERT, ...) load through
AutoModelForSequenceClassification: a directory saved from a *ForSequenceClassification model keeps its head; a
bare encoder (BertModel, a sentence-transformers directory) gets a new, randomly initialised classification head
with model.num_classes outputs (fine-tune it on labelled text). They are wrapped to take one int64 tensor of token
ids (model.inputs: tokens); the attention mask is derived inside as `input_ids != pad_token_id`, so the exported
ONNX has one input and right-padded batches give the same logits as unpadded text.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from torch import nn

from compressor.errors import BackendUnavailable, ModelLoadError, RecipeError


class HFText(nn.Module):
    """A Hugging Face sequence classifier called on token ids alone: the mask comes from the pad token."""

    def __init__(self, model: nn.Module, pad_token_id: Optional[int]) -> None:
        super().__init__()
        self.model, self.pad_token_id = model, pad_token_id

    def forward(self, input_ids):
        if self.pad_token_id is None:
            return self.model(input_ids=input_ids).logits
        mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=mask).logits


def check_inputs(model: nn.Module, reference: str, inputs: str, input_shape: list[int]) -> None:
    """RecipeError naming model.inputs / model.input_shape when they do not fit the Hugging Face model."""
    if not isinstance(model, (HFText, HFLogits)):
        return
    text = isinstance(model, HFText)
    if text and inputs != "tokens":
        raise RecipeError(f"{reference} is a text model; the recipe has model.inputs: {inputs}.",
                          hint="Set model.inputs: tokens and model.input_shape: [sequence length], e.g. [128].")
    if not text and inputs == "tokens":
        raise RecipeError(f"{reference} is an image model; the recipe has model.inputs: tokens.",
                          hint="Set model.inputs: image and model.input_shape: [C, H, W].")
    limit = getattr(model.model.config, "max_position_embeddings", None)
    if text and limit is not None and input_shape[0] > int(limit):
        raise RecipeError(f"model.input_shape {input_shape}: {reference} embeds at most {limit} positions.",
                          hint=f"Set model.input_shape to [{limit}] or less.")


class HFLogits(nn.Module):
    """A Hugging Face model called with one keyword input, returning its logits."""

    def __init__(self, model: nn.Module, argument: str = "pixel_values") -> None:
        super().__init__()
        self.model, self.argument = model, argument

    def forward(self, x):
        return self.model(**{self.argument: x}).logits


@contextlib.contextmanager
def quiet(transformers) -> Iterator[None]:
    """transformers without its progress bars and load reports (a new head's "newly initialized" warning
    included: the run's notes say it), restored afterwards."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


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
        return _load_text(transformers, path, directory, config, num_classes)
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
        with quiet(transformers):
            model = transformers.AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"hf:{directory}: the weights do not load ({type(exc).__name__}: {exc}).") from None
    return HFLogits(model.eval(), "pixel_values")


def _load_text(transformers, path: Path, directory: str, config, num_classes: int) -> nn.Module:
    """A sequence classifier from `path`; a bare encoder gets a new head of `num_classes` outputs."""
    heads = [a for a in (getattr(config, "architectures", None) or []) if a.endswith("ForSequenceClassification")]
    if heads and int(config.num_labels) != int(num_classes):
        raise ModelLoadError(f"hf:{directory}: model.num_classes is {num_classes}, the model's config.json has "
                             f"num_labels {config.num_labels}.",
                             hint="Set model.num_classes in the recipe to the model's number of labels.")
    if not heads:
        config.num_labels = int(num_classes)
    try:
        with quiet(transformers):
            model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), config=config,
                                                                                    local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"hf:{directory}: the weights do not load as a sequence classifier "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}).",
                             hint="hf:DIR takes text encoders with a sequence-classification class in transformers "
                                  "(BERT, RoBERTa, DistilBERT, ...).") from None
    pad = getattr(config, "pad_token_id", None)
    return HFText(model.eval(), None if pad is None else int(pad))
