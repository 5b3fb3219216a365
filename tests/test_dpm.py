"""DPM: smooth pruning and self-rectifying, wrapped around every host (spec: docs/methods/dpm.md)."""
from __future__ import annotations

import pytest
import torch

from compressor.train.data import build_datasets
from compressor.prune.methods import METHODS
from compressor.prune.methods.base import PruningMethod
from compressor.prune.methods.dpm import DPM
from compressor.models.loading import build_arch, example_inputs
from compressor.app.recipe import recipe_from_dict
from compressor.prune.op_count import snapshot_macs
from compressor.train.loop import fit

from .conftest import tiny_recipe

FROZEN_OPT = {"lr": 1e-9, "momentum": 0.0, "weight_decay": 0.0}  # training that does not move the weights


def make(method="dpm", host="depgraph", dpm=None, finetune=None, **prune):
    recipe = recipe_from_dict(tiny_recipe(
        prune={"method": method, "host": host, "target": {"macs": 0.5}, "schedule": {"events": 1},
               "dpm": {"steps": 4, "interval": 2, **(dpm or {})}, **prune},
        finetune={"epochs": 2, **(finetune or {})}))
    torch.manual_seed(0)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)
    train, val = build_datasets(recipe.data, recipe.model)
    return recipe, model, train, val


class Chain(PruningMethod):
    """Runs a probe after the wrapped method's hooks."""

    def __init__(self, inner, probe):
        self.inner, self.probe = inner, probe

    def __getattribute__(self, name):
        if name in ("on_train_start", "after_backward", "on_epoch_end", "state_dict", "load_state_dict", "summary"):
            return getattr(object.__getattribute__(self, "inner"), name)
        return object.__getattribute__(self, name)

    def after_step(self, ctx):
        self.inner.after_step(ctx)
        self.probe(ctx)

    def finalize(self, ctx):
        self.inner.finalize(ctx)


@pytest.mark.parametrize("host", ["depgraph", "gate-decorator"])
def test_single_step_without_rectify_equals_host_oneshot(host):
    recipe, model_a, train, val = make("oneshot", host)
    fit(model_a, train, val, recipe.finetune, recipe.data, method=METHODS.get("oneshot")(recipe.prune_spec()))
    recipe_d, model_b, _, _ = make("dpm", host, dpm={"steps": 1, "rectify": False})
    dpm = DPM(recipe_d.prune_spec())
    fit(model_b, train, val, recipe_d.finetune, recipe_d.data, method=dpm)
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key
    assert dpm.summary()["totals"]["removed"] == dpm.summary()["totals"]["selected"] > 0


def test_norm_follows_linear_decay():
    recipe, model, train, val = make(dpm={"steps": 4, "interval": 1, "rectify": False}, finetune={"optimizer": FROZEN_OPT})
    dpm = DPM(recipe.prune_spec())
    seen = []

    def probe(ctx):
        seen.extend((s.n, s.l0, float(dpm.group_norms(s.root)[s.idx])) for s in dpm.decaying)

    fit(model, train, val, recipe.finetune, recipe.data, method=Chain(dpm, probe))
    # entry decays once (n=1) at the event; one more step after each optimizer step; n=4 means removed
    assert sorted({n for n, _, _ in seen}) == [2, 3]
    for n, l0, norm in seen:
        assert norm == pytest.approx(l0 * (1 - n / 4), abs=1e-5)


def test_bn_gamma_and_beta_scale_with_the_conv_rows():
    recipe, model, train, val = make(dpm={"steps": 4, "interval": 1000, "rectify": False}, finetune={"epochs": 1, "optimizer": FROZEN_OPT})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dpm = DPM(recipe.prune_spec())
    captured = {}

    def probe(ctx):
        if not captured:
            captured.update({k: v.clone() for k, v in ctx.model.state_dict().items()})
            captured["_decaying"] = [(s.root, s.idx) for s in dpm.decaying]

    fit(model, train, val, recipe.finetune, recipe.data, method=Chain(dpm, probe))
    root, idx = next((r, i) for r, i in captured["_decaying"] if r.endswith("conv1") and r.startswith("layer"))
    block = root.rsplit(".", 1)[0]
    factor = 1 - 1 / 4
    conv_w = f"{root}.weight"
    for key in (conv_w, f"{block}.bn1.weight", f"{block}.bn1.bias"):
        assert torch.allclose(captured[key][idx], before[key][idx] * factor, atol=1e-6), key
    other = next(i for i in range(before[conv_w].shape[0]) if (root, i) not in captured["_decaying"])
    assert torch.equal(captured[conv_w][other], before[conv_w][other])


def test_structures_are_removed_after_n_steps_and_training_continues():
    recipe, model, train, val = make(dpm={"steps": 3, "interval": 1})
    dpm = DPM(recipe.prune_spec())
    dense_macs = snapshot_macs(model, example_inputs(recipe.model))[0]
    opt_sizes = []

    def probe(ctx):
        opt_sizes.append((sum(p.numel() for g in ctx.optimizer.param_groups for p in g["params"]),
                          sum(p.numel() for p in ctx.model.parameters())))

    result = fit(model, train, val, recipe.finetune, recipe.data, method=Chain(dpm, probe))
    macs = snapshot_macs(model, example_inputs(recipe.model))[0]
    assert macs == pytest.approx(0.5 * dense_macs, rel=0.02)
    assert all(a == b for a, b in opt_sizes)  # the optimizer always holds exactly the model's parameters
    assert opt_sizes[0][1] > opt_sizes[-1][1]  # and the model did shrink during training
    assert not dpm.decaying and dpm.summary()["totals"]["removed"] > 0
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)


def test_escaping_structure_is_released_and_backfill_keeps_the_target():
    recipe, model, train, val = make(dpm={"steps": 4, "interval": 2, "t_rate": 0.1, "t_len": 1.0, "cooldown": 1},
                                     finetune={"optimizer": FROZEN_OPT})
    dpm = DPM(recipe.prune_spec())
    pushed = {}

    def push(ctx):  # training "pulls" one decaying structure back to full size right after its first decay step
        if not pushed and dpm.decaying:
            s = dpm.decaying[0]
            pushed.update(root=s.root, idx=s.idx, l0=s.l0)
            now = float(dpm.group_norms(s.root)[s.idx])
            dpm.scale(ctx, s.root, {s.idx: s.l0 * 1.5 / now})

    fit(model, train, val, recipe.finetune, recipe.data, method=Chain(dpm, push))
    totals = dpm.summary()["totals"]
    assert totals["released"] == 1 and totals["backfilled"] >= 1
    trace = [t for t in dpm.summary()["decay_trace"] if t["outcome"] == "released"]
    assert len(trace) == 1 and trace[0]["root"] == pushed["root"]
    checks = dpm.summary()["sr_checks"]  # [step, n, C_rate, C_len, released]: every SR test, for the distributions
    escaped = [c for c in checks if c[4]]
    assert len(escaped) == 1 and escaped[0][2] == pytest.approx(1.0, rel=1e-3)  # (1.5 l0 - 0.75 l0) / 0.75 l0
    assert all(c[2] <= 0.1 or c[3] is None or c[3] <= 1.0 for c in checks if not c[4])
    # the released structure kept its weights and is still in the model; the MAC target still holds
    macs = snapshot_macs(model, example_inputs(recipe.model))[0]
    dense = dpm.dense_macs
    assert macs == pytest.approx(0.5 * dense, rel=0.02)


def test_no_release_without_escape():
    recipe, model, train, val = make(dpm={"steps": 4, "interval": 1}, finetune={"optimizer": FROZEN_OPT})
    dpm = DPM(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=dpm)
    assert dpm.summary()["totals"]["released"] == 0


@pytest.mark.parametrize("host", ["depgraph", "depgraph-sl", "gate-decorator", "taylor"])
def test_dpm_wraps_every_host(host):
    recipe, model, train, val = make(host=host, schedule={"events": 2, "end_epoch": 1}, dpm={"steps": 2, "interval": 1})
    dpm = DPM(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=dpm)
    summary = dpm.summary()
    assert summary["host"] == host and len(summary["events"]) == 2
    assert snapshot_macs(model, example_inputs(recipe.model))[0] == pytest.approx(0.5 * dpm.dense_macs, rel=0.02)


def test_unfinished_decay_is_completed_at_the_end():
    recipe, model, train, val = make(dpm={"steps": 100, "interval": 50}, finetune={"epochs": 1})
    dpm = DPM(recipe.prune_spec())
    fit(model, train, val, recipe.finetune, recipe.data, method=dpm)
    assert not dpm.decaying and dpm.records[-1]["forced"] > 0
    assert snapshot_macs(model, example_inputs(recipe.model))[0] == pytest.approx(0.5 * dpm.dense_macs, rel=0.02)


def test_resume_mid_decay_equals_uninterrupted_run(tmp_path):
    recipe, model_a, train, val = make(dpm={"steps": 6, "interval": 1}, finetune={"epochs": 3},
                                       schedule={"events": 2, "end_epoch": 2})
    fit(model_a, train, val, recipe.finetune, recipe.data, method=DPM(recipe.prune_spec()), checkpoint=tmp_path / "a.pt")

    def stop(ctx):
        if ctx.epoch == 1:
            raise KeyboardInterrupt

    _, model_b, _, _ = make()
    with pytest.raises(KeyboardInterrupt):
        fit(model_b, train, val, recipe.finetune, recipe.data, method=Chain(DPM(recipe.prune_spec()), stop),
            checkpoint=tmp_path / "b.pt")
    saved = torch.load(tmp_path / "b.pt", weights_only=True)["method"]
    assert saved["decaying"], "the interruption should fall in the middle of a decay"
    _, model_c, _, _ = make()
    fit(model_c, train, val, recipe.finetune, recipe.data, method=DPM(recipe.prune_spec()), checkpoint=tmp_path / "b.pt",
        resume=True)
    a, c = model_a.state_dict(), model_c.state_dict()
    assert a.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], c[key]), key


@pytest.mark.parametrize("cooldown, blocked_at", [(0, [0]), (1, [0, 1]), (2, [0, 1, 2])])
def test_cooldown_blocks_reselection_for_that_many_events(cooldown, blocked_at):
    recipe, *_ = make(dpm={"cooldown": cooldown})
    dpm = DPM(recipe.prune_spec())
    dpm.cooling = {("layer1.0.conv1", 3): 0}  # released during the window of event 0
    for index in range(4):
        blocked = 3 in dpm._cooling_plan(index).get("layer1.0.conv1", set())
        assert blocked == (index in blocked_at), index


def test_schedule_check_matches_what_training_does():
    """check_schedule's verdict is the run's: a feasible decay ends without forced removals, an infeasible one
    (warned about before training) ends with the still-decaying structures forced out at the end."""
    recipe, model, train, val = make()  # 2 epochs x 4 steps; decay from step 0, 4 steps 2 apart: ends at step 6
    dpm = DPM(recipe.prune_spec())
    assert dpm.check_schedule(8, 4) == []
    fit(model, train, val, recipe.finetune, recipe.data, method=dpm)
    assert not any(r.get("forced") for r in dpm.records)

    recipe, model, train, val = make(dpm={"steps": 4, "interval": 3, "rectify": False})  # ends at step 9: 1 late
    dpm = DPM(recipe.prune_spec())
    (warning,) = dpm.check_schedule(8, 4)
    assert "ends at step 9" in warning and "1 step (" in warning and "prune.dpm.interval 2 or less" in warning
    fit(model, train, val, recipe.finetune, recipe.data, method=dpm)
    assert sum(r.get("forced", 0) for r in dpm.records) > 0
