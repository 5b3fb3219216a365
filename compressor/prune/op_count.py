"""MAC and parameter counting: torch-pruning's op counter, extended to subclasses of the layers it knows, RNNs and
head-pruned attention (count_ops), and the count of a model as it is now (snapshot_macs)."""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter

from compressor.models.attention import HeadPrunedMultiheadAttention
from compressor.prune import graph as dg


def count_ops(model: nn.Module, example: torch.Tensor, layer_wise: bool = False):
    """torch-pruning's op counter, also for subclasses of the layers it knows: it looks hooks up by exact type, so
    a conv subclass with its own forward (timm's StdConv2d in BiT ResNets) counted 0 MACs and the MAC targets of
    such models were computed on the few layers it did count.

    The extra hooks go into torch-pruning's process-wide CUSTOM_MODULES_MAPPING for this call only (entries the
    caller put there take precedence), and the caller's mapping is put back afterwards, also when counting fails
    (torch-pruning itself empties it after every count)."""
    known = op_counter.MODULES_MAPPING
    extra = {type(m): known[base] for m in model.modules() if type(m) not in known
             for base in type(m).__mro__[1:] if base in known and isinstance(m, nn.Module)}
    extra.update({type(m): _rnn_macs for m in model.modules() if isinstance(m, nn.RNNBase)})
    extra[HeadPrunedMultiheadAttention] = _pruned_mha_macs
    previous = op_counter.CUSTOM_MODULES_MAPPING
    op_counter.CUSTOM_MODULES_MAPPING = {**extra, **previous}
    try:
        return tp.utils.count_ops_and_params(model, example, layer_wise=layer_wise)
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = previous


def counted_whole(module: nn.Module) -> bool:
    """Whether count_ops counts `module` as one layer (its children are not added up)."""
    return type(module) in op_counter.MODULES_MAPPING or isinstance(module, HeadPrunedMultiheadAttention)


def _pruned_mha_macs(module: HeadPrunedMultiheadAttention, inputs, output) -> None:
    """torch-pruning's nn.MultiheadAttention count with the inner width (heads x head_dim) in place of embed_dim
    where heads were removed: q scaling, the q/k/v projections and biases, per head QK^T, softmax and AV, and the
    output projection."""
    query, key = inputs[0], inputs[1]
    batch_first = module.batch_first and query.dim() == 3
    batch = (query.shape[0] if batch_first else query.shape[1]) if query.dim() == 3 else 1
    length, source = (query.shape[1], key.shape[1]) if batch_first else (query.shape[0], key.shape[0])
    embed, inner, heads = module.embed_dim, module.inner_dim, module.num_heads
    macs = length * inner + (length + 2 * source) * embed * inner
    if module.in_proj_bias is not None:
        macs += (length + 2 * source) * inner
    macs += heads * (length * source * module.head_dim * 2 + length * source)
    macs += length * inner * embed + length * embed
    module.__flops__ += int(macs * batch)


def _rnn_macs(module: nn.RNNBase, inputs, output) -> None:
    """MACs of an RNN/LSTM/GRU: its weight matrices once per token, layer and direction. torch-pruning's own hook
    reads batch and sequence length from the first sample's shape (the sequence length and the feature width), so
    timm's Sequencer (batch-first LSTMs over 14x14 tokens) counted 73.6 GMACs instead of about 8."""
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        tokens = x.data.shape[0]
    else:
        tokens = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    per_token = sum(w.numel() for name, w in module.named_parameters() if name.startswith(("weight_ih", "weight_hh")))
    module.__flops__ += int(per_token * tokens)  # named_parameters holds both directions' weights already


def snapshot_macs(model: nn.Module, example: torch.Tensor) -> tuple[float, int]:
    """(MACs, params) of the model as it is now, counted by torch-pruning (see count_ops); of a decoder LM, its
    analytic MACs (models/decoder.decoder_macs, what its planner counts: torch-pruning's counter sees no attention
    matmul) and its parameters."""
    from compressor.prune.decoder_snapshot import decoder_model_macs, is_decoder_model

    if is_decoder_model(model):
        return decoder_model_macs(model, example)
    with dg.quiet_eval(model):
        macs, params = count_ops(model, example)
    return float(macs), int(params)
