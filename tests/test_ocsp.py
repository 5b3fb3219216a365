"""OCSP: Jaccard stability, deterministic search, exact shrinkage, pruning at the first stable epoch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from compressor.train.data import build_datasets
from compressor.prune.methods.base import PruningMethod
from compressor.prune.methods.ocsp import OCSP, jaccard, stability
from compressor.models.loading import build_arch, example_inputs
from compressor.app.recipe import recipe_from_dict
from compressor.prune.op_count import snapshot_macs
from compressor.train.loop import fit, lr_factor

from .conftest import tiny_recipe


def make(epochs=4, **ocsp):
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "ocsp", "target": {"macs": 0.5}, "ocsp": ocsp},
                                          finetune={"epochs": epochs}))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train, val = build_datasets(recipe.data, recipe.model)
    return recipe, model, train, val


def test_jaccard_indicator_on_hand_built_sets():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 4)
    assert jaccard(set(), set()) == 1.0
    now = {"a": {0, 1, 2, 3}, "b": {0, 1}}
    before = {"a": {0, 1, 2, 5}, "b": {0, 1}}
    # a: |{0,1,2}| / |{0,1,2,3,5}| = 3/5 ; b: 1 ; mean 0.8
    assert stability(now, before) == pytest.approx(0.8)


def test_selection_at_a_fixed_state_is_deterministic_and_meets_the_target():
    recipe, model, _, _ = make()
    ocsp = OCSP(recipe.prune_spec())
    ctx = SimpleNamespace(model=model, device=torch.device("cpu"))
    plan_a, snap = ocsp.candidate(ctx)
    plan_b, _ = ocsp.candidate(ctx)
    assert plan_a == plan_b
    assert snap.macs_after(plan_a) == pytest.approx(0.5 * snap.total_macs, rel=0.02)
    for cand in snap.candidates:  # keep floor: every group keeps at least 25% of its channels
        assert cand.width - len(plan_a.get(cand.root, [])) >= 0.25 * cand.width


def test_shrinkage_multiplies_exactly_the_selected_slices():
    recipe, model, _, _ = make()
    ocsp = OCSP(recipe.prune_spec())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = SimpleNamespace(model=model, device=torch.device("cpu"), optimizer=opt)
    ocsp.plan = {"layer1.0.conv1": [2, 5]}
    ocsp.reg = 0.5
    with torch.no_grad():
        model.layer1[0].bn1.bias.uniform_(0.1, 0.2)  # BN beta starts at zero: make its scaling visible
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ocsp.after_step(ctx)
    after = model.state_dict()
    factor = 1 - 0.5 * 0.1
    for key in ("layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias"):
        assert torch.allclose(after[key][[2, 5]], before[key][[2, 5]] * factor)
        others = [i for i in range(16) if i not in (2, 5)]
        assert torch.equal(after[key][others], before[key][others])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(changed) == ["layer1.0.bn1.bias", "layer1.0.bn1.weight", "layer1.0.conv1.weight"]


class LRProbe(PruningMethod):
    def __init__(self, inner):
        self.inner, self.lrs = inner, []

    def on_train_start(self, ctx): self.inner.on_train_start(ctx)
    def on_epoch_end(self, ctx): self.inner.on_epoch_end(ctx)
    def finalize(self, ctx): self.inner.finalize(ctx)

    def after_step(self, ctx):
        self.lrs.append((ctx.step, ctx.optimizer.param_groups[0]["lr"]))
        self.inner.after_step(ctx)


def test_prunes_at_first_stable_epoch_and_schedule_continues():
    recipe, model, train, val = make(epochs=5, lag=1, window=1, threshold=0.5, reg_start=1)
    ocsp = OCSP(recipe.prune_spec())
    probe = LRProbe(ocsp)
    dense = snapshot_macs(model, example_inputs(recipe.model))[0]
    result = fit(model, train, val, recipe.finetune, recipe.data, method=probe)
    summary = ocsp.summary()
    first_stable = next(h["epoch"] for h in summary["stability"] if h["smoothed"] is not None and h["smoothed"] >= 0.5)
    assert summary["pruned_at"] == first_stable and summary["events"][0]["forced"] is False
    assert summary["reg_started"] == 1
    # the LR followed the cosine schedule step by step, across the optimizer rebuild
    steps_per_epoch = 4
    for step, lr in probe.lrs:
        assert lr == pytest.approx(recipe.finetune.optimizer.lr * lr_factor(recipe.finetune.scheduler, step - 1,
                                                                             5 * steps_per_epoch, steps_per_epoch))
    assert snapshot_macs(model, example_inputs(recipe.model))[0] == pytest.approx(0.5 * dense, rel=0.02)
    assert result.history[-1]["params"] < result.history[0]["params"]


def test_never_stable_run_is_pruned_at_the_end():
    recipe, model, train, val = make(epochs=2, threshold=1.0)
    ocsp = OCSP(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=ocsp)
    assert ocsp.pruned_at == 2 and ocsp.result["forced"] is True
    assert ocsp.result["achieved_macs"] == pytest.approx(0.5, rel=0.02)
