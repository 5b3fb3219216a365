"""The layers kept whole because their outputs are the model's outputs: found on the traced forward, not by
matching model.num_classes (a segmentation model's auxiliary head was protected and its main head pruned)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressor.prune import graph as dg
from compressor.prune.snapshot import snapshot
from compressor.prune.importance import ImportanceConfig, build_scorer


class Segmenter(nn.Module):
    """torchvision's layout: a main head, then an auxiliary head (same class count) only used in training."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, classes, 1))
        self.aux_classifier = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1))

    def forward(self, x):
        size = x.shape[-2:]
        return F.interpolate(self.classifier(self.body(self.stem(x))), size=size, mode="bilinear")


class TwoHeads(nn.Module):
    """DeiT's distilled classifier: two linear heads averaged; one hidden layer has as many outputs as classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Linear(10, 10)
        self.head, self.head_dist = nn.Linear(10, 10), nn.Linear(10, 10)

    def forward(self, x):
        x = self.hidden(self.features(x)).relu()
        return (self.head(x) + self.head_dist(x)) / 2


class FrozenTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.out = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.requires_grad_(False)

    def forward(self, ids):
        return self.out(self.fc(self.embed(ids)).relu().mean(1))


def test_the_main_head_of_a_segmentation_model_is_kept_and_its_auxiliary_head_is_not():
    model, x = Segmenter(), torch.randn(1, 3, 16, 16)
    assert dg.output_layers(model, x) == [model.classifier[2]]
    snap = snapshot(model, x, [], build_scorer(ImportanceConfig()))
    pruned_out = {layer for c in snap.candidates for layer, side, *_ in c.members if side == "out"}
    assert "classifier.2" not in pruned_out and "classifier.0" in pruned_out  # the classes stay, the head's input not


def test_every_head_that_reaches_the_output_is_kept_and_a_hidden_layer_with_as_many_outputs_is_not():
    model = TwoHeads()
    assert dg.output_layers(model, torch.randn(1, 3, 8, 8)) == [model.head, model.head_dist]
    kept = dg.resolve_ignored(model, ["hidden"], torch.randn(1, 3, 8, 8))
    assert kept == [model.hidden, model.head, model.head_dist]


def test_a_frozen_model_on_token_ids_finds_its_classifier_and_stays_frozen():
    model = FrozenTokens()
    assert dg.output_layers(model, torch.randint(0, 50, (1, 7))) == [model.out]
    assert not any(p.requires_grad for p in model.parameters())
