"""Subsets (data.train_subset / val_subset, verify samples, calibration batches) are seeded random draws, not the
first N items: a class-sorted dataset (an imagefolder) must give many classes, the same ones everywhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from compressor.train.data import SUBSET_SEED, build_datasets, sample_batch, subset_indices
from compressor.app.recipe import recipe_from_dict

from .conftest import tiny_recipe

CLASSES, PER_CLASS = 20, 50


def sorted_datasets():
    """(train, val) sorted by class, as torchvision's ImageFolder lists them (a data.factory for the tests)."""
    def make(offset: float):
        labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
        images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 16, 16) + offset
        return TensorDataset(images.contiguous(), labels)

    return make(0.0), make(0.5)


def sorted_recipe(**data):
    return recipe_from_dict(tiny_recipe(
        model={"num_classes": CLASSES},
        data={"kind": "python", "factory": "tests.test_subsets:sorted_datasets", **data}))


def labels_of(dataset) -> torch.Tensor:
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))])


def test_subsets_of_a_class_sorted_dataset_cover_most_classes():
    recipe = sorted_recipe(train_subset=100, val_subset=60)
    train, val = build_datasets(recipe.data, recipe.model)
    assert len(train) == 100 and len(val) == 60
    # the first 100 items would be 2 classes, the first 60 just 2 as well
    assert labels_of(train).unique().numel() >= 0.8 * CLASSES
    assert labels_of(val).unique().numel() >= 0.8 * CLASSES
    assert len(set(train.indices)) == 100 and list(train.indices) == sorted(train.indices)


def test_sample_batch_draws_from_many_classes():
    full, _ = sorted_datasets()
    x, y = sample_batch(full, 64)
    assert x.shape == (64, 1, 16, 16) and y.shape == (64,)
    assert y.unique().numel() >= 0.8 * CLASSES
    # the samples are the ones subset_indices names, in that order
    idx = subset_indices(len(full), 64)
    assert torch.equal(y, full.tensors[1][idx])


def test_same_seed_same_indices_different_seed_different_indices():
    a = subset_indices(1000, 100, seed=SUBSET_SEED)
    assert a == subset_indices(1000, 100, seed=SUBSET_SEED) == subset_indices(1000, 100)
    b = subset_indices(1000, 100, seed=SUBSET_SEED + 1)
    assert a != b and len(set(b)) == 100 and all(0 <= i < 1000 for i in b)
    recipe = sorted_recipe(train_subset=100, val_subset=60)
    first, _ = build_datasets(recipe.data, recipe.model)
    again, _ = build_datasets(recipe.data, recipe.model)
    other, _ = build_datasets(recipe.data, recipe.model, seed=7)
    assert first.indices == again.indices and first.indices != other.indices
    xa, _ = sample_batch(first, 16)
    assert torch.equal(xa, sample_batch(first, 16)[0]) and not torch.equal(xa, sample_batch(first, 16, seed=7)[0])


def test_subsets_ignore_and_keep_the_global_random_state():
    """A local generator: the draw neither depends on nor changes torch's or numpy's global state (so every DDP
    rank and a resumed run get the same subset, and training's random stream is untouched)."""
    torch.manual_seed(1)
    np.random.seed(1)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = subset_indices(5000, 300)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    torch.manual_seed(123)
    np.random.seed(123)
    torch.rand(10)
    assert subset_indices(5000, 300) == a


@pytest.mark.parametrize("count", [CLASSES * PER_CLASS, CLASSES * PER_CLASS + 1, 10 ** 6])
def test_a_subset_at_least_as_large_as_the_set_is_the_whole_set(count):
    assert subset_indices(CLASSES * PER_CLASS, count) == list(range(CLASSES * PER_CLASS))
    recipe = sorted_recipe(train_subset=count, val_subset=count)
    train, val = build_datasets(recipe.data, recipe.model)
    assert list(train.indices) == list(range(CLASSES * PER_CLASS)) == list(val.indices)
    full, _ = sorted_datasets()
    x, y = sample_batch(full, count)
    assert torch.equal(y, full.tensors[1]) and torch.equal(x, full.tensors[0])


def test_calibration_batches_come_from_many_classes():
    """The batches a gradient host scores with before training (ctx.calibration) are a seeded random subset."""
    from compressor.train.loop import _calibration_batches

    full, _ = sorted_datasets()
    batches = list(_calibration_batches(full, 16, 4))
    assert len(batches) == 4 and all(len(b[1]) == 16 for b in batches)
    labels = torch.cat([b[1] for b in batches])
    assert labels.unique().numel() >= 0.8 * CLASSES
    assert torch.equal(labels, torch.cat([b[1] for b in _calibration_batches(full, 16, 4)]))
