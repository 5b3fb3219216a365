"""Every registered pruning method, and DPM around every registered host, through the same invariants (a new
method or host is covered when it registers): the MAC target met, widths on round_to, resume equal to an uninterrupted run, two DDP ranks taking the
same decisions, and the slim model reloading to the trained one."""
from __future__ import annotations

import shutil

import pytest
import torch

from compressor.app.recipe import recipe_from_dict
from compressor.models.loading import build_arch, example_inputs
from compressor.models.slim import layer_widths, load_slim, save_slim
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import MISS_TOLERANCE
from compressor.prune.methods import HOSTS, METHODS
from compressor.train.data import build_datasets
from compressor.train.loop import fit
from tests.method_settings import ROUND, invariant_recipe


def _model(recipe):
    torch.manual_seed(0)
    return build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels)


def _keeping_checkpoint_at(method, epoch: int, checkpoint, kept):
    """The method, copying the run's checkpoint to `kept` after its first step of `epoch`: the file a run
    interrupted there (a crash or Ctrl-C) leaves, the checkpoint of the epoch before (fit writes it only at the end
    of an epoch). The uninterrupted run doubles as the interrupted one, so the test trains one run fewer."""
    inner = method.after_step

    def after_step(ctx):
        inner(ctx)
        if ctx.epoch == epoch and not kept.exists():
            shutil.copyfile(checkpoint, kept)

    method.after_step = after_step
    return method


def _decisions(summary: dict) -> dict:
    """A method's summary without wall-clock measurements (OCSP's time_saved_s)."""
    return {k: v for k, v in summary.items() if not k.endswith("_s")}


def _assert_same_state(a, b, where: str = "state") -> None:
    """Two method state_dicts are equal: tensors bit for bit (accumulated scores, masks), wall-clock values aside."""
    if isinstance(a, dict):
        a, b = _decisions(a), _decisions(b)
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b.to(a.device)), where
    else:
        assert a == b, where


CASES = [(name, "depgraph") for name in METHODS.names()] + [("dpm", h) for h in HOSTS.names() if h != "depgraph"]


# each case's two-rank run comes from the session's one torchrun launch (tests/conftest.py: ddp)
@pytest.mark.parametrize("name, host", [pytest.param(n, h, marks=pytest.mark.ddp(n, "invariant", h)) for n, h in CASES])
def test_method_invariants(name, host, tmp_path, ddp):
    recipe = recipe_from_dict(invariant_recipe(name, host))
    cls = METHODS.get(name)
    train, val = build_datasets(recipe.data, recipe.model)
    example = example_inputs(recipe.model)

    model = _model(recipe)
    dense_widths, dense_macs = layer_widths(model), snapshot_macs(model, example)[0]
    method = _keeping_checkpoint_at(cls(recipe.prune_spec()), 1, tmp_path / "a.pt", tmp_path / "b.pt")
    fit(model, train, val, recipe.finetune, recipe.data, method=method, checkpoint=tmp_path / "a.pt")
    widths, macs = layer_widths(model), snapshot_macs(model, example)[0]

    # the MAC target, and widths on multiples of round_to
    changed = {n: w for n, w in widths.items() if w != dense_widths[n]}
    if cls.keeps_dense_shapes(recipe.prune):
        assert not changed and macs == dense_macs
    else:
        assert macs / dense_macs == pytest.approx(0.5, rel=MISS_TOLERANCE)
        assert changed and all(w % ROUND == 0 for w in changed.values()), {n: w for n, w in changed.items() if w % ROUND}

    # resume after an interruption in epoch 2 equals the uninterrupted run (weights, decisions and method state): the
    # checkpoint of epoch 1 lies between two events (method_settings), so what the host accumulated must come back;
    # b.pt is that checkpoint as an interruption after the first step of epoch 2 leaves it (kept by the run above)
    resumed_model, resumed = _model(recipe), cls(recipe.prune_spec())
    result = fit(resumed_model, train, val, recipe.finetune, recipe.data, method=resumed,
                 checkpoint=tmp_path / "b.pt", resume=True)
    assert result.resumed_from == 1
    assert _decisions(resumed.summary()) == _decisions(method.summary())
    _assert_same_state(method.state_dict(), resumed.state_dict())
    for (key, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), key

    # the slim files reload to the trained model, without pickle
    save_slim(model, tmp_path / "slim", recipe.model)
    reloaded = load_slim(tmp_path / "slim")
    for (key, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), key
    x = torch.randn(3, *recipe.model.input_shape)
    with torch.no_grad():  # the trained model's convs are channels-last (training's layout): same values, other sums
        assert torch.allclose(model.eval()(x), reloaded(x), rtol=0, atol=1e-5)

    # two DDP ranks take identical decisions and end with identical weights
    _, ranks = ddp
    assert _decisions(ranks[0]["decisions"]) == _decisions(ranks[1]["decisions"])
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["widths"] == ranks[1]["widths"]
    if not cls.keeps_dense_shapes(recipe.prune):
        assert ranks[0]["widths"] != {n: list(p.shape) for n, p in _model(recipe).state_dict().items()}
