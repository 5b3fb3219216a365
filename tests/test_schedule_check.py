"""Schedules checked against the training budget before the first batch: a DPM decay, FGGP window, OCSP search or
host event that cannot run as written is a printed warning and a report note (a RecipeError with
gates.strict_schedule), never a silent forced removal at the end."""
from __future__ import annotations

import json

import pytest
import torch

from compressor.train.data import build_datasets
from compressor.errors import RecipeError
from compressor.prune.methods import METHODS
from compressor.prune.methods.base import PruningMethod
from compressor.models.loading import build_arch
from compressor.app.recipe import recipe_from_dict
from compressor.train.loop import check_method_schedule, fit

from .conftest import tiny_recipe

# tiny_recipe: 128 synthetic training images, batch 32 -> 4 optimizer steps per epoch


def make(prune=None, finetune=None, gates=None):
    recipe = recipe_from_dict(tiny_recipe(prune={"target": {"macs": 0.5}, **(prune or {})},
                                          finetune={"epochs": 1, **(finetune or {})}, gates=gates or {}))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train, val = build_datasets(recipe.data, recipe.model)
    return recipe, model, train, val


INFEASIBLE_DPM = {"method": "dpm", "schedule": {"events": 1}, "dpm": {"steps": 8, "interval": 50}}


def test_infeasible_dpm_schedule_warns_before_training_naming_fields_and_shortfall(capsys):
    recipe, model, train, val = make(INFEASIBLE_DPM)
    method = METHODS.get("dpm")(recipe.prune_spec())
    warnings = method.check_schedule(total_steps=4, steps_per_epoch=4)
    assert len(warnings) == 1
    text = warnings[0]
    # the decay starts at step 0 and needs 7 more decay steps 50 apart: it ends at step 350, 346 after training
    assert "prune.dpm.steps" in text and "prune.dpm.interval" in text and "finetune.epochs" in text
    assert "ends at step 350" in text and "346 steps" in text and "4 steps" in text

    seen = []

    class Spy(type(method)):
        def on_train_start(self, ctx):
            seen.append(capsys.readouterr().err)  # what was printed before the first hook
            super().on_train_start(ctx)

    fit(model, train, val, recipe.finetune, recipe.data, method=Spy(recipe.prune_spec()))
    assert "warning: prune.dpm:" in seen[0] and "346 steps" in seen[0]


def test_strict_schedule_refuses_to_train():
    recipe, model, train, val = make(INFEASIBLE_DPM, gates={"strict_schedule": True})
    started = []

    class Spy(type(METHODS.get("dpm")(recipe.prune_spec()))):
        def on_train_start(self, ctx):
            started.append(True)

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RecipeError, match=r"prune\.dpm\.steps") as info:
        fit(model, train, val, recipe.finetune, recipe.data, method=Spy(recipe.prune_spec()))
    assert info.value.exit_code == 2 and "prune.dpm.interval" in str(info.value)
    assert "gates.strict_schedule" in str(info.value)
    assert not started and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_feasible_dpm_schedule_gives_no_warning(capsys):
    # 2 epochs x 4 steps = 8; the decay starts at step 0 and ends at 0 + 3 * 2 = 6
    recipe, model, train, val = make({"method": "dpm", "schedule": {"events": 1}, "dpm": {"steps": 4, "interval": 2}},
                                     finetune={"epochs": 2})
    method = METHODS.get("dpm")(recipe.prune_spec())
    assert method.check_schedule(8, 4) == []
    assert check_method_schedule(method, len(train), recipe.finetune, recipe.data) == []
    fit(model, train, val, recipe.finetune, recipe.data, method=method)
    assert "warning:" not in capsys.readouterr().err
    assert not any(r.get("forced") for r in method.records)


def test_dpm_limits_are_exact():
    recipe, *_ = make({"method": "dpm", "schedule": {"events": 1}, "dpm": {"steps": 5, "interval": 3}},
                      finetune={"epochs": 3})
    method = METHODS.get("dpm")(recipe.prune_spec())
    assert method.check_schedule(12, 4) == []  # ends at 0 + 4 * 3 = 12, the last step
    (text,) = method.check_schedule(11, 11)
    assert "1 step (" in text and "prune.dpm.steps 4 or fewer" in text and "prune.dpm.interval 2 or less" in text


def test_check_runs_once_per_budget_and_strict_only_when_asked(capsys):
    recipe, _, train, _ = make(INFEASIBLE_DPM)
    method = METHODS.get("dpm")(recipe.prune_spec())
    first = check_method_schedule(method, len(train), recipe.finetune, recipe.data)
    assert first and capsys.readouterr().err.count("warning:") == 1
    assert check_method_schedule(method, len(train), recipe.finetune, recipe.data) == first
    assert "warning:" not in capsys.readouterr().err  # fit after compress does not print it twice
    assert check_method_schedule(PruningMethod(), len(train), recipe.finetune, recipe.data) == []


def test_collapsed_host_events_warn():
    # 1 epoch: end_epoch unset is half of finetune.epochs = 0, so all 4 iterative events fall on step 0
    recipe, *_ = make({"method": "iterative", "schedule": {"events": 4}})
    (text,) = METHODS.get("iterative")(recipe.prune_spec()).check_schedule(4, 4)
    assert "only 1 distinct optimizer step" in text and "prune.schedule.end_epoch" in text
    ok, *_ = make({"method": "iterative", "schedule": {"events": 4, "end_epoch": 1}})
    assert METHODS.get("iterative")(ok.prune_spec()).check_schedule(4, 4) == []
    late, *_ = make({"method": "oneshot", "schedule": {"start_epoch": 1}})
    (text,) = METHODS.get("oneshot")(late.prune_spec()).check_schedule(4, 4)
    assert "no fine-tuning follows" in text
    assert METHODS.get("oneshot")(late.prune_spec()).check_schedule(0, 4) == []  # epochs 0: prune without training, as asked


def test_fggp_window_checks():
    def fggp(total, spe, **cfg):
        recipe, *_ = make({"method": "fggp", "fggp": {"granularity": "unstructured", **cfg}})
        return METHODS.get("fggp")(recipe.prune_spec()).check_schedule(total, spe)

    (text,) = fggp(4, 4, interval=100)  # window 0..3, events at 0 and 3: one jump
    assert "one jump" in text and "prune.fggp.interval 2 or less" in text
    (text,) = fggp(469, 469, interval=100)  # cubic steps steeper than r = 0.5 allows at 100-step spacing
    assert "grad_fraction 0.5" in text and "prune.fggp.interval" in text
    assert fggp(469, 469, interval=100, selection="magnitude") == []
    assert fggp(1407, 469, interval=100) == []  # the shipped recipe: 3 epochs of Fashion-MNIST
    texts = fggp(40, 4, interval=5, end=1.0)  # t1 = 40: the last event runs after training
    assert any("after the last optimizer step" in t and "prune.fggp.end" in t for t in texts)


def test_ocsp_needs_epochs_for_lag_and_window():
    def ocsp(epochs, **cfg):
        recipe, *_ = make({"method": "ocsp", "ocsp": cfg}, finetune={"epochs": epochs})
        return METHODS.get("ocsp")(recipe.prune_spec()).check_schedule(epochs * 4, 4)

    (text,) = ocsp(4)  # lag 2 + window 3: the indicator first exists after epoch 5
    assert "after epoch 5" in text and "train at least 6 epochs" in text
    assert ocsp(15, latest_prune_epoch=10) == []
    (text,) = ocsp(15, latest_prune_epoch=3)
    assert "prune.ocsp.latest_prune_epoch to 5" in text
    (text,) = ocsp(8, latest_prune_epoch=8)
    assert "below 8" in text


def test_compress_records_warnings_in_report_notes_and_strict_stops_before_training(tmp_path):
    from compressor import rundir
    from compressor.app.pipeline import compress

    recipe = recipe_from_dict(tiny_recipe(prune={"method": "dpm", "target": {"macs": 0.5}, "schedule": {"events": 1},
                                                 "dpm": {"steps": 8, "interval": 50}},
                                          finetune={"epochs": 1}, bench={"backends": []}, verify={"samples": 8}))
    strict = recipe.model_copy(update={"gates": recipe.gates.model_copy(update={"strict_schedule": True})})
    with pytest.raises(RecipeError, match="prune.dpm.interval"):
        compress("zoo:resnet20", strict, tmp_path / "strict")
    assert not (tmp_path / "strict" / rundir.CHECKPOINT).exists() and not (tmp_path / "strict" / "report.json").exists()

    report = compress("zoo:resnet20", recipe, tmp_path / "run")
    notes = json.loads((tmp_path / "run" / "report.json").read_text())["notes"]
    assert notes == report["notes"] and any("prune.dpm.steps" in n and "346 steps" in n for n in notes)
    assert (tmp_path / "run" / rundir.CHECKPOINT).exists()  # what the strict run never got to write
