"""nn.MultiheadAttention with fewer heads than its embedding width holds.

torch's MultiheadAttention splits its packed q/k/v projection by the embedding width, so it cannot run with heads
removed (inner width num_heads x head_dim < embed_dim). HeadPrunedMultiheadAttention takes its place after head
pruning (prune/heads.py): the same parameter names (in_proj_weight, in_proj_bias, out_proj, bias_k, bias_v), so a
state dict moves between the two, the same call signature and outputs, the embedding width unchanged.
Self- and cross-attention with the packed projection (kdim == vdim == embed_dim) are supported, which is what
torchvision's ViT and most encoders use.

Below it, the attention layer families whose heads can be removed (attention_family; prune/heads.py removes them),
the attributes their forward reads after removal (set_head_count), and the head counts a saved slim model's
shapes hold (conform_heads, for reloading without pickle).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEAD_SUFFIX = ":heads"  # `<attention layer>:heads`: the planner's root and the widths' key of a layer's head count


class HeadPrunedMultiheadAttention(nn.Module):
    """Multi-head attention with `num_heads` heads of `head_dim` over an `embed_dim` wide input and output."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, add_bias_kv: bool = False,
                 dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"need at least one head of at least one dimension, got {num_heads} x {head_dim}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.bias_k = nn.Parameter(torch.zeros(1, 1, inner)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.zeros(1, 1, inner)) if add_bias_kv else None
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def like(cls, mha: nn.Module, num_heads: int) -> "HeadPrunedMultiheadAttention":
        """An uninitialised module with `mha`'s settings and `num_heads` of its heads."""
        head_dim = mha.head_dim
        return cls(mha.embed_dim, num_heads, head_dim, bias=mha.in_proj_bias is not None,
                   add_bias_kv=getattr(mha, "bias_k", None) is not None, dropout=float(mha.dropout),
                   batch_first=bool(mha.batch_first)).to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        # (L, B, E) from here, as torch's own implementation
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, k.shape[1], -1)])
            v = torch.cat([v, self.bias_v.expand(1, v.shape[1], -1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        length, batch, source = q.shape[0], q.shape[1], k.shape[0]

        def heads(x: torch.Tensor, n: int) -> torch.Tensor:  # (n, B, H*d) -> (B, H, n, d)
            return x.reshape(n, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(q, length), heads(k, source), heads(v, source)
        mask = _merged_mask(attn_mask, key_padding_mask, batch, self.num_heads, length, source, q.dtype)
        if is_causal and mask is None:
            mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril().logical_not()
            mask = torch.zeros(length, source, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, self.inner_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _merged_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], batch: int,
                 heads: int, length: int, source: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """torch's boolean (True = not allowed) or additive masks as one additive (B, H, L, S) mask."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    merged = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        merged = mask.view(batch, heads, length, source) if mask.dim() == 3 else mask.view(1, 1, length, source)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(batch, 1, 1, source)
        merged = pad if merged is None else merged + pad
    return merged


# ---------------------------------------------------------------------------------------------- families
@dataclass
class HeadLayout:
    """Where a layer's heads live: every tensor with per-head entries, as (owner module, attribute, dim, head of each
    index, whether it defines the head's output), and which layers produce (q/k/v) and consume (the output
    projection) the heads, by name relative to the attention layer (for the MAC model)."""

    heads: int
    head_dim: int
    tensors: list[tuple[nn.Module, str, int, list[int], bool]]
    producers: list[tuple[str, list[int]]]  # (layer, head of each output row)
    consumer: str  # the output projection: its input columns are the inner channels

    @property
    def inner(self) -> list[int]:
        return [c // self.head_dim for c in range(self.heads * self.head_dim)]


# Hugging Face attention layers with separate q/k/v projections (transformers 4.x and 5.x): the q, k, v and output
# projections (paths relative to the attention layer) and the attributes holding the head count and width. Their
# forward splits heads with view(..., -1, head_width), so the count follows the projections' width.
SEPARATE = (
    (("self.query", "self.key", "self.value"), "output.dense", "self.num_attention_heads", "self.attention_head_size"),
    (("q_proj", "k_proj", "v_proj"), "o_proj", "num_attention_heads", "head_dim"),  # ViT, DeiT in transformers 5
    (("q_lin", "k_lin", "v_lin"), "out_lin", "n_heads", "attention_head_size"),  # DistilBERT
    (("attention.query", "attention.key", "attention.value"), "output.dense", "attention.num_attention_heads",
     "attention.attention_head_size"),  # Data2Vec-Vision
)


def _path(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set_path(module: nn.Module, path: str, value) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(_path(module, owner) if owner else module, attr, value)


def separate_spec(module: nn.Module):
    """The SEPARATE entry whose projections `module` has, or None."""
    for spec in SEPARATE:
        if all(isinstance(_path(module, p), nn.Linear) for p in (*spec[0], spec[1])):
            return spec
    return None


# Per-head position-bias entries of Hugging Face layers with separate q/k/v: a relative position bias table
# [positions, heads] (Swin, Donut-Swin, Data2Vec-Vision inside the layer; BEiT's beside it, in its parent layer:
# _SIBLING_BIAS), and Swin v2's logit scale [heads, 1, 1] and position-bias MLP (its last Linear has a row per
# head). They go with their head (scored by the projections' slices alone).
BIAS_TABLE = "relative_position_bias_table"
_SIBLING_BIAS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _holds_table(module: nn.Module) -> bool:
    return isinstance(getattr(module, BIAS_TABLE, None), torch.Tensor)


def per_head_entries(module: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(owner, attribute, dim) of every per-head position-bias tensor of a `sep` layer, its own and the one its
    parent keeps beside it."""
    owners = [m for m in module.modules() if _holds_table(m)]
    if module in _SIBLING_BIAS:
        owners.append(_SIBLING_BIAS[module])
    found = [(owner, BIAS_TABLE, 1) for owner in owners]
    for owner in module.modules():
        if isinstance(getattr(owner, "logit_scale", None), torch.Tensor):
            found.append((owner, "logit_scale", 0))
        mlp = getattr(owner, "continuous_position_bias_mlp", None)
        if isinstance(mlp, nn.Sequential) and isinstance(mlp[-1], nn.Linear):
            found += [(mlp[-1], attr, 0) for attr in ("weight", "bias") if getattr(mlp[-1], attr) is not None]
    return found


def _link_sibling_biases(model: nn.Module) -> None:
    """A layer whose children are one `sep` attention layer and one relative-position-bias module (BEiT in
    transformers 5: BeitLayer.attention beside BeitLayer.relative_position_bias): the bias is that attention
    layer's, remembered in _SIBLING_BIAS."""
    for parent in model.modules():
        children = list(parent.children())
        tables = [c for c in children if _holds_table(c)]
        layers = [c for c in children if separate_spec(c) is not None]
        if len(tables) == 1 and len(layers) == 1:
            _SIBLING_BIAS[layers[0]] = tables[0]


def head_count(module: nn.Module, family: str) -> int:
    return int(_path(module, separate_spec(module)[2]) if family == "sep" else module.num_heads)


def head_width(module: nn.Module, family: str) -> int:
    if family == "window":  # timm's WindowAttention keeps no head_dim; its forward reshapes with -1
        return int(module.qkv.out_features // (3 * module.num_heads))
    return int(_path(module, separate_spec(module)[3]) if family == "sep" else module.head_dim)


def head_layout(module: nn.Module, family: str) -> HeadLayout:
    h, d = head_count(module, family), head_width(module, family)
    packed = [(r // d) % h for r in range(3 * h * d)]  # rows [3, heads, head_dim]
    inner = [c // d for c in range(h * d)]

    def linear(owner: nn.Module, heads: list[int], rows: bool = True):
        found = [(owner, "weight", 0 if rows else 1, heads, rows)]
        return found + ([(owner, "bias", 0, heads, True)] if rows and owner.bias is not None else [])

    if family == "qkv":
        tensors = linear(module.qkv, packed)
        norm = getattr(module, "norm", None)
        for attr in ("weight", "bias"):
            p = getattr(norm, attr, None)
            if isinstance(p, torch.Tensor) and p.ndim == 1 and p.numel() == h * d:
                tensors.append((norm, attr, 0, inner, True))
        gate = getattr(module, "gate", None)
        if isinstance(gate, nn.Linear):
            tensors += linear(gate, inner)
        return HeadLayout(h, d, tensors + linear(module.proj, inner, rows=False), [("qkv", packed)], "proj")
    if family == "window":  # per-head position bias / scale entries go with their head (scored by q/k/v alone)
        per_head = list(range(h))
        tensors = linear(module.qkv, packed)
        if hasattr(module, "logit_scale"):  # torchvision's Swin v2: a scale per head, the bias MLP's row per head
            tensors += [(module, "logit_scale", 0, per_head, False), (module.cpb_mlp[-1], "weight", 0, per_head, False)]
        else:
            tensors.append((module, "relative_position_bias_table", 1, per_head, False))
        return HeadLayout(h, d, tensors + linear(module.proj, inner, rows=False), [("qkv", packed)], "proj")
    if family == "mha":
        tensors = [(module, "in_proj_weight", 0, packed, True)]
        if module.in_proj_bias is not None:
            tensors.append((module, "in_proj_bias", 0, packed, True))
        tensors += [(module, attr, 2, inner, True) for attr in ("bias_k", "bias_v") if getattr(module, attr) is not None]
        return HeadLayout(h, d, tensors + linear(module.out_proj, inner, rows=False), [], "out_proj")
    projections, out, _, _ = separate_spec(module)
    tensors = [t for p in projections for t in linear(_path(module, p), inner)]
    tensors += [(owner, attr, dim, list(range(h)), False) for owner, attr, dim in per_head_entries(module)]
    return HeadLayout(h, d, tensors + linear(_path(module, out), inner, rows=False),
                      [(p, inner) for p in projections], out)


def set_head_count(module: nn.Module, family: str, heads: int) -> None:
    """The attributes forward() reads after the tensors changed width."""
    inner = heads * head_width(module, family)
    if family == "qkv":
        module.num_heads = heads
        module.qkv.out_features = 3 * inner
        module.proj.in_features = inner
        for attr in INNER_WIDTH:
            if hasattr(module, attr):
                setattr(module, attr, inner)
        norm = getattr(module, "norm", None)
        if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
            norm.normalized_shape = (inner,)
        gate = getattr(module, "gate", None)
        if isinstance(gate, nn.Linear):
            gate.out_features = inner
    elif family == "window":
        from compressor.models.swin_heads import adopt, is_torchvision_window

        if is_torchvision_window(module):  # its forward would take the head width from the input width
            adopt(module)
        module.num_heads = heads
        module.qkv.out_features = 3 * inner
        module.proj.in_features = inner
        if hasattr(module, "cpb_mlp"):
            module.cpb_mlp[-1].out_features = heads
    elif family == "mha":
        module.num_heads = heads
        module.out_proj.in_features = inner
    else:
        projections, out, count, _ = separate_spec(module)
        _set_path(module, count, heads)
        owner = _path(module, count.rpartition(".")[0]) if "." in count else module
        if hasattr(owner, "all_head_size"):  # BERT's self attention reads it for its output shape
            owner.all_head_size = inner
        for p in projections:
            _path(module, p).out_features = inner
        _path(module, out).in_features = inner
        for owner, _, _ in per_head_entries(module):
            if isinstance(owner, nn.Linear):  # Swin v2's position-bias MLP: one output per head
                owner.out_features = heads


def replace_mha(mha: nn.MultiheadAttention, heads: int) -> HeadPrunedMultiheadAttention:
    """A HeadPrunedMultiheadAttention holding `mha`'s parameters (all `heads` of them, sliced by the caller)."""
    new = HeadPrunedMultiheadAttention.like(mha, heads)
    new.load_state_dict(mha.state_dict(), strict=True)
    from compressor.prune.lineage import record_replacement  # the optimizer follows (prune/lineage.py)

    olds = dict(mha.named_parameters())
    for name, p in new.named_parameters():
        if olds[name].grad is not None:
            p.grad = olds[name].grad.clone()
        record_replacement(olds[name], p, 0, None)
    new.train(mha.training)
    return new


# the attribute a packed layer's forward joins its heads to (timm's Attention; Hugging Face's Hiera mask-unit
# attention): set to the inner width when heads go
INNER_WIDTH = ("attn_dim", "hidden_size_output")


def _qkv_ok(module: nn.Module) -> Optional[str]:
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return "no packed qkv / proj Linear layers"
    if any(name in dict(module.named_parameters(recurse=False)) or name in dict(module.named_buffers())
           for name in ("relative_position_bias_table", "logit_scale")):
        return "window attention with a per-head position bias or scale"
    heads, dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not isinstance(dim, int):
        return "no head_dim attribute: its forward derives the head width from the input width"
    if not isinstance(heads, int) or qkv.out_features != 3 * heads * dim:
        return "its qkv width is not 3 x num_heads x head_dim"
    if proj.in_features != heads * dim:
        return "its output projection does not read num_heads x head_dim"
    widths = {attr: getattr(module, attr) for attr in INNER_WIDTH if hasattr(module, attr)}
    if any(width != heads * dim for width in widths.values()):
        return f"its {', '.join(widths)} is not num_heads x head_dim"
    if not widths and qkv.in_features == heads * dim:
        return ("its forward reshapes the heads back to the input width (no attn_dim: a timm version before the "
                "inner width could differ)")
    return None


def _is_timm_window(module: nn.Module) -> bool:
    return type(module).__name__ == "WindowAttention" and type(module).__module__.startswith("timm.")


def _is_torchvision_window(module: nn.Module) -> bool:
    from compressor.models.swin_heads import is_torchvision_window

    return is_torchvision_window(module)


def _window_ok(module: nn.Module) -> Optional[str]:
    """Swin window attention: packed qkv, proj, and per-head position-bias entries. timm's v1 WindowAttention
    (its forward splits the heads with reshape(..., num_heads, -1) and joins them with reshape(..., -1)), and
    torchvision's v1 and v2 (models/swin_heads.py gives them a forward that reads the head width from qkv)."""
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)):
        return "no packed qkv / proj Linear layers or num_heads"
    if hasattr(module, "logit_scale") or hasattr(module, "cpb_mlp"):
        scale, mlp = getattr(module, "logit_scale", None), getattr(module, "cpb_mlp", None)
        last = mlp[-1] if isinstance(mlp, nn.Sequential) else None
        if not _is_torchvision_window(module) or not (
                isinstance(scale, torch.Tensor) and scale.shape[0] == heads and isinstance(last, nn.Linear)
                and last.out_features == heads and last.bias is None):
            return "Swin v2 window attention whose per-head logit scale and position-bias MLP this version cannot slice"
    else:
        table = getattr(module, "relative_position_bias_table", None)
        if not (isinstance(table, torch.Tensor) and table.ndim == 2 and table.shape[1] == heads):
            return "its relative position bias table is not [positions, num_heads]"
    if qkv.out_features % (3 * heads) or proj.in_features != qkv.out_features // 3:
        return "its qkv width is not 3 x num_heads x head width, or proj does not read the heads"
    return None


def _mha_ok(module: nn.MultiheadAttention) -> Optional[str]:
    if not getattr(module, "_qkv_same_embed_dim", True) or getattr(module, "in_proj_weight", None) is None:
        return "separate q/k/v projection weights (kdim or vdim differ from embed_dim)"
    return None


def _sep_ok(module: nn.Module) -> Optional[str]:
    projections, out, count, width = separate_spec(module)
    heads, dim = _path(module, count), _path(module, width)
    if not isinstance(heads, int) or not isinstance(dim, int):
        return f"no integer {count} / {width}"
    widths = {_path(module, p).out_features for p in projections}
    if widths != {heads * dim}:
        return ("grouped-query attention (keys and values have fewer heads than queries)" if len(widths) > 1 else
                f"its projections are not {count} x {width} wide")
    if _path(module, out).in_features != heads * dim:
        return f"its output projection {out} does not read the heads"
    owner = _path(module, count.rpartition(".")[0]) if "." in count else module
    if getattr(owner, "position_embedding_type", "absolute") != "absolute" or hasattr(owner, "distance_embedding"):
        return "relative position embeddings per head"
    for bias, attr, dim in per_head_entries(module):
        shape = list(getattr(bias, attr).shape)
        if len(shape) <= dim or shape[dim] != heads:
            return f"its per-head position bias {attr} {shape} does not have one entry per head along dim {dim}"
    return None


def attention_family(module: nn.Module) -> tuple[Optional[str], Optional[str]]:
    """(family, None) for a supported attention layer, (None, reason) for another attention layer, (None, None)
    for anything else. Families: qkv (timm's packed Attention), mha (torch's MultiheadAttention and the head-pruned
    one), sep (Hugging Face layers with separate q/k/v projections, SEPARATE)."""
    if isinstance(module, (nn.MultiheadAttention, HeadPrunedMultiheadAttention)):
        reason = _mha_ok(module) if isinstance(module, nn.MultiheadAttention) else None
        return (None, reason) if reason else ("mha", None)
    if hasattr(module, "qkv") and hasattr(module, "num_heads"):
        if _is_timm_window(module) or _is_torchvision_window(module):
            reason = _window_ok(module)
            return (None, reason) if reason else ("window", None)
        reason = _qkv_ok(module)
        return (None, reason) if reason else ("qkv", None)
    if separate_spec(module) is not None:
        reason = _sep_ok(module)
        return (None, reason) if reason else ("sep", None)
    if "attention" in type(module).__name__.lower() and any(isinstance(c, nn.Linear) for c in module.modules()):
        return None, "not a q/k/v layout this version removes heads from"
    return None, None


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, Optional[str], Optional[str]]]:
    """(name, module, family, reason) of every outermost attention layer. A relative position bias table held
    outside every attention layer (BEiT's use_shared_relative_position_bias) is shared by the layers: those with
    as many heads as it has columns keep their heads (reason says why)."""
    _link_sibling_biases(model)
    found, inside = [], set()
    for name, module in model.named_modules():
        if module in inside:
            continue
        family, reason = attention_family(module)
        if family is None and reason is None:
            continue
        inside.update(module.modules())
        found.append((name, module, family, reason))
    owned = inside | set(_SIBLING_BIAS.get(m) for _, m, _, _ in found)
    shared = {name: m for name, m in model.named_modules() if _holds_table(m) and m not in owned}
    for name, module, family, reason in found:
        for table_name, table in shared.items():
            if family is not None and getattr(table, BIAS_TABLE).shape[-1] == head_count(module, family):
                family, reason = None, (f"a relative position bias table shared by the layers ({table_name}) has one "
                                        "column per head, so no layer can lose a head alone")
        yield name, module, family, reason


EMBED_FAMILIES = ("sep",)  # layers whose q/k/v width does not follow the embedding width (prune.attention.embed)


def embed_tensors(module: nn.Module) -> Optional[tuple[list[tuple[nn.Module, str, int]], list[tuple[nn.Module, str, int]]]]:
    """The tensors an attention layer's embedding width (the residual stream it reads and writes) runs along, as
    (input side, output side) lists of (owner, attribute, dim): the q/k/v weights' columns in, the output
    projection's rows and bias out, and a LayerNorm over the output inside the layer (BERT's BertSelfOutput). None
    where the layer's family does not allow it (packed q/k/v whose head width is embed / heads, window attention)."""
    family, _ = attention_family(module)
    if family not in EMBED_FAMILIES:
        return None
    projections, out, _, _ = separate_spec(module)
    inputs = [(_path(module, p), "weight", 1) for p in projections]
    out_layer = _path(module, out)
    outputs = [(out_layer, "weight", 0)] + ([(out_layer, "bias", 0)] if out_layer.bias is not None else [])
    for norm in module.modules():
        if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (out_layer.out_features,):
            outputs += [(norm, attr, 0) for attr in ("weight", "bias") if getattr(norm, attr) is not None]
    return inputs, outputs


def embed_linears(module: nn.Module) -> tuple[list[str], list[str]]:
    """Names (relative to the layer) of the Linear layers reading (q, k, v) and writing (output projection) the
    embedding width of an EMBED_FAMILIES layer: where the MAC model counts what embed pruning saves."""
    projections, out, _, _ = separate_spec(module)
    return list(projections), [out]


def prune_embed(module: nn.Module, side: str, drop: Sequence[int]) -> None:
    """Remove embedding channels `drop` on one side ("in" or "out") of an EMBED_FAMILIES layer, in place."""
    found = embed_tensors(module)
    if found is None:
        raise ValueError(f"{type(module).__name__}: its embedding width cannot be pruned")
    from compressor.models.slim import fix_attributes  # slim imports this module

    gone = {int(i) for i in drop}
    for owner, attr, dim in found[0 if side == "in" else 1]:
        width = getattr(owner, attr).shape[dim]
        keep_index(owner, attr, dim, torch.tensor([i for i in range(width) if i not in gone], dtype=torch.long))
        fix_attributes(owner)


def keep_index(owner: nn.Module, attr: str, dim: int, index: torch.Tensor) -> None:
    """Keep `index` along `dim` of owner.attr and of its gradient, as a new Parameter (as torch-pruning does: an
    autograd graph recorded before the removal, as in FGGP's events between backward and the optimizer step,
    still refers to the old one)."""
    old = getattr(owner, attr)
    index = index.to(old.device)
    new = nn.Parameter(old.detach().index_select(dim, index).contiguous(), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad.index_select(dim, index).contiguous()
    setattr(owner, attr, new)
    from compressor.prune.lineage import record_replacement  # the optimizer follows (prune/lineage.py)

    record_replacement(old, new, dim, index)


def _relative(module: nn.Module, owner: nn.Module) -> str:
    """`owner`'s name inside `module` with a trailing dot ('' for the module itself)."""
    return next((f"{n}." if n else "" for n, m in module.named_modules() if m is owner), "")


def conform_heads(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """Give every attention layer the head count the saved `shapes` (state dict key -> shape) hold, before the
    tensors are resized to them (models/slim.conform_to_state_dict); returns the layers that changed."""
    changed = []
    for name, module, family, _ in list(attention_modules(model)):
        if family is None:
            continue
        layout = head_layout(module, family)
        owner, attr, _, heads_of, _ = layout.tensors[0]  # the first producer's weight
        key = f"{name}.{_relative(module, owner)}{attr}"
        if key not in shapes:
            continue
        per_head = len(heads_of) // layout.heads  # rows per head: 3 x head_dim packed, head_dim separate
        rows = int(shapes[key][0])
        heads = rows // per_head
        if heads == layout.heads:
            continue
        if heads < 1 or heads * per_head != rows:
            raise ValueError(f"{key} has {rows} rows, not a whole number of heads of {per_head} rows")
        if family == "mha" and isinstance(module, nn.MultiheadAttention):
            module = HeadPrunedMultiheadAttention.like(module, layout.heads)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
        set_head_count(module, family, heads)
        changed.append(name)
    return changed
