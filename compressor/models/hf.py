"""`hf:DIR`: a Hugging Face `save_pretrained` directory as a model reference (the `[hf]` extra installs
transformers). Nothing is downloaded: the directory must hold config.json and the weights.

Whether a directory holds an image or a text model is read from transformers' own Auto mappings: the classes
config.json names (`architectures`) or, for a directory without them, its `model_type`, looked up in the
image-classification and sequence-classification mappings (model_kind).
Image classification models (ViT, ResNet, ConvNeXt, Swin, ...) load through AutoModelForImageClassification and
are wrapped so that the pipeline calls them on one pixel tensor and gets logits, as every other model; one forward
pass on a zero image of model.input_shape at load says, before any training, when a model needs other inputs
(ImageGPT's colour-cluster tokens, ShieldGemma2's prompt, SigLIP2's patch masks). Text models (BERT, RoBERTa,
DistilBERT, ...) load through AutoModelForSequenceClassification. A directory saved from a classifier keeps its
head; a bare encoder (BertModel, ViTModel, a sentence-transformers directory) gets a new, randomly initialised
classification head with model.num_classes outputs (fine-tune it on labelled data). Text models are
wrapped to take one int64 tensor of token
ids (model.inputs: tokens); the attention mask is derived inside as `input_ids != pad_token_id`, so the exported
ONNX has one input and right-padded batches give the same logits as unpadded text.
A directory whose config.json names a *ForSemanticSegmentation class (SegFormer, ...) loads as a segmenter
(models/hf_segmentation.py, task: segmentation); one that names a decoder-only causal-LM class (Llama, Qwen, GPT-2,
...) loads as a language model (models/hf_causal_lm.py, task: language-modeling), encoder-decoder LMs (T5, BART) are
refused; detection transformers (RT-DETR, DETR, ...) are refused (refuse_detector says why).
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Iterator, Optional

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


def check_inputs(model: nn.Module, reference: str, inputs: str, input_shape: list[int], num_classes: int) -> None:
    """RecipeError naming model.inputs / model.input_shape when they do not fit the Hugging Face model; for an image
    model, ModelLoadError when one forward pass on model.input_shape fails (check_image_forward)."""
    from compressor.models.hf_causal_lm import HFCausalLM, check_lm_inputs

    if isinstance(model, HFCausalLM):
        return check_lm_inputs(model, reference, inputs, input_shape)
    if not isinstance(model, (HFText, HFLogits)):
        return
    text = isinstance(model, HFText)
    if text and inputs != "tokens":
        raise RecipeError(f"{reference} is a text model; the recipe has model.inputs: {inputs}.",
                          hint="Set model.inputs: tokens and model.input_shape: [sequence length], e.g. [128].")
    if not text and inputs == "tokens":
        raise RecipeError(f"{reference} is an image model; the recipe has model.inputs: tokens.",
                          hint="Set model.inputs: image and model.input_shape: [C, H, W].")
    if not text:
        check_image_forward(model, reference, input_shape, num_classes)
    limit = getattr(model.model.config, "max_position_embeddings", None)
    if text and limit is not None and input_shape[0] > int(limit):
        raise RecipeError(f"model.input_shape {input_shape}: {reference} embeds at most {limit} positions.",
                          hint=f"Set model.input_shape to [{limit}] or less.")


class HFLogits(nn.Module):
    """A Hugging Face model called with one keyword input, returning its logits (the output's first field for a
    classifier whose output has no `logits`: PP-LCNet returns its class scores as last_hidden_state)."""

    def __init__(self, model: nn.Module, argument: str = "pixel_values") -> None:
        super().__init__()
        self.model, self.argument = model, argument

    def forward(self, x):
        out = self.model(**{self.argument: x})
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out[0]


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


def read_config(directory: str) -> tuple[Any, Path, Any]:
    """(transformers, the directory's path, its config); ModelLoadError when it holds no Hugging Face config."""
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
    return transformers, path, config


def _mappings() -> dict[str, dict[str, Any]]:
    from transformers.models.auto import modeling_auto as auto

    return {"image": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
            "text": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}


def _classifiers(mapping: dict[str, Any]) -> set[str]:
    """Every class name of an Auto mapping (a value is one name or a tuple of them)."""
    return {name for value in mapping.values() for name in ((value,) if isinstance(value, str) else value)}


def named_classifier(config, kind: str) -> bool:
    """Whether config.json's architectures name a classifier of `kind` ("image" or "text"), i.e. the directory
    holds its classification head."""
    return bool(set(getattr(config, "architectures", None) or []) & _classifiers(_mappings()[kind]))


def model_kind(config, directory: str) -> str:
    """Whether the model is an "image" or a "text" model, from transformers' Auto mappings: a classifier class
    named in config.json's architectures, else the model_type's entries (an image-classification family without a
    sequence-classification one is an image model); ModelLoadError for a model in neither."""
    for kind in ("image", "text"):
        if named_classifier(config, kind):
            return kind
    families = {kind: config.model_type in mapping for kind, mapping in _mappings().items()}
    if families["image"] and not families["text"]:
        return "image"
    if families["text"]:
        return "text"
    raise ModelLoadError(f"hf:{directory}: model_type {config.model_type!r} "
                         f"({', '.join(getattr(config, 'architectures', None) or []) or 'no architectures'}) has "
                         "neither an image-classification nor a sequence-classification class in transformers.",
                         hint="hf:DIR takes image classifiers (AutoModelForImageClassification) and text encoders "
                              "(AutoModelForSequenceClassification).")


def vision_field(config, name: str) -> Any:
    """config.json's `name` (num_channels, image_size), or its vision_config's (CLIP, SigLIP); None when neither
    has it (ResNet's config has no image_size, a timm wrapper no num_channels)."""
    for source in (config, getattr(config, "vision_config", None)):
        value = getattr(source, name, None) if source is not None else None
        if value is not None:
            return value
    return None


def model_section(directory: str) -> dict[str, Any]:
    """The recipe's model section that fits the model in `directory`, for a command run without a recipe
    (`compressor inspect hf:DIR`): its own labels, channels and image size (224 where config.json gives none), or
    for a text model token inputs of min(128, its positions)."""
    _, _, config = read_config(directory)
    refuse_detector(config, directory)
    from compressor.models.hf_causal_lm import names_causal_lm

    labels = int(config.num_labels)
    if names_causal_lm(config) or model_kind(config, directory) == "text":
        limit = getattr(config, "max_position_embeddings", None)
        return {"num_classes": labels, "inputs": "tokens", "input_shape": [min(128, int(limit)) if limit else 128]}
    channels = int(vision_field(config, "num_channels") or 3)
    size = vision_field(config, "image_size") or 224
    height, width = (size, size) if isinstance(size, int) else (size[0], size[-1])
    return {"num_classes": labels, "in_channels": channels, "input_shape": [channels, int(height), int(width)]}


def refuse_detector(config, directory: str) -> None:
    """ModelLoadError for a detection transformer (config.json names an object-detection class, or its model_type
    has one and no image classifier): RT-DETR was tried and does not fit the detection contract yet."""
    from transformers.models.auto import modeling_auto as auto

    mapping = auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
    named = set(getattr(config, "architectures", None) or []) & _classifiers(mapping)
    if not named and not (config.model_type in mapping and config.model_type not in _mappings()["image"]):
        return
    name = sorted(named)[0] if named else config.model_type
    raise ModelLoadError(f"hf:{directory}: {name} is a detection transformer, which compressor does not compress yet: "
                         "for RT-DETR (tried), its ONNX export (TorchScript and dynamo) does not reproduce its "
                         "PyTorch boxes and scores, its backbone's frozen batch norms do not follow channel pruning, "
                         "and its own loss needs scipy (not a compressor dependency) and, for its denoising queries, "
                         "the targets inside the forward.",
                         hint="Compress a YOLO model (ultralytics:yolo11n.yaml) or a torchvision detector "
                              "(torchvision:ssdlite320_mobilenet_v3_large, retinanet_resnet50_fpn, fcos_resnet50_fpn) "
                              "with task: detection.")


def load_hf(directory: str, num_classes: int, in_channels: int) -> nn.Module:
    """The model in `directory` (config.json + weights), wrapped to return logits; ModelLoadError naming the file
    or recipe field that does not fit."""
    transformers, path, config = read_config(directory)
    from compressor.models.hf_segmentation import load_hf_segmenter, names_segmenter

    if names_segmenter(config):  # a *ForSemanticSegmentation class: task segmentation (models/hf_segmentation.py)
        return load_hf_segmenter(transformers, path, directory, config, num_classes, in_channels)
    refuse_detector(config, directory)
    from compressor.models.hf_causal_lm import load_hf_causal_lm, names_causal_lm, refuse_encoder_decoder

    if names_causal_lm(config):  # a decoder-only LM: task language-modeling (models/hf_causal_lm.py)
        return load_hf_causal_lm(transformers, path, directory, config)
    refuse_encoder_decoder(config, directory)
    if model_kind(config, directory) == "text":
        return _load_text(transformers, path, directory, config, num_classes)
    head = named_classifier(config, "image")
    problems = []
    if head and int(config.num_labels) != int(num_classes):
        problems.append(f"model.num_classes is {num_classes}, the model's config.json has num_labels "
                        f"{config.num_labels}")
    channels = vision_field(config, "num_channels")
    if channels is not None and int(channels) != int(in_channels):
        problems.append(f"model.in_channels is {in_channels}, the model's config.json has num_channels {channels}")
    if problems:
        raise ModelLoadError(f"hf:{directory}: " + "; ".join(problems) + ".",
                             hint="Set model.num_classes / model.in_channels in the recipe to the model's values.")
    if not head:
        config.num_labels = int(num_classes)
    model = from_pretrained_checked(transformers, transformers.AutoModelForImageClassification, path, config,
                                    directory, "an image classifier")
    takes = list(inspect.signature(model.forward).parameters)
    if "pixel_values" not in takes:
        raise ModelLoadError(f"hf:{directory}: {type(model).__name__} takes {', '.join(takes[:3])}, not pixel_values; "
                             "hf:DIR calls image classifiers on one pixel tensor.",
                             hint="Image models whose inputs are not pixels (ImageGPT's colour-cluster tokens) "
                                  "cannot be compressed through hf:DIR.")
    return HFLogits(model.eval(), "pixel_values")


def check_image_forward(model: "HFLogits", reference: str, input_shape: list[int], num_classes: int) -> None:
    """One forward pass on a zero image of model.input_shape, before any training: ModelLoadError with the model's
    own error when it cannot run on pixels alone (it needs a prompt or patch masks, or another input size), or
    when it does not return [1, num_classes] class scores."""
    import torch

    name = type(model.model).__name__
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *input_shape))
    except Exception as exc:  # whatever the model's own code raises on an input it cannot take
        raise ModelLoadError(f"{reference}: {name} does not run on one image of model.input_shape {input_shape} "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}).",
                             hint="hf:DIR calls an image classifier as model(pixel_values=x) on a [batch, C, H, W] "
                                  "tensor: set model.input_shape to a size it takes (config.json's image_size). A "
                                  "model that needs other inputs too (a text prompt, patch masks and spatial shapes) "
                                  "cannot be compressed as an image classifier.") from None
    want = (1, int(num_classes), *input_shape[1:]) if getattr(model, "dynamic_size", False) else (1, int(num_classes))
    if tuple(out.shape) != want:  # a segmenter (dynamic_size): per-pixel class scores at the input's size
        raise ModelLoadError(f"{reference}: {name} returns {list(out.shape)} for one image, not {list(want)} "
                             "class scores.")


def _load_text(transformers, path: Path, directory: str, config, num_classes: int) -> nn.Module:
    """A sequence classifier from `path`; a bare encoder gets a new head of `num_classes` outputs."""
    heads = named_classifier(config, "text")
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


def from_pretrained_checked(transformers, auto_class, path, config, directory: str, what: str):
    """`auto_class.from_pretrained` of a local folder, or ModelLoadError saying the weights do not load as `what`."""
    try:
        with quiet(transformers):
            return auto_class.from_pretrained(str(path), config=config, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(f"hf:{directory}: the weights do not load as {what} "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}).") from None
