"""compressor.Pruner in a plain PyTorch loop: a custom loss, the user's AdamW carried across removals, resume from
state_dict, the prune section from a dict / PruneConfig / YAML, and the errors of bad arguments."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn

import compressor
from compressor.errors import RecipeError, UsageError
from compressor.models.slim import conform_to_state_dict
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import MISS_TOLERANCE
from compressor.prune.section import PruneConfig

# DPM around depgraph; events at steps 0 and 6 (schedule end epoch 3 of 6), each decay removes 6 steps after entry
DPM = {"method": "dpm", "host": "depgraph", "target": {"macs": 0.5}, "schedule": {"events": 2},
       "dpm": {"steps": 3, "interval": 3}}
EPOCHS, STEPS = 6, 4


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS * 8, 3, 8, 8, generator=gen), torch.randint(0, 4, (STEPS * 8,), generator=gen)
    return [(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]) for i in range(STEPS)]


def mse_one_hot(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - nn.functional.one_hot(targets, 4).float()) ** 2).mean()


def train(model, optimizer, pruner, epochs, on_step=None) -> None:
    """The user's loop: four pruner lines around their own loss and optimizer."""
    for _ in range(epochs):
        for x, y in batches():
            optimizer.zero_grad()
            loss = mse_one_hot(model(x), y)
            loss.backward()
            pruner.after_backward(loss)
            optimizer.step()
            if on_step is not None:
                on_step()
            pruner.after_step()
        pruner.epoch_end()


def make(model, optimizer, **kwargs) -> compressor.Pruner:
    return compressor.Pruner(model, batches()[0][0][:1], prune=DPM, epochs=EPOCHS, steps_per_epoch=STEPS,
                             optimizer=optimizer, **kwargs)


def rows_kept(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """For each row of `new` the index of the row of `old` it continues (rows are unique random weights; a row
    that started decaying in the same hook was rescaled, its direction kept)."""
    old_rows, new_rows = old.flatten(1), new.detach().flatten(1)
    unit = lambda rows: rows / rows.norm(dim=1, keepdim=True)  # noqa: E731
    index = torch.cdist(unit(new_rows), unit(old_rows)).argmin(1)
    assert torch.allclose(unit(old_rows[index]), unit(new_rows), atol=1e-6) and len(set(index.tolist())) == len(index)
    return index


def test_plain_loop_with_custom_loss_reaches_the_mac_target_and_adamw_keeps_the_moments_of_kept_channels():
    model = net()
    example = batches()[0][0][:1]
    dense_macs = snapshot_macs(model, example)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {}
    checks = []

    def remember():  # the optimizer's state after each step, before the hook that may remove channels
        before.clear()
        before.update({name: (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
                       for name, p in model.named_parameters()})

    def check(pruner):  # after a removal, the optimizer already remapped
        assert pruner.optimizer is optimizer
        held = [p for group in optimizer.param_groups for p in group["params"]]
        assert {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(set(map(id, held)))
        params = dict(model.named_parameters())
        kept = rows_kept(before["0.weight"][0], params["0.weight"])  # conv 1's kept output channels
        assert len(kept) < 16
        for name in ("0.weight", "0.bias", "1.weight", "1.bias"):
            state = optimizer.state[params[name]]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[key], before[name][1][key][kept]), (name, key)
            assert torch.equal(state["step"], before[name][1]["step"])
        checks.append(len(kept))

    pruner = make(model, optimizer, on_structure_change=check)
    train(model, optimizer, pruner, EPOCHS, on_step=remember)
    pruner.finalize()
    assert checks and pruner.structure_changes == 2 and pruner.last_remap["reset"] == 0
    macs = snapshot_macs(model, example)[0] / dense_macs
    assert macs == pytest.approx(0.5, rel=MISS_TOLERANCE)
    events = pruner.summary()["events"]
    assert [e["step"] for e in events] == [0, 6] and sum(e["removed"] for e in events) > 0
    assert pruner.step == EPOCHS * STEPS and pruner.epoch == EPOCHS
    out = model(example)  # the pruned model still runs, with the classes it had
    assert out.shape == (1, 4)


def test_resume_from_state_dict_in_a_user_loop_equals_the_uninterrupted_run():
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = make(model, optimizer)
    train(model, optimizer, pruner, EPOCHS)
    pruner.finalize()

    first = net()
    optimizer = torch.optim.AdamW(first.parameters(), lr=1e-2)
    interrupted = make(first, optimizer)
    train(first, optimizer, interrupted, 2)  # step 8: the second event's channels are decaying (removal at 12)
    assert interrupted.method.decaying
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": optimizer.state_dict(),
                           "pruner": interrupted.state_dict()})

    resumed = net()  # dense again: shaped like the saved (pruned) weights first
    with pytest.raises(UsageError, match="conform_to_state_dict"):
        make(resumed, torch.optim.AdamW(resumed.parameters(), lr=1e-2)).load_state_dict(saved["pruner"])
    conform_to_state_dict(resumed, saved["model"])
    resumed.load_state_dict(saved["model"])
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved["optimizer"])
    again = make(resumed, optimizer)
    again.load_state_dict(saved["pruner"])
    assert again.step == 8 and again.epoch == 2
    train(resumed, optimizer, again, EPOCHS - 2)
    again.finalize()

    assert again.summary()["events"] == pruner.summary()["events"]
    expected = model.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_the_method_starts_at_the_first_training_forward():
    """The step-0 event runs before the first training batch's forward, as in compress; an eval forward or a
    forward of a deep copy (an EMA, a probe) does not start it; load_state_dict after the start is refused."""
    model = net()
    pruner = make(model, None)
    x = batches()[0][0]
    model.eval()
    model(x)
    copy.deepcopy(model).train()(x)
    assert pruner.summary()["events"] == []
    model.train()
    widths = model[0].weight.shape[0]
    model(x)
    assert [e["step"] for e in pruner.summary()["events"]] == [0]
    assert pruner.summary()["events"][0]["selected"] > 0 and model[0].weight.shape[0] == widths  # decaying, kept
    with pytest.raises(UsageError, match="already started"):
        pruner.load_state_dict(pruner.state_dict())


def test_the_prune_section_from_a_dict_a_prune_config_or_yaml(tmp_path):
    section = {"method": "iterative", "target": {"speedup": 2.0}, "schedule": {"events": 3}, "round_to": 4}
    (tmp_path / "section.yaml").write_text(yaml.safe_dump(section))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "prune": section, "finetune": {"epochs": 9}}))
    built = [compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune=p, epochs=EPOCHS, steps_per_epoch=STEPS).spec
             for p in (section, PruneConfig.model_validate(section), tmp_path / "section.yaml",
                       str(tmp_path / "recipe.yaml"))]
    for spec in built:
        assert spec.prune.model_dump() == built[0].prune.model_dump()
        assert spec.prune.method == "iterative" and spec.prune.target.remaining_macs() == 0.5
        assert spec.prune.round_to == 4 and spec.epochs == EPOCHS
    override = compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune=tmp_path / "section.yaml", round_to=8,
                                 epochs=EPOCHS, steps_per_epoch=STEPS)
    assert override.spec.prune.round_to == 8 and override.method.events == 3
    default = compressor.Pruner(net(), torch.randn(1, 3, 8, 8), epochs=EPOCHS, steps_per_epoch=STEPS)
    assert default.spec.prune.method == "dpm" and default.spec.prune.target.macs == 0.5


@pytest.mark.parametrize("prune, fields", [
    ({"target": {"macs": 1.5}}, ["prune.target.macs"]),
    ({"methd": "dpm"}, ["prune.methd: unknown key", "did you mean method?"]),
    ({"method": "dmp"}, ["prune.method: 'dmp' is not allowed", "did you mean dpm?"]),
    ({"dpm": {"steps": 0}, "round_to": -2}, ["prune.dpm.steps", "prune.round_to"]),
    ({"schedule": {"end_epoch": 9}}, ["prune.schedule.end_epoch (9) is after epochs (6)"]),
    ("missing.yaml", ["'missing.yaml' is not a file"]),
    (["dpm"], ["not a list"]),
])
def test_a_bad_prune_section_is_a_recipe_error_naming_the_field(prune, fields):
    with pytest.raises(RecipeError) as info:
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune=prune, epochs=EPOCHS, steps_per_epoch=STEPS)
    assert info.value.exit_code == 2
    for field in fields:
        assert field in str(info.value)


def test_a_yaml_prune_section_with_a_typo_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "prune.yaml"
    path.write_text("method: dpm\ntarget:\n  mac: 0.5\n")
    with pytest.raises(RecipeError, match=r"prune\.target\.mac: unknown key.*did you mean macs") as info:
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune=path, epochs=EPOCHS, steps_per_epoch=STEPS)
    assert str(path) in str(info.value)


def test_a_gradient_host_without_calibration_is_refused_when_the_pruner_is_built():
    prune = {**DPM, "host": "taylor"}
    with pytest.raises(UsageError, match="host taylor.*gradients.*give calibration and loss_fn"):
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune=prune, epochs=EPOCHS, steps_per_epoch=STEPS)
    with pytest.raises(UsageError, match="give loss_fn"):
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune=prune, epochs=EPOCHS, steps_per_epoch=STEPS,
                          calibration=batches())
    with pytest.raises(UsageError, match="iterator is used up"):
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune=prune, epochs=EPOCHS, steps_per_epoch=STEPS,
                          calibration=iter(batches()), loss_fn=lambda m, x, y: mse_one_hot(m(x), y))
    # with them, the step-0 event scores on the calibration batches through the user's loss
    used = []

    def loss_fn(model, inputs, targets):
        used.append(len(inputs))
        return mse_one_hot(model(inputs), targets)

    pruner = compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune=prune, epochs=EPOCHS, steps_per_epoch=STEPS,
                               calibration=batches(), loss_fn=loss_fn)
    pruner.start()
    assert used == [8] * STEPS and pruner.summary()["events"][0]["selected"] > 0


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="one example batch as a tensor"):
        compressor.Pruner(net(), [torch.randn(1, 3, 8, 8)], epochs=EPOCHS, steps_per_epoch=STEPS)
    with pytest.raises(UsageError, match="steps_per_epoch=0"):
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), epochs=EPOCHS, steps_per_epoch=0)
    with pytest.raises(UsageError, match="give optimizer="):
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), prune={"method": "ocsp"}, epochs=EPOCHS,
                          steps_per_epoch=STEPS)
    with pytest.raises(RecipeError, match="model.ignore: '9' matches no module"):
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), ignore=["9"], epochs=EPOCHS, steps_per_epoch=STEPS)
    with pytest.raises(RecipeError, match=r"model\.ignore: 're:\[' is not a valid regular expression"):
        compressor.Pruner(net(), torch.randn(1, 3, 8, 8), ignore=["re:["], epochs=EPOCHS, steps_per_epoch=STEPS)
    with pytest.raises(RecipeError, match=r"latency target.*\(1, 12\).*MAC target"):
        compressor.Pruner(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(1, 12),
                          prune={"target": {"latency_speedup": 1.5}}, epochs=EPOCHS, steps_per_epoch=STEPS)


def test_finalize_re_estimates_batch_norm_statistics_on_the_batches_given():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = make(model, optimizer)
    train(model, optimizer, pruner, EPOCHS)
    pruned = pruner.finalize(recalibrate=batches(), batches=3)
    assert pruner.bn_recalibration == {"layers": 2, "batches": 3, "samples": 24}
    # the statistics are the plain average over the three batches of what each batch-norm layer sees in eval mode
    norm = pruned[1]
    seen = []
    hook = norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        pruned.eval()
        for x, _ in batches()[:3]:
            pruned(x)
    hook.remove()
    means = torch.stack([s.mean((0, 2, 3)) for s in seen]).mean(0)
    assert norm.running_mean.shape[0] == norm.num_features < 16
    torch.testing.assert_close(norm.running_mean, means, rtol=1e-4, atol=1e-5)
    assert norm.momentum == 0.1 and not pruned.training


def test_finalize_recalibrate_true_needs_the_pruners_calibration_batches():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = make(model, optimizer)
    train(model, optimizer, pruner, EPOCHS)
    with pytest.raises(UsageError, match="without calibration batches"):
        pruner.finalize(recalibrate=True)
