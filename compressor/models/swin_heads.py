"""torchvision's Swin window attention with fewer heads than its input width implies.

torchvision's `shifted_window_attention` takes the head width as `C // num_heads` of the input width C and joins the
heads back to C channels, so a layer that lost heads cannot run it. The classes here are subclasses of
ShiftedWindowAttention / ShiftedWindowAttentionV2 with the same parameters, buffers and names (a state dict loads
into either) whose forward takes the head width from the qkv projection (rows = 3 x heads x head width) instead.
With all heads it computes what torchvision's forward computes (tested); `adopt` turns a torchvision layer into one
in place (its class changes, nothing else), which models/attention.set_head_count does before heads are removed.

Per-head tensors besides q/k/v and proj: v1's relative_position_bias_table (one column per head), v2's logit_scale
(one entry per head) and the last Linear of cpb_mlp (one output row per head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2


def _windows_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """The additive mask (windows, N, N) that keeps a shifted window's tokens from attending across the regions the
    cyclic shift brought together: 0 within a region, -100 across."""
    regions = like.new_zeros((pad_h, pad_w))
    label = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            regions[rows, cols] = label
            label += 1
    regions = regions.view(pad_h // window[0], window[0], pad_w // window[1], window[1]).permute(0, 2, 1, 3)
    regions = regions.reshape(-1, window[0] * window[1])
    apart = regions.unsqueeze(1) - regions.unsqueeze(2)
    return apart.masked_fill(apart != 0, -100.0).masked_fill(apart == 0, 0.0)


def head_window_attention(module: ShiftedWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention of `module` on x [B, H, W, C] with module.num_heads heads of the qkv's head width."""
    batch, height, width, channels = x.shape
    window, shift = list(module.window_size), list(module.shift_size)
    x = F.pad(x, (0, 0, 0, (window[1] - width % window[1]) % window[1], 0, (window[0] - height % window[0]) % window[0]))
    _, pad_h, pad_w, _ = x.shape
    shift = [0 if window[i] >= (pad_h, pad_w)[i] else shift[i] for i in range(2)]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pad_h // window[0]) * (pad_w // window[1])
    tokens = window[0] * window[1]
    x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, tokens, channels)

    heads = module.num_heads
    head_dim = module.qkv.out_features // (3 * heads)
    logit_scale = getattr(module, "logit_scale", None)
    bias = module.qkv.bias
    if logit_scale is not None and bias is not None:  # v2: no key bias
        bias = torch.cat([bias[: heads * head_dim], torch.zeros_like(bias[heads * head_dim: 2 * heads * head_dim]),
                          bias[2 * heads * head_dim:]])
    qkv = F.linear(x, module.qkv.weight, bias).reshape(x.size(0), tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention with a learnt per-head temperature
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    attn = attn + module.get_relative_position_bias()
    if sum(shift) > 0:
        mask = _windows_mask(pad_h, pad_w, window, shift, x)
        attn = attn.view(-1, windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=module.attention_dropout, training=module.training)
    x = (attn @ v).transpose(1, 2).reshape(x.size(0), tokens, heads * head_dim)
    x = F.dropout(F.linear(x, module.proj.weight, module.proj.bias), p=module.dropout, training=module.training)

    x = x.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


class HeadPrunedShiftedWindowAttention(ShiftedWindowAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_window_attention(self, x)


class HeadPrunedShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_window_attention(self, x)


PRUNED = {ShiftedWindowAttention: HeadPrunedShiftedWindowAttention,
          ShiftedWindowAttentionV2: HeadPrunedShiftedWindowAttentionV2}


def is_torchvision_window(module: nn.Module) -> bool:
    return isinstance(module, ShiftedWindowAttention)


def adopt(module: ShiftedWindowAttention) -> None:
    """Give a torchvision window attention layer the head-width-aware forward (in place: only its class changes)."""
    if type(module) in PRUNED:
        module.__class__ = PRUNED[type(module)]
