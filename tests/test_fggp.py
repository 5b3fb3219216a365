"""FGGP: cubic schedule, two-step selection, masks that never regrow, 2:4 pattern, structured slimming."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from compressor.train.data import build_datasets
from compressor.prune.methods.base import PruningMethod
from compressor.prune.methods.fggp import FGGP, _input_groups, cubic_sparsity, event_steps, two_step_select
from compressor.models.loading import build_arch, example_inputs
from compressor.app.recipe import recipe_from_dict
from compressor.prune.op_count import snapshot_macs
from compressor.train.loop import fit

from .conftest import tiny_recipe


def make(granularity="unstructured", epochs=2, **fggp):
    recipe = recipe_from_dict(tiny_recipe(
        prune={"method": "fggp", "target": {"macs": 0.5},
               "fggp": {"granularity": granularity, "sparsity": 0.8, "interval": 2, "end": 0.75, **fggp}},
        finetune={"epochs": epochs}))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train, val = build_datasets(recipe.data, recipe.model)
    return recipe, model, train, val


def test_cubic_schedule_matches_formula_and_is_monotone():
    t0, t1, s_i, s_f = 10, 110, 0.1, 0.9
    for t in (10, 35, 60, 85, 110):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3
        assert cubic_sparsity(t, t0, t1, s_i, s_f) == pytest.approx(expected)
    values = [cubic_sparsity(t, t0, t1, s_i, s_f) for t in range(0, 130)]
    assert values[0] == s_i and values[-1] == s_f
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert event_steps(0, 10, 4) == [0, 4, 8, 10] and event_steps(0, 8, 4) == [0, 4, 8]


def test_two_step_selection_prunes_k_from_the_low_gradient_fraction():
    g = torch.Generator().manual_seed(0)
    grad, weight = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    active = torch.rand(1000, generator=g) > 0.3
    chosen = two_step_select(grad, weight, active, k=100, r=0.5, selection="gradient-first")
    assert chosen.numel() == 100 and active[chosen].all()
    act_grads = grad[active].abs().sort().values
    pool_edge = act_grads[int(0.5 * active.sum()) - 1]
    assert (grad[chosen].abs() <= pool_edge).all()
    # among the low-gradient pool, the chosen ones have the smallest |w|
    pool = torch.nonzero(active).flatten()
    pool = pool[torch.argsort(grad[pool].abs(), stable=True)[: int(0.5 * active.sum())]]
    rest = torch.tensor(sorted(set(pool.tolist()) - set(chosen.tolist())))
    assert weight[chosen].abs().max() <= weight[rest].abs().min()
    # k is capped at r * active
    assert two_step_select(grad, weight, active, k=10_000, r=0.5, selection="gradient-first").numel() == int(0.5 * active.sum())
    assert torch.equal(two_step_select(grad, weight, active, 5, 0.5, "magnitude"),
                       torch.nonzero(active).flatten()[torch.argsort(weight[active].abs(), stable=True)[:5]])


def test_each_event_prunes_exactly_k_t_from_low_gradient_weights():
    recipe, model, train, val = make()
    fggp = FGGP(recipe.prune_spec())
    ctx = SimpleNamespace(model=model, optimizer=None, total_steps=8, device=torch.device("cpu"), step=0)
    fggp.on_train_start(ctx)
    x, y = next(iter(torch.utils.data.DataLoader(train, batch_size=32)))
    for step in fggp.steps[:3]:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = {n: m.clone() for n, m in fggp.masks.items()}
        grads = torch.cat([model.get_submodule(n).weight.grad.flatten() for n in fggp.masks])
        fggp.mask_event(ctx, step, final=False)
        old = torch.cat([m.flatten() for m in before.values()])
        new = torch.cat([m.flatten() for m in fggp.masks.values()])
        newly = old & ~new
        total = old.numel()
        k_t = round(fggp.target_sparsity(step) * total) - int((~old).sum())
        assert int(newly.sum()) == min(k_t, int(0.5 * old.sum()))
        edge = grads[old].abs().sort().values[int(0.5 * old.sum()) - 1]
        assert (grads[newly].abs() <= edge).all()
        assert all((model.get_submodule(n).weight[~m] == 0).all() for n, m in fggp.masks.items())


class Probe(PruningMethod):
    def __init__(self, inner, fn):
        self.inner, self.fn = inner, fn

    def on_train_start(self, ctx): self.inner.on_train_start(ctx)
    def after_backward(self, ctx): self.inner.after_backward(ctx)
    def finalize(self, ctx): self.inner.finalize(ctx)

    def after_step(self, ctx):
        self.inner.after_step(ctx)
        self.fn(ctx)


def test_masked_weights_and_momentum_stay_zero():
    recipe, model, train, val = make(epochs=3)
    fggp = FGGP(recipe.prune_spec())
    violations = []

    def check(ctx):
        for name, mask in fggp.masks.items():
            p = ctx.model.get_submodule(name).weight
            buf = ctx.optimizer.state.get(p, {}).get("momentum_buffer")
            if (p[~mask] != 0).any() or (buf is not None and (buf[~mask] != 0).any()):
                violations.append((ctx.step, name))

    fit(model, train, val, recipe.finetune, recipe.data, method=Probe(fggp, check))
    assert not violations
    assert fggp.sparsity()["overall"] == pytest.approx(0.8, abs=0.01)
    assert fggp.summary()["events"][-1]["target_sparsity"] == pytest.approx(0.8)


def test_two_of_four_pattern_holds_after_training():
    recipe, model, train, val = make("2:4", epochs=3)
    fggp = FGGP(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=fggp)
    assert fggp.masks
    for name in fggp.masks:
        groups = _input_groups(model.get_submodule(name).weight.detach())
        assert ((groups != 0).sum(1) <= 2).all(), name
    assert fggp.sparsity()["overall"] == pytest.approx(0.5)
    assert "conv1" not in fggp.masks  # the first conv (1 input channel) is not prunable in groups of 4


def test_two_of_four_masks_of_a_model_training_in_channels_last(monkeypatch):
    """Channels-last weights give channels-last masks, whose (groups, 4) view along the input dimension is a view
    of the mask itself, not a copy: the event's write-back raised "some elements of the input tensor and the
    written-to tensor refer to a single memory location" (training chooses channels-last where it is faster)."""
    from compressor.train import loop

    monkeypatch.setattr(loop, "training_channels_last", lambda ctx: True)
    recipe, model, train, val = make("2:4", epochs=1)
    fggp = FGGP(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=fggp)
    assert any(m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous()
               for m in fggp.masks.values())
    for name in fggp.masks:
        assert ((_input_groups(model.get_submodule(name).weight.detach()) != 0).sum(1) <= 2).all(), name
    assert fggp.sparsity()["overall"] == pytest.approx(0.5)


def test_structured_fggp_reaches_mac_target_and_slims():
    recipe, model, train, val = make("structured")
    dense_macs, dense_params = snapshot_macs(model, example_inputs(recipe.model))
    fggp = FGGP(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=fggp)
    macs, params = snapshot_macs(model, example_inputs(recipe.model))
    assert macs == pytest.approx(0.5 * dense_macs, rel=0.02) and params < dense_params
    events = fggp.summary()["events"]
    assert len(events) == len(fggp.steps) and events[-1]["asked_macs"] == pytest.approx(0.5)
    assert all(a["asked_macs"] >= b["asked_macs"] for a, b in zip(events, events[1:]))


def test_unstructured_compress_reports_sparsity_and_zipped_size(tmp_path):
    """The whole chain for unstructured FGGP: per-layer and overall sparsity, the plain statement that dense
    runtimes gain no latency, a parity-checked ONNX that keeps the zeros, and its zipped size next to dense."""
    import json

    import yaml

    from .conftest import invoke_cli

    recipe = tiny_recipe(prune={"method": "fggp", "fggp": {"granularity": "unstructured", "sparsity": 0.9,
                                                           "interval": 2, "end": 0.75}},
                         finetune={"epochs": 2}, bench={"backends": []})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke_cli("compress", "zoo:resnet20", "--recipe", tmp_path / "r.yaml", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    sparsity = report["method"]["sparsity"]
    assert sparsity["overall"] == pytest.approx(0.9, abs=0.001) and len(sparsity["per_layer"]) >= 19
    # 8 steps, events at 0, 2, 4, 6: the schedule is steeper than r = 0.5 allows, so the last event tops up by
    # magnitude (and says so) instead of ending at 0.875
    last = report["method"]["events"][-1]
    assert last["by_magnitude"] > 0 and "were pruned by magnitude to reach sparsity 0.900" in result.stderr
    dense, comp = report["dense"], report["compressed"]
    assert comp["onnx_bytes"] == pytest.approx(dense["onnx_bytes"], rel=0.01)  # the zeros stay in the file
    assert comp["onnx_zipped_bytes"] < 0.45 * dense["onnx_zipped_bytes"]
    assert report["parity"]["onnx"]["passed"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Sparsity" in md and "Overall sparsity of the pruned layers: **0.90" in md
    assert "dense runtimes (ONNX Runtime CPU, torch) gain no latency" in md
    assert f"{comp['onnx_zipped_bytes'] / dense['onnx_zipped_bytes']:.3f} |" in md
