"""A group's weight slices per channel (structure_slices), their joint norms (channel_norms) and in-place scaling
(scale_channels): what DPM, OCSP, OTOv2 and FGGP's structured mode read and shrink before a removal."""
from __future__ import annotations

import torch
from torch import nn

from compressor.prune import graph as dg
from compressor.prune import heads as heads_mod


def structure_slices(model: nn.Module, example: torch.Tensor, roots: list[str], *, out_only: bool = True):
    """{root: [(Slice, root_idxs)]} for every member of each root's group (all channels of the group).

    out_only=True keeps the output-defining slices (producer rows and bias, norm affine); False adds the
    consumers' input columns. A channel c of the root is x_s = concatenation over slices of the rows whose
    root index is c. Attention-head roots (prune/heads.py) and decoder LM roots (models/decoder: a layer's out_only
    slices are its o_proj / down_proj rows, scaled to zero the layer is the identity) give their sites' slices.
    """
    from compressor.models.decoder import is_decoder_root, site_of
    from compressor.prune.importance import channel_slices

    result = {root: heads_mod.site_of(model, root).slices(out_only) for root in roots if heads_mod.is_head_root(root)}
    result.update({root: site_of(model, root).slices(out_only) for root in roots if is_decoder_root(root)})
    roots = [root for root in roots if root not in result]
    if not roots:
        return result
    with dg.quiet_eval(model):
        graph = dg.trace(model, example)
    with dg.mapped_once(graph):  # lookups only: nothing is removed here
        for root in roots:
            module = model.get_submodule(root)
            pruner = graph.get_pruner_of_module(module)
            group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                            list(range(pruner.get_out_channels(module))))
            result[root] = [pair for item in group for pair in
                            channel_slices(item.dep.target.module, item.dep.handler, list(item.idxs), item.root_idxs,
                                           out_only=out_only)]
    return result


def channel_norms(pairs, *, grad: bool = False) -> torch.Tensor:
    """Joint L2 norm of each channel's rows over a group's (Slice, root_idxs) pairs (of .grad when grad=True)."""
    width = max(max(r) for _, r in pairs) + 1
    total = torch.zeros(width, dtype=torch.float64)
    with torch.no_grad():
        for sl, roots in pairs:
            p = sl.param.grad if grad else sl.param
            if p is None:
                continue
            p = p.detach()
            sq = p.pow(2).transpose(0, sl.dim).reshape(p.shape[sl.dim], -1).sum(1) if p.ndim > 1 else p.pow(2)
            total.scatter_add_(0, torch.as_tensor(roots), sq[torch.as_tensor(sl.idxs)].double().cpu())
    return total.sqrt()


@torch.no_grad()
def scale_channels(pairs, factors: dict[int, float]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Multiply the rows of the given channels (root index -> factor) in place; returns (param, dim, rows) touched."""
    touched = []
    for sl, roots in pairs:
        rows = [(m, factors[r]) for m, r in zip(sl.idxs, roots) if r in factors]
        if not rows:
            continue
        index = torch.as_tensor([m for m, _ in rows], device=sl.param.device)
        shape = [1] * sl.param.ndim
        shape[sl.dim] = -1
        f = torch.as_tensor([v for _, v in rows], dtype=sl.param.dtype, device=sl.param.device).view(shape)
        sl.param.index_copy_(sl.dim, index, sl.param.index_select(sl.dim, index) * f)
        touched.append((sl.param, sl.dim, index))
    return touched
