"""finetune.bn_recalibration: after a pruning method's last change, batch-norm statistics describe the pruned
model on training data, not the dense model (the sample's DPM run without a fitting schedule reported 10% top-1)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.app.recipe import recipe_from_dict
from compressor.models.loading import build_arch
from compressor.prune.methods import METHODS
from compressor.train.bn_recalibration import batch_norms, recalibrate_batch_norm
from compressor.train.data import build_datasets
from compressor.train.loop import _calibration_batches, fit

from .conftest import tiny_recipe


def _bn_input_means(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per-channel mean of each batch-norm layer's input, averaged over the batches (eval mode)."""
    sums: dict[str, list[torch.Tensor]] = {}
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda m, a: sums.setdefault(names[m], []).append(
        a[0].transpose(0, 1).flatten(1).mean(1))) for m in batch_norms(model)]
    model.eval()
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
    for h in hooks:
        h.remove()
    return {n: torch.stack(v).mean(0) for n, v in sums.items()}


def test_statistics_are_the_plain_average_over_batches_and_settings_come_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    model[2].running_mean.fill_(7.0)  # stale statistics
    data = TensorDataset(torch.randn(24, 2, 6, 6) * 3 + 1, torch.zeros(24, dtype=torch.long))
    batches = list(DataLoader(data, batch_size=8))
    model.train()
    done = recalibrate_batch_norm(model, batches, torch.device("cpu"))
    assert done == {"layers": 1, "batches": 3, "samples": 24}
    with torch.no_grad():  # dropout was off: the statistics of the convolution's own outputs
        means = torch.stack([model[0](x).mean((0, 2, 3)) for x, _ in batches]).mean(0)
        variances = torch.stack([model[0](x).transpose(0, 1).flatten(1).var(1) for x, _ in batches]).mean(0)
    assert torch.allclose(model[2].running_mean, means, atol=1e-5)
    assert torch.allclose(model[2].running_var, variances, rtol=1e-4)
    assert model[2].momentum == 0.3 and model.training and model[1].training


def test_model_without_batch_norm_is_untouched():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batch_norm(model, [(torch.randn(4, 3), None)], torch.device("cpu"))["layers"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _pruned(enabled: bool):
    spec = tiny_recipe(prune={"method": "oneshot", "target": {"macs": 0.5}},
                       finetune={"epochs": 0, "bn_recalibration": {"enabled": enabled, "batches": 2}})
    recipe = recipe_from_dict(spec)
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    # dense statistics from the data, as a trained checkpoint has them
    recalibrate_batch_norm(model, _calibration_batches(train_set, 32, 4), torch.device("cpu"))
    result = fit(model, train_set, val_set, recipe.finetune, recipe.data, method=METHODS.get("oneshot")(recipe.prune_spec()))
    return model.to(memory_format=torch.contiguous_format), result, _calibration_batches(train_set, 32, 2)


@pytest.mark.parametrize("enabled", [True, False])
def test_pruned_model_statistics_follow_its_own_activations(enabled):
    model, result, batches = _pruned(enabled)
    batches = list(batches)
    actual = _bn_input_means(model, batches)
    gaps = {n: (m.running_mean - actual[n]).abs().max().item() for n, m in model.named_modules()
            if m in batch_norms(model)}
    if enabled:
        assert result.bn_recalibration == {"layers": len(gaps), "batches": 2, "samples": 64}
        assert max(gaps.values()) < 0.02, gaps  # later layers saw batch-normalised inputs while estimating
    else:  # the dense model's statistics, sliced: layers behind a pruned one no longer match their inputs
        assert result.bn_recalibration is None
        assert max(gaps.values()) > 0.1, gaps
