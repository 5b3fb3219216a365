"""prune/layer_cost.py: how a layer's cost scales with its kept channels, checked against the op counter's MACs of
the layer rebuilt at the kept widths."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.models.attention import HeadPrunedMultiheadAttention
from compressor.prune.heads import head_root, remove_heads
from compressor.prune.latency_cost import Curve
from compressor.prune.layer_cost import LayerDims, channel_share, input_factor, kept_fraction, layer_dims
from compressor.prune.op_count import snapshot_macs


def _macs(layer: nn.Module, example: torch.Tensor) -> float:
    return snapshot_macs(nn.Sequential(layer), example)[0]


@pytest.mark.parametrize("dense, kept, removed, dims, fraction", [
    # conv: outputs x inputs
    ((8, 16, 1), (6, 12, 1), (4, 2), (16, 8, False), 12 / 16 * 6 / 8),
    # grouped conv (4 groups kept): each output's input slice shrinks with the inputs, the same rule
    ((8, 16, 4), (4, 8, 4), (8, 4), (16, 8, False), 8 / 16 * 4 / 8),
    # depthwise conv: its inputs are its outputs, the cost follows the outputs alone
    ((8, 8, 8), (6, 6, 6), (2, 2), (8, 8, True), 6 / 8),
])
def test_conv_cost_scales_as_the_op_counter_counts(dense, kept, removed, dims, fraction):
    def conv(c_in, c_out, groups):
        return nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, bias=False)

    big, small = conv(*dense), conv(*kept)
    assert layer_dims(big) == LayerDims(*dims)
    assert kept_fraction(layer_dims(big), *removed) == pytest.approx(fraction, rel=1e-12)
    assert _macs(small, torch.randn(1, kept[0], 10, 10)) / _macs(big, torch.randn(1, dense[0], 10, 10)) == \
        pytest.approx(fraction, rel=1e-9)


def test_linear_cost_scales_with_outputs_times_inputs():
    big, small = nn.Linear(12, 20, bias=False), nn.Linear(9, 15, bias=False)
    assert layer_dims(big) == LayerDims(20, 12, False)
    assert kept_fraction(layer_dims(big), 5, 3) == pytest.approx(15 / 20 * 9 / 12)
    assert _macs(small, torch.randn(2, 9)) / _macs(big, torch.randn(2, 12)) == pytest.approx(15 / 20 * 9 / 12)
    assert channel_share(layer_dims(big), "out") == pytest.approx(1 / 20)
    assert channel_share(layer_dims(big), "in") == pytest.approx(1 / 12)


def test_depthwise_inputs_and_norms_carry_no_share_of_their_own():
    depthwise, norm = layer_dims(nn.Conv2d(8, 8, 3, groups=8)), layer_dims(nn.BatchNorm2d(8))
    assert depthwise == LayerDims(8, 8, True) and norm == LayerDims(8, 8, True)
    assert channel_share(depthwise, "out") == pytest.approx(1 / 8) and channel_share(depthwise, "in") == 0.0
    assert input_factor(depthwise, 3) == 1.0  # the kept inputs are its kept outputs, already counted
    assert input_factor(LayerDims(16, 8, False), 6) == pytest.approx(0.75)
    assert input_factor(LayerDims(16, 8, False), -2) == 0.0  # never a negative cost
    assert layer_dims(nn.ReLU()) is None


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_a_head_pruned_attention_layer_scales_with_its_inner_width():
    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(2, 10, 16)
    dense_dims = layer_dims(model.attn)
    assert dense_dims == LayerDims(16, 16, True)  # inner width (4 heads x 4), embedding width
    assert layer_dims(model.attn, attention=False) is None
    dense = snapshot_macs(model, x)[0]
    remove_heads(model, head_root("attn"), [1])
    assert isinstance(model.attn, HeadPrunedMultiheadAttention)
    assert layer_dims(model.attn) == LayerDims(12, 16, True)
    predicted = kept_fraction(dense_dims, removed_out=4, removed_in=16)  # the embedding side does not count
    assert predicted == pytest.approx(0.75)
    # exact but for the output projection's bias (embedding-wide, per token), which stays
    assert snapshot_macs(model, x)[0] / dense == pytest.approx(predicted, rel=0.01)
    assert snapshot_macs(model, x)[0] / dense > predicted


def test_the_latency_curve_uses_the_same_input_factor():
    curve = Curve([8, 16], [1.0, 2.0], out=16, inputs=8, depthwise=False)
    assert curve.dims == LayerDims(16, 8, False)
    assert curve.cost(16, 6) == pytest.approx(curve.at(16) * input_factor(curve.dims, 6)) == pytest.approx(1.5)
    assert Curve([8, 16], [1.0, 2.0], 16, 16, True).cost(8, 4) == pytest.approx(1.0)
