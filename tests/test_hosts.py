"""Host executions (oneshot, iterative) for every host, inside the real training loop."""
from __future__ import annotations

import pytest
import torch

from compressor.train.data import build_datasets
from compressor.errors import RecipeError
from compressor.prune.methods import METHODS
from compressor.prune.methods import HOSTS as HOST_REGISTRY
from compressor.prune.methods.hosts import event_epochs, fraction_at
from compressor.models.loading import build_arch, example_inputs
from compressor.app.recipe import recipe_from_dict
from compressor.prune.op_count import snapshot_macs
from compressor.train.loop import fit

from .conftest import tiny_recipe

HOSTS = ["depgraph", "depgraph-sl", "gate-decorator", "taylor"]


def run(method, host, **prune):
    recipe = recipe_from_dict(tiny_recipe(prune={"method": method, "host": host, "target": {"macs": 0.5}, **prune},
                                          finetune={"epochs": 2}))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    dense_macs, dense_params = snapshot_macs(model, example_inputs(recipe.model))
    train, val = build_datasets(recipe.data, recipe.model)
    pruner = METHODS.get(method)(recipe.prune_spec())
    result = fit(model, train, val, recipe.finetune, recipe.data, method=pruner)
    macs, params = snapshot_macs(model, example_inputs(recipe.model))
    return recipe, pruner, result, macs / dense_macs, params / dense_params


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("method", ["oneshot", "iterative"])
def test_host_reaches_target_and_training_continues(method, host):
    schedule = {"events": 2, "start_epoch": 0, "end_epoch": 1} if method == "iterative" else {"start_epoch": 0}
    recipe, pruner, result, macs_ratio, params_ratio = run(method, host, schedule=schedule)
    assert macs_ratio == pytest.approx(0.5, rel=0.02)
    assert params_ratio < 0.8
    events = pruner.summary()["events"]
    assert len(events) == (2 if method == "iterative" else 1)
    assert events[-1]["achieved_macs"] == pytest.approx(macs_ratio, rel=1e-6)
    if method == "iterative":  # linear schedule: half the reduction at the first event
        assert events[0]["asked_macs"] == pytest.approx(0.75)
        assert events[0]["achieved_macs"] > events[1]["achieved_macs"]
    # the optimizer was rebuilt over the slimmer parameters: training went on with finite, falling loss
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
    assert result.history[-1]["params"] == result.history[0]["params"] or method == "iterative"


def test_sparse_learning_regularises_before_selection():
    recipe, pruner, *_ = run("oneshot", "depgraph-sl", schedule={"start_epoch": 1})
    event = pruner.summary()["events"][0]
    assert event["epoch"] == 1 and event["step"] == 4 and event["regularised_steps"] == 4  # one epoch of 128 samples in batches of 32


@pytest.mark.parametrize("host", ["taylor", "gate-decorator"])
def test_host_state_carries_gradient_scores_by_parameter_name(host):
    """The scores a gradient host accumulated go into the checkpoint by parameter name, as plain data, and attach to
    the parameters of a restored model; a checkpoint from before they were saved restores no scores."""
    import copy
    import io
    from types import SimpleNamespace

    from compressor.prune.methods.hosts import make_host

    recipe = recipe_from_dict(tiny_recipe(prune={"method": "iterative", "host": host}))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    saved = make_host(recipe.prune_spec())
    for seed in (1, 2):
        torch.manual_seed(seed)
        model.zero_grad()
        model(torch.randn(4, *recipe.model.input_shape)).square().mean().backward()
        saved.scorer.observe(model)
    saved.regularised_steps = 2
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what load_checkpoint reads

    restored_model = copy.deepcopy(model)  # a fresh process: other parameter objects, same names
    restored = make_host(recipe.prune_spec())
    restored.load_state_dict(state)
    restored.on_train_start(SimpleNamespace(model=restored_model))
    names = dict(restored_model.named_parameters())
    assert restored.scorer.observed_batches == 2 and restored.regularised_steps == 2
    assert len(restored.scorer.sums) == len(saved.scorer.sums) > 0
    for param, total in saved.scorer.sums.items():
        assert torch.equal(restored.scorer.sums[names[saved.scorer.names[param]]], total)

    narrower = next(iter(state["scorer"]["sums"]))  # a sum in a shape the model no longer has is dropped
    state["scorer"]["sums"][narrower] = torch.zeros(1)
    restored.load_state_dict(state)
    restored.on_train_start(SimpleNamespace(model=restored_model))
    assert names[narrower] not in restored.scorer.sums and len(restored.scorer.sums) == len(saved.scorer.sums) - 1

    restored.load_state_dict({})  # an older checkpoint
    restored.on_train_start(SimpleNamespace(model=restored_model))
    assert restored.scorer.observed_batches == 0 and not restored.scorer.sums and restored.regularised_steps == 0


def test_event_schedule_and_shapes():
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "iterative", "schedule": {"events": 4, "start_epoch": 1,
                                                                                    "end_epoch": 5}},
                                          finetune={"epochs": 8}))
    assert event_epochs(recipe.prune_spec(), 4) == [1, 2, 3, 4]
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "iterative", "schedule": {"events": 2, "end_epoch": 1}}))
    assert event_epochs(recipe.prune_spec(), 2) == [0, 0.5]
    assert fraction_at(0.5, "linear") == 0.5
    assert fraction_at(0.5, "cubic") == pytest.approx(0.875)
    assert [fraction_at(p / 4, "cubic") for p in range(5)] == sorted(fraction_at(p / 4, "cubic") for p in range(5))


def test_zero_epoch_recipe_still_prunes():
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "iterative", "schedule": {"events": 3}}, finetune={"epochs": 0}))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, 4, 1)
    dense = snapshot_macs(model, example_inputs(recipe.model))[0]
    train, val = build_datasets(recipe.data, recipe.model)
    pruner = METHODS.get("iterative")(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=pruner)
    assert len(pruner.records) == 3
    assert snapshot_macs(model, example_inputs(recipe.model))[0] == pytest.approx(0.5 * dense, rel=0.02)


def test_host_importance_conflict_is_a_recipe_error():
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "host": "gate-decorator",
                                                 "importance": {"kind": "magnitude"}}))
    with pytest.raises(RecipeError, match="host gate-decorator ranks by 'gate'"):
        HOST_REGISTRY.get(recipe.prune.host).importance(recipe.prune)
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "host": "taylor"}))
    assert HOST_REGISTRY.get(recipe.prune.host).importance(recipe.prune).kind == "taylor"


def test_unknown_method_suggests():
    with pytest.raises(RecipeError, match="did you mean oneshot"):
        METHODS.get("oneshoot")
