"""Training loop: schedules, learning, NaN stop, exact resume, hooks, distillation."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from compressor.train.data import build_datasets
from compressor.errors import TrainingError
from compressor.prune.methods.base import PruningMethod
from compressor.models.loading import build_arch
from compressor.app.recipe import recipe_from_dict
from compressor.train.config import SchedulerConfig
from compressor.train.loop import evaluate, fit, lr_factor

from .conftest import REPO, tiny_recipe


def setup(**sections):
    recipe = recipe_from_dict(tiny_recipe(**sections))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train, val = build_datasets(recipe.data, recipe.model)
    return recipe, model, train, val


def test_cosine_schedule_matches_formula_and_decreases():
    cfg = SchedulerConfig(kind="cosine")
    values = [lr_factor(cfg, s, 100, 10) for s in range(101)]
    assert values[0] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.5)
    assert values[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_and_multistep():
    cfg = SchedulerConfig(kind="multistep", warmup_epochs=1, milestones=[0.5, 0.75], gamma=0.1)
    assert lr_factor(cfg, 0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 49, 100, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, 100, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 80, 100, 10) == pytest.approx(0.01)


def test_onecycle_rises_then_falls():
    cfg = SchedulerConfig(kind="onecycle")
    values = [lr_factor(cfg, s, 100, 10) for s in range(100)]
    peak = max(range(100), key=values.__getitem__)
    assert 25 <= peak <= 35 and values[0] < 0.1 and values[-1] < 0.01


def test_fit_learns_synthetic_task():
    recipe, model, train, val = setup(finetune={"epochs": 4, "optimizer": {"lr": 0.05}})
    before = evaluate(model, val)["top1"]
    result = fit(model, train, val, recipe.finetune, recipe.data)
    assert len(result.history) == 4
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.final["val_top1"] > max(before, 100 / 4 + 10)


class Interrupt(PruningMethod):
    """Stops the run at the first step of the given epoch (as a crash or Ctrl-C would)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def after_step(self, ctx) -> None:
        if ctx.epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    recipe, model_a, train, val = setup(finetune={"epochs": 3}, data={"augment": True})
    fit(model_a, train, val, recipe.finetune, recipe.data, checkpoint=tmp_path / "a.pt")

    _, model_b, _, _ = setup()
    with pytest.raises(KeyboardInterrupt):
        fit(model_b, train, val, recipe.finetune, recipe.data, checkpoint=tmp_path / "b.pt", method=Interrupt(1))
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 0

    _, model_c, _, _ = setup()  # a fresh process would start from freshly built weights
    result = fit(model_c, train, val, recipe.finetune, recipe.data, checkpoint=tmp_path / "b.pt", resume=True)
    assert result.resumed_from == 1
    for (name, a), c in zip(model_a.state_dict().items(), model_c.state_dict().values()):
        assert torch.equal(a, c), name


def test_nan_loss_stops_with_clear_error():
    recipe, model, train, val = setup()

    class Poison(PruningMethod):
        def after_step(self, ctx):
            with torch.no_grad():
                ctx.model.fc.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step 2") as info:
        fit(model, train, val, recipe.finetune, recipe.data, method=Poison())
    assert "finetune.grad_clip" in str(info.value) and info.value.exit_code == 1


def test_hooks_are_called_in_order_and_counted():
    recipe, model, train, val = setup(finetune={"epochs": 2})
    calls = []

    class Recorder(PruningMethod):
        def on_train_start(self, ctx): calls.append("start")
        def after_backward(self, ctx):
            assert ctx.model.fc.weight.grad is not None
            calls.append("backward")
        def after_step(self, ctx): calls.append(f"step{ctx.step}")
        def on_epoch_end(self, ctx): calls.append(f"epoch{ctx.epoch}:{'val_top1' in ctx.metrics}")
        def finalize(self, ctx): calls.append("final")

    fit(model, train, val, recipe.finetune, recipe.data, method=Recorder())
    steps = math.ceil(128 / 32)
    assert calls[0] == "start" and calls[-1] == "final"
    assert calls.count("backward") == 2 * steps
    assert calls[1:3] == ["backward", "step1"]
    assert "epoch0:True" in calls and "epoch1:True" in calls


def test_rebuild_keeps_schedule_and_follows_new_parameters():
    recipe, model, train, val = setup(finetune={"epochs": 2})
    seen = {}

    class Shrink(PruningMethod):
        def after_step(self, ctx):
            if ctx.step == 3:
                lr_before, optimizer = ctx.optimizer.param_groups[0]["lr"], ctx.optimizer
                kept = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in ctx.model.named_parameters()
                        if not n.startswith("fc.")}
                ctx.model.fc = torch.nn.Linear(64, 4)
                ctx.rebuild()
                params = {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
                seen["follows"] = id(ctx.model.fc.weight) in params and len(params) == len(list(ctx.model.parameters()))
                seen["lr"] = (lr_before, ctx.optimizer.param_groups[0]["lr"])
                # the same optimizer: the untouched layers keep their momentum, the replaced layer starts afresh
                seen["same"] = ctx.optimizer is optimizer and all(
                    torch.equal(optimizer.state[p]["momentum_buffer"], kept[n])
                    for n, p in ctx.model.named_parameters() if n in kept)
                seen["fresh"] = ctx.optimizer.state.get(ctx.model.fc.weight, {}) == {}

    fit(model, train, val, recipe.finetune, recipe.data, method=Shrink())
    assert seen["follows"] and seen["same"] and seen["fresh"]
    before, after = seen["lr"]
    assert after < before  # the cosine schedule continued from step 3, it did not restart


def test_distillation_changes_the_loss_and_trains():
    recipe, model, train, val = setup(finetune={"epochs": 1, "distill": {"enabled": True, "alpha": 0.7}})
    from compressor.train.loop import dense_teacher, make_loss

    teacher = dense_teacher(model)
    x, y = next(iter(torch.utils.data.DataLoader(train, batch_size=16)))
    plain = make_loss(recipe.finetune.model_copy(update={"distill": recipe.finetune.distill.model_copy(update={"enabled": False})}), None)
    kd = make_loss(recipe.finetune, teacher)
    model.eval()
    # with the student equal to the teacher the KL term is zero: loss = (1 - alpha) * CE
    assert kd(model, x, y).item() == pytest.approx(0.3 * plain(model, x, y).item(), rel=1e-4)
    model.train()
    result = fit(model, train, val, recipe.finetune, recipe.data, teacher=teacher)
    assert math.isfinite(result.final["train_loss"])
    assert all(not p.requires_grad for p in teacher.parameters())


def test_gradient_clipping_bounds_the_update():
    recipe, model, train, val = setup(finetune={"epochs": 1, "grad_clip": 1e-3, "optimizer": {"lr": 1.0, "momentum": 0.0,
                                                                                          "weight_decay": 0.0}})
    grad_norms = []

    class Probe(PruningMethod):
        def after_backward(self, ctx):  # before clipping: the raw gradient is far larger than the clip
            grad_norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in ctx.model.parameters())).item())

    before = [p.detach().clone() for p in model.parameters()]
    fit(model, train, val, recipe.finetune, recipe.data.model_copy(update={"batch_size": 128}), method=Probe())
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    # one step of SGD (lr 1, no momentum) with the gradient clipped to norm 1e-3 moves the weights by <= 1e-3
    assert len(grad_norms) == 1 and grad_norms[0] > 1e-2
    assert moved.item() <= 1e-3 + 1e-6


def test_single_thread_training_avoids_the_onednn_channels_last_crash():
    """torch 2.14's oneDNN corrupts the heap in the channels-last backward of a strided 1x1 conv with < 8 input
    channels on one thread (a pruned ResNet shortcut): training must fall back to contiguous tensors there."""
    import subprocess
    import sys

    from compressor.train.memory_format import onednn_channels_last_safe

    risky = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 16, 1, stride=2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not onednn_channels_last_safe(risky)
        assert onednn_channels_last_safe(nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.Conv2d(4, 16, 1)))
        torch.set_num_threads(2)
        assert onednn_channels_last_safe(risky)
    finally:
        torch.set_num_threads(before)
    script = (
        "import torch; from torch import nn\n"
        "from compressor.app.recipe import recipe_from_dict\n"
        "from compressor.train.data import build_datasets\n"
        "from compressor.train.loop import fit\n"
        "from tests.conftest import tiny_recipe\n"
        "r = recipe_from_dict(tiny_recipe(finetune={'epochs': 1}))\n"
        "train, val = build_datasets(r.data, r.model)\n"
        "m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 16, 1, stride=2),\n"
        "                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))\n"
        "fit(m, train, val, r.finetune, r.data)\n"
        "print('trained')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- AMP
class _GradProbe(PruningMethod):
    """Records what a gradient hook sees: fc.weight.grad per step, and a Taylor scorer's accumulation."""

    def __init__(self, rebuild: bool = False) -> None:
        from compressor.prune.importance import build_scorer
        from compressor.prune.importance import ImportanceConfig

        self.scorer = build_scorer(ImportanceConfig(kind="taylor"))
        self.grads, self.rebuild = [], rebuild

    def after_backward(self, ctx):
        self.grads.append(ctx.model.fc.weight.grad.detach().clone())
        self.scorer.observe(ctx.model)
        if self.rebuild:  # as a removal inside after_backward does (FGGP structured): a new optimizer
            ctx.rebuild()


def _scaled(monkeypatch, scale: float = 2.0 ** 12):
    """Make fit use a real, enabled float16-style loss scaler on CPU (autocast stays off: only scaling differs)."""
    import compressor.train.loop as train_mod

    made = []

    def make_scaler(amp_dtype):
        made.append(torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000))
        return made[-1]

    monkeypatch.setattr(train_mod, "_make_scaler", make_scaler)
    return made


@pytest.mark.parametrize("rebuild", [False, True])
def test_hooks_see_unscaled_gradients_under_a_loss_scaler(monkeypatch, rebuild):
    opt = {"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0}
    recipe, model_a, train, val = setup(finetune={"epochs": 1, "optimizer": opt})
    plain = _GradProbe(rebuild)
    fit(model_a, train, val, recipe.finetune, recipe.data, method=plain)

    made = _scaled(monkeypatch)
    _, model_b, _, _ = setup()
    scaled = _GradProbe(rebuild)
    fit(model_b, train, val, recipe.finetune, recipe.data, method=scaled)
    assert made and made[0].is_enabled() and made[0].get_scale() == 2.0 ** 12  # it scaled every step
    assert len(scaled.grads) == len(plain.grads) == 4
    for a, b in zip(plain.grads, scaled.grads):  # power-of-two scaling and unscaling are exact
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0.0)
    for p, s in zip(plain.scorer.sums.values(), scaled.scorer.sums.values()):
        torch.testing.assert_close(s, p, rtol=1e-6, atol=1e-12)
    # the optimizer stepped on true gradients too, also when a hook replaced it (no second unscale)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)


def _overflow_once(model: nn.Module) -> dict[str, int]:
    """Make the model's second backward overflow, as float16 gradients under too large a loss scale do; returns the
    count of backward passes."""
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    model.fc.weight.register_hook(poison)
    return calls


def test_overflow_step_is_skipped_by_hooks_and_optimizer(monkeypatch):
    made = _scaled(monkeypatch)
    recipe, model, train, val = setup(finetune={"epochs": 1})
    calls = _overflow_once(model)
    steps = []

    class Counting(_GradProbe):
        def after_step(self, ctx):
            steps.append(ctx.step)

    probe = Counting()
    fit(model, train, val, recipe.finetune, recipe.data, method=probe)
    assert calls["n"] == 4 and steps == [1, 2, 3, 4]
    assert len(probe.grads) == 3 and probe.scorer.observed_batches == 3  # the overflow step observed nothing
    assert all(torch.isfinite(g).all() for g in probe.grads)
    assert all(torch.isfinite(s).all() for s in probe.scorer.sums.values())  # the scores stay finite
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the optimizer skipped that step
    assert made[0].get_scale() == 2.0 ** 11  # and the scaler backed off once


def test_resume_restores_the_loss_scaler(monkeypatch, tmp_path):
    """The scale that backed off in epoch 1 and its growth tracker (which decide when the scale grows again, so which
    later steps overflow) come back from the checkpoint as the uninterrupted run kept them."""
    made = _scaled(monkeypatch)
    recipe, model_a, train, val = setup(finetune={"epochs": 2})
    _overflow_once(model_a)
    fit(model_a, train, val, recipe.finetune, recipe.data, checkpoint=tmp_path / "a.pt")
    _, model_b, _, _ = setup()
    _overflow_once(model_b)
    with pytest.raises(KeyboardInterrupt):
        fit(model_b, train, val, recipe.finetune, recipe.data, checkpoint=tmp_path / "b.pt", method=Interrupt(1))
    _, model_c, _, _ = setup()
    fit(model_c, train, val, recipe.finetune, recipe.data, checkpoint=tmp_path / "b.pt", resume=True)
    uninterrupted, resumed = made[0], made[-1]
    assert uninterrupted.get_scale() == 2.0 ** 11 and uninterrupted.state_dict()["_growth_tracker"] == 6
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_amp_on_cpu_trains_in_bfloat16_without_a_scaler():
    from compressor.train.loop import _make_scaler, autocast_dtype

    recipe, model, train, val = setup(finetune={"epochs": 1, "amp": True})
    assert autocast_dtype(recipe.finetune, torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(recipe.finetune, torch.device("cuda")) == torch.float16
    assert autocast_dtype(recipe.finetune.model_copy(update={"amp": False}), torch.device("cpu")) is None
    assert not _make_scaler(torch.bfloat16).is_enabled() and not _make_scaler(None).is_enabled()
    dtypes = []
    model.fc.register_forward_hook(lambda m, i, out: dtypes.append((m.training, out.dtype)))
    grads = []

    class Probe(PruningMethod):
        def after_backward(self, ctx):
            grads.append(ctx.model.fc.weight.grad.dtype)

    result = fit(model, train, val, recipe.finetune, recipe.data, method=Probe())
    assert math.isfinite(result.final["train_loss"]) and math.isfinite(result.final["val_loss"])
    assert {d for training, d in dtypes if training} == {torch.bfloat16}  # training forward ran under autocast
    assert {d for training, d in dtypes if not training} == {torch.float32}  # evaluation did not
    assert grads == [torch.float32] * 4 and all(p.dtype == torch.float32 for p in model.parameters())
