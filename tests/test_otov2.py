"""The otov2 host: half-space projection, zero groups removed without changing the outputs, the MAC target."""
from __future__ import annotations

import pytest
import torch

from compressor.app.recipe import recipe_from_dict
from compressor.models.loading import build_arch, example_inputs
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import MISS_TOLERANCE
from compressor.prune.removal import remove
from compressor.prune.importance import Slice
from compressor.prune.methods import METHODS, hosts
from compressor.prune.methods.otov2 import half_space_project, rows_of
from compressor.train.data import build_datasets
from compressor.train.loop import check_method_schedule, fit
from tests.conftest import tiny_recipe


def test_half_space_projection_zeroes_crossing_groups_exactly_and_never_flips_a_kept_one():
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [2.0, 2.0]])
    pairs = [(Slice(w, 0, [0, 1, 2, 3], output=True), [0, 1, 2, 3])]
    before = rows_of(pairs, {0, 1, 2})
    w.copy_(torch.tensor([[-0.3, 0.1], [2.5, -0.5], [0.1, -0.05], [-2.0, -2.0]]))  # the optimizer's step
    zeroed = half_space_project(pairs, before, [0, 1, 2], epsilon=0.0)
    assert zeroed == [0]  # (-0.3, 0.1) . (1, 2) = -0.1 < 0: crossed the half-space -> exactly zero
    assert torch.equal(w[0], torch.zeros(2))
    assert torch.equal(w[1], torch.tensor([2.5, -0.5])) and float(w[1] @ torch.tensor([3.0, -1.0])) > 0
    assert torch.equal(w[2], torch.tensor([0.1, -0.05]))  # 0.025 > 0: kept, same direction side
    assert torch.equal(w[3], torch.tensor([-2.0, -2.0]))  # not redundant: never projected, even when it flipped
    w[2] = torch.tensor([0.1, -0.05])
    assert half_space_project(pairs, rows_of(pairs, {2}), [2], epsilon=0.5) == []  # no move: dot = ||x||^2
    before = rows_of(pairs, {2})
    w[2] = torch.tensor([0.01, -0.01])
    assert half_space_project(pairs, before, [2], epsilon=0.5) == [2]  # a margin zeroes groups near the origin


def _recipe(**prune):
    return recipe_from_dict(tiny_recipe(
        prune={"method": "oneshot", "host": "otov2", "target": {"macs": 0.5},
               "schedule": {"events": 1, "start_epoch": 2, "end_epoch": 3}, "otov2": {"lmbda": 5.0}, **prune},
        finetune={"epochs": 3}))


def test_zero_groups_are_removed_without_changing_the_outputs_and_the_target_holds(monkeypatch):
    recipe = _recipe()
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train, val = build_datasets(recipe.data, recipe.model)
    example = example_inputs(recipe.model)
    dense_macs = snapshot_macs(model, example)[0]
    x = torch.randn(8, *recipe.model.input_shape)
    seen = {}
    original = remove

    def watched(net, ex, plan):
        was = net.training
        net.eval()
        with torch.no_grad():
            seen["before"] = net(x)
        removed = original(net, ex, plan)
        with torch.no_grad():
            seen["after"] = net(x)
        net.train(was)
        return removed

    monkeypatch.setattr(hosts, "remove", watched)
    method = METHODS.get("oneshot")(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=method)
    phase = method.summary()["host_state"]["phases"][0]  # before the removal
    assert phase["redundant"] > 0 and phase["zeroed"] == phase["redundant"]  # HSPG drove every one to exact zero
    assert torch.allclose(seen["before"], seen["after"], rtol=0, atol=1e-5)  # removing zero groups: same outputs
    assert snapshot_macs(model, example)[0] / dense_macs == pytest.approx(0.5, rel=MISS_TOLERANCE)


def test_an_event_before_any_hspg_step_is_a_schedule_warning():
    recipe = _recipe(schedule={"events": 1, "start_epoch": 0, "end_epoch": 1})
    warnings = check_method_schedule(METHODS.get("oneshot")(recipe.prune_spec()), 128, recipe.finetune, recipe.data)
    assert any("before any HSPG step" in w and "start_epoch" in w for w in warnings)
    recipe = _recipe()
    assert not check_method_schedule(METHODS.get("oneshot")(recipe.prune_spec()), 128, recipe.finetune, recipe.data)
