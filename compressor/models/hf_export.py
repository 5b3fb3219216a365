"""A pruned Hugging Face model written with `save_pretrained` where `from_pretrained` can rebuild it.

from_pretrained builds every layer from config.json, so a folder is only useful when the config can describe the
pruned shapes: an MLP width (intermediate_size; DistilBERT's hidden_dim) pruned to one value in every layer is
written into the config; anything else (different widths per layer, pruned attention heads: transformers 5 removed
config.pruned_heads, so every layer would be rebuilt with num_attention_heads heads, and BERT derives the head
width from hidden_size / num_attention_heads, which also rules out a pruned embedding width) cannot be, and the
folder is not written. Whatever is written is
reloaded with from_pretrained and its logits compared with the pruned model's before it is published; the slim
format (slim.json + weights.safetensors) reloads every shape regardless. Vision models (no token embedding:
their get_input_embeddings raises NotImplementedError) go through the same checks: a pruned convolution's width
is a tensor shape the config cannot describe, so their folder is written only when nothing but such an MLP width
changed. SegFormer's config has per-stage lists: a stage's MLP width is written as a whole mlp_ratio and one
decode-head width as decoder_hidden_size where they are (hf_segmentation.describe_stage_widths).
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from compressor.models.attention import attention_modules, head_count
from compressor.models.hf import HFText, quiet
from compressor.models.hf_segmentation import describe_stage_widths

# config attribute -> the Linear whose out_features it sets, by module-name suffix (BERT/RoBERTa/ViT/DeiT, DistilBERT)
MLP_FIELDS = {"intermediate_size": (".intermediate.dense",), "hidden_dim": (".ffn.lin1",)}
TOLERANCE = 1e-4


def _input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The model's token embedding, None for a model without one (vision models raise NotImplementedError)."""
    try:
        return model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return None


def _heads(model: nn.Module) -> dict[str, int]:
    return {name: head_count(m, family) for name, m, family, _ in attention_modules(model) if family is not None}


def config_for(model: nn.Module) -> tuple[Optional[Any], Optional[str]]:
    """(a config describing `model`'s shapes, None) or (None, why no config can): the MLP width is set when every
    layer has the same one, then every layer's heads and every tensor's shape are compared with a model built from
    that config."""
    config = copy.deepcopy(model.config)
    embedding = _input_embeddings(model)
    hidden = getattr(config, "hidden_size", getattr(config, "dim", None))
    if isinstance(embedding, nn.Embedding) and hidden is not None and embedding.embedding_dim != hidden:
        return None, (f"the embedding width was pruned ({hidden} -> {embedding.embedding_dim}, "
                      "prune.attention.embed); transformers derives each head's width from hidden_size / "
                      "num_attention_heads, so a config cannot keep the heads' width with a narrower embedding")
    for attr, suffixes in MLP_FIELDS.items():
        widths = {m.out_features for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name.endswith(suffixes)}
        if hasattr(config, attr) and len(widths) == 1:
            setattr(config, attr, widths.pop())
    describe_stage_widths(model, config)  # SegFormer's per-stage MLP ratios and decoder width
    with torch.device("meta"):
        rebuilt_model = type(model)(config)
    heads, rebuilt_heads = _heads(model), _heads(rebuilt_model)
    if any(rebuilt_heads.get(name) != count for name, count in heads.items()):
        given = sorted(set(rebuilt_heads.values())) or [0]
        config_has = str(given[0]) if len(given) == 1 else f"{given[0]}-{given[-1]}"
        return None, (f"attention heads were pruned ({min(heads.values())}-{max(heads.values())} per layer, config "
                      f"has {config_has}); "
                      "transformers' from_pretrained rebuilds every layer with the config's head count (it has no "
                      "pruned_heads since version 5)")
    rebuilt = rebuilt_model.state_dict()
    for name, tensor in model.state_dict().items():
        want = rebuilt.get(name)
        if want is not None and tuple(want.shape) != tuple(tensor.shape):
            return None, (f"{name} is {list(tensor.shape)} after pruning, a model built from config.json has "
                          f"{list(want.shape)} (the config has one size for what pruning made different)")
    return config, None


def save_pretrained_checked(wrapper: nn.Module, folder: Path, example: torch.Tensor,
                            tokenizer: Any = None) -> dict[str, Any]:
    """Write `wrapper.model` (HFText / HFLogits) to `folder` with save_pretrained when from_pretrained rebuilds it
    with the same logits (checked); otherwise write nothing. Returns {written, path | reason, max_abs_diff}."""
    model = wrapper.model
    config, reason = config_for(model)

    def logits_diff(reloaded: nn.Module) -> float:
        rebuilt = (HFText(reloaded, wrapper.pad_token_id) if isinstance(wrapper, HFText)
                   else type(wrapper)(reloaded, wrapper.argument))  # HFLogits, or HFSegmenter: same signature
        with torch.no_grad():
            return float((wrapper.eval()(example) - rebuilt(example)).abs().max())

    return write_checked(model, config, reason, folder, tokenizer, logits_diff)


def write_checked(model: nn.Module, config: Any, reason: Optional[str], folder: Path, tokenizer: Any,
                  logits_diff: Any, **load: Any) -> dict[str, Any]:
    """save_pretrained of `model` with `config` (and `tokenizer`) into a staged folder, reloaded with
    from_pretrained (`load`: its extra arguments); the folder becomes `folder` only when `logits_diff(reloaded)` is
    within TOLERANCE. A `config` of None writes nothing and returns `reason`; an existing `folder` goes first (a
    stale one must not look like this run's). Returns {written, path | reason, max_abs_diff}."""
    if folder.exists():
        shutil.rmtree(folder)
    if config is None:
        return {"written": False, "reason": reason}
    import transformers

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hf.", dir=folder.parent) as tmp:
        staged = Path(tmp) / folder.name
        original = model.config
        model.config = config
        try:
            with quiet(transformers):
                model.save_pretrained(str(staged))
        finally:
            model.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staged))
        try:
            with quiet(transformers):
                reloaded = type(model).from_pretrained(str(staged), local_files_only=True, **load).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            return {"written": False, "reason": f"from_pretrained cannot rebuild it ({type(exc).__name__}: "
                                                f"{' '.join(str(exc).split())[:200]})"}
        diff = logits_diff(reloaded)
        if diff > TOLERANCE:
            return {"written": False, "reason": f"from_pretrained rebuilds it with different logits (max abs diff "
                                                f"{diff:.3g})"}
        staged.rename(folder)
    return {"written": True, "path": str(folder), "max_abs_diff": diff}
