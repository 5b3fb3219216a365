"""Hugging Face causal language models (`hf:DIR` whose config.json names a decoder-only causal-LM class: Llama,
Qwen2, Qwen3, Mistral, Phi-3, GPT-2, ... from transformers' causal-LM Auto mapping) as compressor models: one (N, T)
tensor of token ids in, (N, T, vocab) next-token logits out (task: language-modeling).

The Hugging Face model returns a ModelOutput and, by default, a key/value cache; the wrapper calls it with
use_cache=False and return_dict=True and returns the logits tensor alone, so torch-pruning's tracing, the MAC counter,
training and the ONNX export see one tensor (the tuple outputs of Torch-Pruning #455 never appear). No attention
mask is passed: packed corpus blocks (compressor/train/text_corpus.py) hold no padding, so every position attends
causally to all earlier ones. The Hugging Face model stays reachable as `.hf` (generation, save_pretrained).
Weights load in float32 whatever dtype the checkpoint was saved in (bfloat16 for most released LMs): fine-tuning and
export parity are float32 work. Encoder-decoder LMs (T5, BART's ForConditionalGeneration) are refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import ModelLoadError, RecipeError
from compressor.models.hf import quiet
from compressor.models.hf_segmentation import without_capture_hooks

SUPPORTED = "Llama, Qwen2, Qwen3, Mistral, Phi-3 and GPT-2 (decoder-only *ForCausalLM / GPT2LMHeadModel classes)"


def _names(mapping: dict[str, Any]) -> set[str]:
    return {name for value in mapping.values() for name in ((value,) if isinstance(value, str) else value)}


def names_causal_lm(config) -> bool:
    """Whether config.json's architectures name a class of transformers' causal-LM Auto mapping."""
    from transformers.models.auto import modeling_auto as auto

    return bool(set(getattr(config, "architectures", None) or []) & _names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def refuse_encoder_decoder(config, directory: str) -> None:
    """ModelLoadError for an encoder-decoder LM (config.json names a sequence-to-sequence LM class such as
    T5ForConditionalGeneration or BartForConditionalGeneration, and no sequence classifier)."""
    from transformers.models.auto import modeling_auto as auto

    architectures = set(getattr(config, "architectures", None) or [])
    named = architectures & _names(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    if not named or architectures & _names(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        return
    raise ModelLoadError(f"hf:{directory}: {sorted(named)[0]} is an encoder-decoder language model, which compressor "
                         "does not compress: task language-modeling takes decoder-only causal LMs, whose forward "
                         "maps token ids to next-token logits.",
                         hint=f"Use a decoder-only model: {SUPPORTED}.")


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM called on token ids alone, returning its (N, T, vocab) logits."""

    causal_lm = True  # compressor.tasks.task_of_model: next-token logits (task language-modeling)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    @property
    def config(self):
        return self.hf.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False, return_dict=True).logits

    def protected_modules(self) -> list[str]:
        """The output projection onto the vocabulary (lm_head): its rows are the tokens, never pruned."""
        head = self.hf.get_output_embeddings()
        return [name for name, module in self.named_modules() if head is not None and module is head]

    def __getstate__(self) -> dict:
        """Pickled (model.pt, deepcopy) without transformers' output-capturing hooks (hf_segmentation)."""
        without_capture_hooks(self)
        return super().__getstate__()

    def save_pretrained(self, folder: Path, example: torch.Tensor, tokenizer: Any = None) -> dict[str, Any]:
        """save_pretrained_checked of this model."""
        return save_pretrained_checked(self, folder, example, tokenizer)


def load_hf_causal_lm(transformers, path: Path, directory: str, config) -> HFCausalLM:
    """The causal LM saved in `path` (AutoModelForCausalLM, local files only, float32), wrapped."""
    try:
        with quiet(transformers):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), config=config, local_files_only=True,
                                                                      dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(f"hf:{directory}: the weights do not load as a causal language model "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}).",
                             hint=f"hf:DIR takes a save_pretrained folder of a decoder-only LM: {SUPPORTED}.") from None
    return HFCausalLM(model).eval()  # eval mode throughout (GPT-2's dropout), as from_pretrained returns it


def check_lm_inputs(model: HFCausalLM, reference: str, inputs: str, input_shape: list[int]) -> None:
    """RecipeError when model.inputs / model.input_shape do not fit a causal LM: token ids, at most its positions."""
    if inputs != "tokens":
        raise RecipeError(f"{reference} is a causal language model; the recipe has model.inputs: {inputs}.",
                          hint="Set model.inputs: tokens and model.input_shape: [block size] (data.text.block_size).")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and int(input_shape[0]) > int(limit):
        raise RecipeError(f"model.input_shape {input_shape}: {reference} embeds at most {limit} positions.",
                          hint=f"Set model.input_shape and data.text.block_size to {limit} or less.")


def save_pretrained_checked(wrapper: HFCausalLM, folder: Path, example: torch.Tensor,
                            tokenizer: Any = None) -> dict[str, Any]:
    """Write `wrapper.hf` (and `tokenizer`) to `folder` with save_pretrained when from_pretrained rebuilds it with
    the same logits on `example` (checked); otherwise write nothing. The config must describe every tensor's shape:
    models/decoder.config_after makes a pruned decoder's config do so (per-layer widths cannot: the reason is
    returned); a family decoder surgery does not know keeps its config when models/hf_export.config_for finds it
    describes the model. Returns {written, path | reason, max_abs_diff}."""
    from compressor.errors import NotPrunableError
    from compressor.models.decoder import config_after
    from compressor.models.hf_export import config_for, write_checked

    model = wrapper.hf
    try:
        config, reason = config_after(model), None
    except RecipeError as exc:
        config, reason = None, exc.message
    except NotPrunableError:
        config, reason = config_for(model)

    def logits_diff(reloaded: nn.Module) -> float:
        was_training = wrapper.training
        try:
            with torch.no_grad():
                device = next(wrapper.parameters()).device
                ours = wrapper.eval()(example.to(device)).float().cpu()
                theirs = HFCausalLM(reloaded)(example.cpu()).float()
        finally:
            wrapper.train(was_training)
        return float((ours - theirs).abs().max())

    return write_checked(model, config, reason, folder, tokenizer, logits_diff, dtype=torch.float32)
