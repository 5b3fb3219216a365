"""Layers torch-pruning cannot prune safely are handled (GroupNorm in whole groups) or locked and named by
`inspect` (weight-standardised convs with a gain, channel splits); anything that still breaks the pruned model is a
clear error naming the layer (spec: docs/planning.md)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compressor.prune import graph as dg
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import Constraints, allowed_removals, plan_for_macs
from compressor.prune.removal import remove
from compressor.prune.snapshot import snapshot
from compressor.errors import NotPrunableError
from compressor.prune.importance import build_scorer
from compressor.app.inspection import inspect_model
from compressor.models.config import ModelConfig
from compressor.prune.importance import ImportanceConfig

from . import helpers_models as hm

EXAMPLE = torch.randn(2, 3, 16, 16)
CFG = ModelConfig(num_classes=10, in_channels=3, input_shape=[3, 16, 16])


def _prune(model: nn.Module, macs: float = 0.6, **cons):
    snap = snapshot(model, EXAMPLE[:1], [], build_scorer(ImportanceConfig(kind="magnitude")))
    plan = plan_for_macs(snap, macs * snap.total_macs, Constraints(**cons))
    work = copy.deepcopy(model).eval()
    remove(work, EXAMPLE[:1], plan)
    return snap, plan, work


def test_groupnorm_loses_whole_groups_and_keeps_running():
    model = hm.tiny_groupnorm().eval()
    snap, plan, work = _prune(model)
    assert plan, "nothing planned"
    norms = [m for m in work.modules() if isinstance(m, nn.GroupNorm)]
    assert [n.num_channels // n.num_groups for n in norms] == [8, 16]  # group sizes kept, fewer groups
    assert any(n.num_groups < 3 for n in norms)
    with torch.no_grad():
        assert work(EXAMPLE).shape == (2, 10)
    achieved = snapshot_macs(work, EXAMPLE[:1])[0]
    assert achieved == pytest.approx(snap.macs_after(plan), rel=0.01)  # the planner counted the whole groups


def test_single_group_groupnorm_loses_any_channels():
    # GroupNorm(1, C) normalises over all channels (PoolFormer): no group to keep whole
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(1, 32), nn.ReLU(), nn.Conv2d(32, 32, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    _, plan, work = _prune(model, 0.7)
    assert plan and work[1].num_groups == 1 and work[1].num_channels == work[0].out_channels < 32
    with torch.no_grad():
        assert work(EXAMPLE).shape == (2, 10)


def test_groupnorm_group_is_one_class_of_channels():
    model = hm.tiny_groupnorm().eval()
    snap = snapshot(model, EXAMPLE[:1], [], build_scorer(ImportanceConfig(kind="magnitude")))
    first = next(c for c in snap.candidates if c.root == "0")
    assert first.unit == 8 and sorted(len(c) for c in first.classes) == [8, 8, 8]
    assert allowed_removals(24, Constraints(max_layer_ratio=0.9), "0", first.unit) == [0, 8, 16]


def test_weight_standardised_conv_with_gain_is_locked_and_named():
    model = hm.tiny_ws_conv().eval()
    report = inspect_model(model, CFG)
    assert "gain" in report.unprunable["2"] and "GainConv2d" in report.unprunable["2"]
    assert "coupled to 2: custom layer GainConv2d" in report.unprunable["0"]
    assert [g.root for g in report.groups] == ["4"]  # the plain conv after it is still prunable
    _, plan, work = _prune(model, 0.9)
    assert set(plan) == {"4"} and work[2].gain.shape[0] == work[2].out_channels == 32
    with torch.no_grad():
        assert work(EXAMPLE).shape == (2, 10)


def test_channel_split_is_locked_and_named():
    model = hm.tiny_csp().eval()
    report = inspect_model(model, CFG)
    assert "channel split" in report.unprunable["2.expand"]
    assert all(g.root != "2.expand" for g in report.groups)
    _, plan, work = _prune(model, 0.8)
    with torch.no_grad():
        assert work(EXAMPLE).shape == (2, 10)


def test_a_model_broken_by_the_removal_names_the_failing_layer():
    model = hm.tiny_fixed_scale().eval()
    with pytest.raises(NotPrunableError) as err:
        _prune(model, 0.6)
    message = err.value.render()
    assert "fails in layer 2 (_FixedScale" in message and "model.ignore" in message
    assert isinstance(err.value.__cause__, RuntimeError)  # --debug shows the chained cause


def test_groups_with_out_of_range_indices_are_rejected():
    model = hm.tiny_groupnorm().eval()
    graph = dg.trace(model, EXAMPLE[:1])
    groups = dg._all_groups(graph, dg.resolve_ignored(model, [], EXAMPLE[:1]))
    assert dg._index_problem(graph, groups[0], dg.module_names(model)) is None
    first = groups[0][0]
    broken = [SimpleNamespace(dep=first.dep, idxs=[*first.idxs[:-1], 999]), *groups[0][1:]]  # a mis-mapped split
    problem = dg._index_problem(graph, broken, dg.module_names(model))
    assert problem is not None and "index 999" in problem


def test_conv_subclasses_with_their_own_forward_count_their_macs():
    # torch-pruning's counter looks hooks up by exact type: timm's StdConv2d (BiT) counted 0 MACs, so the MAC
    # target was computed on the few layers it did count (resnetv2_50x1_bit kept 0.236 for 0.7 asked)
    class OwnForward(nn.Conv2d):
        def forward(self, x):
            return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    custom = nn.Sequential(OwnForward(3, 8, 3, padding=1), nn.ReLU(), OwnForward(8, 8, 3, padding=1))
    custom.load_state_dict(plain.state_dict())
    assert snapshot_macs(custom, EXAMPLE[:1]) == snapshot_macs(plain, EXAMPLE[:1])
    assert snapshot_macs(plain, EXAMPLE[:1])[0] == 16 * 16 * (8 * 3 * 9 + 8 + 8 * 8 * 9 + 8) + 16 * 16 * 8  # ReLU
