"""The memory format training runs in on the CPU (train/memory_format.py): contiguous where a conv's width is off the
CPU's channel block, otherwise the faster of one measured step in each format, the timing cut short when
channels-last's first step is far slower; decisions kept per structure, across --resume; the model's training
state untouched by the timing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.app.recipe import recipe_from_dict
from compressor.train import memory_format as mf
from compressor.train.data import build_datasets
from compressor.train.loop import TrainContext, fit

from .conftest import tiny_recipe


def _odd_widths() -> nn.Module:
    """Widths like the pruned sample's (7 and 13 channels: off every CPU's channel block)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 7, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(7, 13, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(13, 4))


def _aligned_widths() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 4))


def _scripted(times: dict[bool, list[float]]):
    """A step timer answering from `times` per format, recording the formats it was asked for."""
    asked: list[bool] = []

    def step(channels_last: bool) -> float:
        asked.append(channels_last)
        return times[channels_last][sum(1 for a in asked if a == channels_last) - 1]

    return step, asked


def test_the_faster_format_is_kept_and_a_far_slower_first_step_ends_the_timing():
    step, asked = _scripted({False: [1.0, 0.30, 0.31], True: [1.2, 0.20, 0.22]})
    assert mf.pick_format(step, reps=2, slower_stop=3.0)[0] is True
    assert asked == [False, True, False, True, False, True]  # a first step each, then interleaved
    step, _ = _scripted({False: [1.0, 0.10, 0.12], True: [1.2, 0.25, 0.20]})
    choice, times = mf.pick_format(step, reps=2, slower_stop=3.0)
    assert choice is False and times["channels_last"] == [1.2, 0.25, 0.20] and not times["stopped"]
    # the sample's slim model: 0.115 s contiguous, minutes channels-last: one step of each, nothing more
    step, asked = _scripted({False: [0.115, 0.1, 0.1], True: [250.0, 240.0, 240.0]})
    choice, times = mf.pick_format(step, reps=2, slower_stop=3.0)
    assert (choice, times["stopped"], asked) == (False, True, [False, True])
    step, _ = _scripted({False: [1.0, 0.3, 0.3], True: [2.9, 0.2, 0.2]})  # a slow first step within the bound
    assert mf.pick_format(step, reps=2, slower_stop=3.0)[0] is True


def test_widths_off_the_channel_block_are_never_timed_in_channels_last(monkeypatch):
    """The cheap guard: a conv output width that is not a multiple of the CPU's block (8 with AVX2, 16 with
    AVX-512) keeps contiguous without timing; the network's input channels do not count."""
    assert mf.off_block_convs(_odd_widths(), 8) == ["3", "5"]
    assert mf.off_block_convs(_aligned_widths(), 8) == [] and mf.off_block_convs(_aligned_widths(), 16) == []
    assert mf.off_block_convs(_aligned_widths(), 32) == ["0"]
    cpu = torch.device("cpu")
    assert not mf.channels_last_candidate(_odd_widths(), cpu) and mf.channels_last_candidate(_aligned_widths(), cpu)
    assert not mf.channels_last_candidate(_aligned_widths(), torch.device("cuda"))
    assert not mf.channels_last_candidate(nn.Sequential(nn.Linear(4, 4)), cpu)

    monkeypatch.setattr(mf, "time_step", lambda *a, **k: pytest.fail("timed a model off the channel block"))
    ctx = _context(_odd_widths())
    ctx.prepare()
    assert ctx.channels_last is False and ctx.memory_formats == {}
    assert not ctx.model[3].weight.is_contiguous(memory_format=torch.channels_last)


def test_fit_trains_a_model_off_the_channel_block_in_contiguous_memory():
    """Before, every CPU model with a conv trained channels-last, whatever its widths (the pruned sample's 4 / 7
    / 13 took minutes per batch there)."""
    recipe = recipe_from_dict(tiny_recipe(finetune={"epochs": 1}, data={"batch_size": 64}))
    train, val = build_datasets(recipe.data, recipe.model)
    model = _odd_widths()
    fit(model, train, val, recipe.finetune, recipe.data)
    conv = model[3].weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


def test_finetune_memory_format_contiguous_trains_nchw_without_timing(monkeypatch):
    """finetune.memory_format: contiguous, on widths auto would time: no step timed, every conv trains NCHW (the
    float path of a plain PyTorch loop; channels-last differs by ~1e-4 in the weights after 5 SGD steps of the
    sample)."""
    monkeypatch.setattr(mf, "_DECIDED", {})
    monkeypatch.setattr(mf, "time_step", lambda *a, **k: pytest.fail("timed a step under memory_format: contiguous"))
    ctx = _context(_aligned_widths())
    ctx.cfg = ctx.cfg.model_copy(update={"memory_format": "contiguous"})
    assert mf.channels_last_candidate(ctx.model, ctx.device)  # auto would have measured it
    ctx.prepare()
    assert ctx.channels_last is False and ctx.memory_formats == {}
    assert ctx.model[4].weight.is_contiguous() and not ctx.model[4].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(Exception, match="memory_format"):
        recipe_from_dict(tiny_recipe(finetune={"memory_format": "nhwc"}))


def _context(model: nn.Module) -> TrainContext:
    recipe = recipe_from_dict(tiny_recipe())
    train, _ = build_datasets(recipe.data, recipe.model)
    ctx = TrainContext(model=model.train(), cfg=recipe.finetune, device=torch.device("cpu"), steps_per_epoch=1,
                       total_steps=1, loss_fn=lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    ctx.calibration = lambda n: iter([(torch.stack([train[i][0] for i in range(8)]),
                                       torch.tensor([int(train[i][1]) for i in range(8)]))])
    return ctx


def test_a_decision_is_measured_once_per_structure_and_restored_on_resume(monkeypatch):
    """Driven by scripted timings (channels-last slower): the rebuild trains contiguous, the same structure is not
    timed again (in the run, nor in the process), a checkpoint's decision wins over the process's on resume."""
    monkeypatch.setattr(mf, "_DECIDED", {})
    calls = []

    def fake_step(model, inputs, targets, loss_fn, channels_last, amp=None):
        calls.append(channels_last)
        return 0.5 if channels_last else 0.2

    monkeypatch.setattr(mf, "time_step", fake_step)
    ctx = _context(_aligned_widths())
    ctx.prepare()
    assert ctx.channels_last is False and len(calls) == 2 + 2 * mf.REPS and list(ctx.memory_formats.values()) == [False]
    assert ctx.model[4].weight.is_contiguous()
    ctx.prepare()
    other = _context(_aligned_widths())
    other.prepare()
    assert len(calls) == 2 + 2 * mf.REPS and other.channels_last is False

    resumed = _context(_aligned_widths())
    resumed.memory_formats.update({key: True for key in ctx.memory_formats})  # what load_checkpoint restores
    resumed.prepare()
    assert resumed.channels_last is True and len(calls) == 2 + 2 * mf.REPS
    assert resumed.model[4].weight.is_contiguous(memory_format=torch.channels_last)


def test_timing_a_real_step_leaves_the_training_state_as_it_was(monkeypatch):
    """One real call on a tiny model (batch norm, dropout): the model ends in the chosen format, with its batch-norm
    statistics, gradients, training mode and the random generator as before (the timing trains a copy, with the
    generator forked)."""
    monkeypatch.setattr(mf, "_DECIDED", {})
    ctx = _context(_aligned_widths())
    model = ctx.model
    model(torch.randn(4, 1, 16, 16)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    ctx.prepare()
    assert isinstance(ctx.channels_last, bool) and list(ctx.memory_formats.values()) == [ctx.channels_last]
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    assert model[4].weight.is_contiguous(memory_format=fmt) and model.training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), stats))
    assert torch.equal(torch.get_rng_state(), rng)
    inputs, targets = next(ctx.calibration(1))
    assert mf.time_step(model, inputs, targets, ctx.loss_fn, True) > 0
    assert model[4].weight.is_contiguous(memory_format=torch.channels_last) and model[4].weight.grad is not None
