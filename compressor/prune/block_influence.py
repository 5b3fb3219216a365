"""Block influence of a decoder LM's layers (prune.decoder.layer_importance: block_influence): how much each layer
changes the hidden state, measured on real batches.

ShortGPT's block influence: BI_i = 1 - mean over tokens of cos(x_i, y_i), where x_i is the hidden state entering
layer i and y_i the one leaving it (the residual stream after the layer's attention and MLP branches). A layer whose
output points where its input did adds little and goes first. Weight magnitudes, the host's default score for a layer
(the rows of o_proj / down_proj), say how large a layer's writes can be, not how much they move the stream on data;
dropping the layers of lowest block influence is what the depth-pruning literature found to keep perplexity best.

One forward pass per batch in eval mode without gradients (hooks on the layers read their first positional input or
the hidden_states keyword, and their output or its first element); the scores are on the model's layers as they are
now, so they are measured again at every selection event.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from compressor.models.decoder import arch_of


def _hidden_in(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """Each decoder layer's block influence (module docstring), averaged over every token of `batches` (an iterable
    of (inputs, targets) pairs or of inputs; targets are not used). A float tensor with one value per layer, in
    [0, 2]; ValueError when `batches` is empty."""
    layers = list(arch_of(model).layers)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    handles = []

    def hook(index: int):
        def record(_module, args, kwargs, output):
            x, y = _hidden_in(args, kwargs), _hidden_out(output)
            cos = nn.functional.cosine_similarity(x.float().flatten(0, -2), y.float().flatten(0, -2), dim=-1)
            sums[index] += float((1.0 - cos).sum())
        return record

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            inputs = inputs.to(device)
            model(inputs)
            tokens += inputs.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("block influence needs at least one batch of tokens")
    return (sums / tokens).float()
