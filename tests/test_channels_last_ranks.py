"""Channels-last training leaves alone the tensors it cannot convert: a Conv3d's 5-D weight (timm's
lambda_resnet26t has them beside its Conv2d layers) and buffers of other ranks; `model.to(memory_format=
torch.channels_last)` raised "required rank 4 tensor to use channels_last format"."""
from __future__ import annotations

import torch
from torch import nn

from compressor.app.recipe import recipe_from_dict
from compressor.models.layers import set_memory_format
from compressor.train.data import build_datasets
from compressor.train.loop import fit

from .conftest import tiny_recipe


class WithConv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.lambda_conv = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.register_buffer("position", torch.randn(16, 1, 1))  # rank 3
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.conv(x).relu() + self.position
        y = self.lambda_conv(y.unsqueeze(1)).mean(1)
        return self.fc(y.mean((2, 3)))


def test_only_4d_tensors_go_channels_last_and_all_come_back():
    model = WithConv3d()
    set_memory_format(model, True)
    assert model.conv[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv[2].weight.is_contiguous()
    assert model.lambda_conv.weight.is_contiguous() and model.position.is_contiguous()
    set_memory_format(model, False)
    assert all(t.is_contiguous() for t in [*model.parameters(), *model.buffers()])


def test_a_model_with_a_5d_weight_trains_on_the_cpu():
    recipe = recipe_from_dict(tiny_recipe(finetune={"epochs": 1}))
    train_set, val_set = build_datasets(recipe.data, recipe.model)
    model = WithConv3d()
    result = fit(model, train_set, val_set, recipe.finetune, recipe.data, device="cpu")
    assert [h["epoch"] for h in result.history] == [1]
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
