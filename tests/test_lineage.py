"""Optimizer state across a physical removal (prune/lineage.py): the kept channels keep their momentum and Adam
moments exactly, the optimizer holds the model's new Parameters, and the patch on torch-pruning lives only while
a Lineage records."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compressor.errors import NotPrunableError
from compressor.prune import heads as H
from compressor.prune import lineage as L
from compressor.prune.importance import ImportanceConfig, build_scorer
from compressor.prune.planning import Constraints, plan_uniform
from compressor.prune.removal import remove
from compressor.prune.snapshot import snapshot
from tests import helpers_models as M
from tests.helpers_models import tiny_vit4

BASE = tp.pruner.function.BasePruningFunc
ORIGINAL = BASE.__dict__["_prune_parameter_and_grad"]
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class ResidualNet(nn.Module):
    """stem -> BN -> [conv1 -> BN -> conv2 -> BN] + shortcut -> head: conv1's outputs are a group of their own,
    the stem's are the residual stream (stem, conv2's outputs, both BNs, conv1's and head's inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def keep(width: int, drop) -> list[int]:
    return [i for i in range(width) if i not in set(drop)]


CONV1 = {"conv1": [1, 5]}  # conv1's outputs: conv1 rows, bn1, conv2 columns
K1 = keep(8, CONV1["conv1"])
CUTS_CONV1 = {"conv1.weight": [(0, K1)], "conv1.bias": [(0, K1)], "bn1.weight": [(0, K1)], "bn1.bias": [(0, K1)],
              "conv2.weight": [(1, K1)]}
STEM = {"stem": [0, 3, 6]}  # the residual stream
K2 = keep(8, STEM["stem"])
CUTS_STEM = {"stem.weight": [(0, K2)], "stem.bias": [(0, K2)], "bn.weight": [(0, K2)], "bn.bias": [(0, K2)],
             "conv1.weight": [(1, K2)], "conv2.weight": [(0, K2)], "conv2.bias": [(0, K2)],
             "bn2.weight": [(0, K2)], "bn2.bias": [(0, K2)], "head.weight": [(1, K2)]}

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05, amsgrad=True),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.01),
}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, seed: int = 1) -> None:
    """A few steps with a loss that is not cross-entropy, so that every state tensor is non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=generator).to(device)
        loss = (model(x) - 0.5).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for name, p in model.named_parameters()}


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def assert_same_objects(found, expected) -> None:
    assert len(found) == len(expected) and all(a is b for a, b in zip(found, expected))


def assert_cut(model: nn.Module, optimizer: torch.optim.Optimizer, before: dict, cuts: dict) -> None:
    """Every parameter's state equals its state before the removal, cut along `cuts` (name -> [(dim, kept)]) and
    untouched elsewhere; scalar state (Adam's step) is unchanged."""
    assert set(before) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        now = optimizer.state[p]
        assert now.keys() == before[name].keys() and now, name
        for key, value in before[name].items():
            if torch.is_tensor(value) and value.dim() > 0:
                for dim, kept in cuts.get(name, []):
                    value = value.index_select(dim, torch.tensor(kept, device=value.device))
                assert now[key].shape == p.shape, (name, key)
            assert torch.equal(now[key], value), (name, key)


def built(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = ResidualNet()
    optimizer = OPTIMIZERS[kind](model.parameters())
    train(model, optimizer)
    return model, optimizer


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("plan, cuts", [(CONV1, CUTS_CONV1), (STEM, CUTS_STEM)], ids=["conv1", "residual"])
def test_the_kept_channels_keep_their_state_exactly(kind, plan, cuts):
    model, optimizer = built(kind)
    before = state_by_name(model, optimizer)
    lineage = L.Lineage()
    with lineage.recording(model):
        assert remove(model, X, plan) == len(next(iter(plan.values())))
    assert BASE.__dict__["_prune_parameter_and_grad"] is ORIGINAL
    changed = {name.rpartition(".")[0] for name in cuts}
    assert len(lineage) >= len(cuts)  # conv and BN weights and biases, and the consumers' columns
    counts = lineage.remap_optimizer(optimizer, model)
    assert counts == {"remapped": len(cuts), "dropped": 0, "reset": 0}, changed
    assert len(lineage) == 0
    assert_same_objects(optimizer_params(optimizer), list(model.parameters()))
    assert_cut(model, optimizer, before, cuts)
    train(model, optimizer, steps=1)  # the optimizer steps the new tensors
    assert all(torch.isfinite(v).all() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def test_adamw_after_a_removal_steps_as_the_dense_model_does_on_the_kept_channels():
    """The removed channels are zeroed first (conv1 rows and bn1's shift), so the dense and the pruned model
    compute the same function and the same gradients on the kept channels: one AdamW step then moves every kept
    entry of the pruned model exactly as it moves the dense one. With a fresh optimizer it would not."""
    model, optimizer = built("adamw")
    drop = CONV1["conv1"]
    with torch.no_grad():
        for t in (model.conv1.weight, model.conv1.bias, model.bn1.bias):
            t[drop] = 0
    dense = copy.deepcopy(model)
    dense_opt = OPTIMIZERS["adamw"](dense.parameters())
    dense_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load_state_dict shares the tensors
    lineage = L.Lineage()
    with lineage.recording(model):
        remove(model, X, CONV1)
    lineage.remap_optimizer(optimizer, model)
    fresh = copy.deepcopy(model)
    fresh_opt = OPTIMIZERS["adamw"](fresh.parameters())
    for m, opt in ((model, optimizer), (dense, dense_opt), (fresh, fresh_opt)):
        train(m, opt, steps=1, seed=7)
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        expected = dense_params[name].detach()
        for dim, kept in CUTS_CONV1.get(name, []):
            expected = expected.index_select(dim, torch.tensor(kept))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6, msg=name)
    assert not torch.allclose(fresh.conv1.weight, model.conv1.weight, atol=1e-4)


def test_groups_keep_their_hyper_parameters_and_order():
    torch.manual_seed(0)
    model = ResidualNet()
    norms = [p for n, p in model.named_parameters() if p.dim() == 1]
    weights = [p for n, p in model.named_parameters() if p.dim() > 1]
    optimizer = torch.optim.AdamW([{"params": weights, "weight_decay": 0.1, "tag": "w"},
                                   {"params": norms, "weight_decay": 0.0, "lr": 0.003}], lr=0.01)
    train(model, optimizer)
    lineage = L.Lineage()
    with lineage.recording(model):
        remove(model, X, STEM)
    lineage.remap_optimizer(optimizer, model)
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], decay["lr"], decay["tag"]) == (0.1, 0.01, "w")
    assert (no_decay["weight_decay"], no_decay["lr"]) == (0.0, 0.003)
    assert_same_objects(decay["params"], [p for p in model.parameters() if p.dim() > 1])
    assert_same_objects(no_decay["params"], [p for p in model.parameters() if p.dim() == 1])
    train(model, optimizer, steps=1)


def test_two_removals_compose_along_both_dims():
    """conv2 loses input columns (conv1's group), then output rows (the residual stream): its state is cut along
    both, in that order, whether the two removals are recorded in one block or two."""
    model, optimizer = built("adamw")
    before = state_by_name(model, optimizer)
    lineage = L.Lineage()
    with lineage.recording(model):
        remove(model, X, CONV1)
    with lineage.recording(model):
        remove(model, X, STEM)
    counts = lineage.remap_optimizer(optimizer, model)
    cuts = {name: CUTS_CONV1.get(name, []) + CUTS_STEM.get(name, []) for name in {**CUTS_CONV1, **CUTS_STEM}}
    assert cuts["conv2.weight"] == [(1, K1), (0, K2)]
    assert counts == {"remapped": len(cuts), "dropped": 0, "reset": 0}
    assert_same_objects(optimizer_params(optimizer), list(model.parameters()))
    assert_cut(model, optimizer, before, cuts)
    train(model, optimizer, steps=1)


def test_nested_recordings_each_see_what_happens_inside_them():
    model, optimizer = built("sgd")
    before = state_by_name(model, optimizer)
    outer, inner = L.Lineage(), L.Lineage()
    with outer.recording(model):
        remove(model, X, CONV1)
        middle = OPTIMIZERS["adamw"](model.parameters())  # an optimizer made between the two removals
        train(model, middle, steps=2)
        middle_before = state_by_name(model, middle)
        with inner.recording(model):
            assert BASE.__dict__["_prune_parameter_and_grad"] is L._recording_prune
            with inner.recording():  # the same lineage inside itself records each replacement once
                remove(model, X, STEM)
        assert BASE.__dict__["_prune_parameter_and_grad"] is L._recording_prune  # the outer one still records
        assert 0 < len(inner) < len(outer)
    assert BASE.__dict__["_prune_parameter_and_grad"] is ORIGINAL and not L._ACTIVE
    cuts = {name: CUTS_CONV1.get(name, []) + CUTS_STEM.get(name, []) for name in {**CUTS_CONV1, **CUTS_STEM}}
    assert outer.remap_optimizer(optimizer, model)["remapped"] == len(cuts)
    assert inner.remap_optimizer(middle, model)["remapped"] == len(CUTS_STEM)
    assert_cut(model, optimizer, before, cuts)
    assert_cut(model, middle, middle_before, CUTS_STEM)


def test_the_patch_is_restored_after_an_exception():
    model, optimizer = built("sgd")
    lineage = L.Lineage()
    with pytest.raises(NotPrunableError):
        with lineage.recording(model):
            remove(model, X, {"conv1": list(range(8))})  # every channel: refused
    assert BASE.__dict__["_prune_parameter_and_grad"] is ORIGINAL and not L._ACTIVE
    with pytest.raises(RuntimeError, match="boom"):
        with L.Lineage().recording():
            with lineage.recording():
                raise RuntimeError("boom")
    assert BASE.__dict__["_prune_parameter_and_grad"] is ORIGINAL and not L._ACTIVE
    L.record_replacement(model.conv1.weight, nn.Parameter(model.conv1.weight[:2]), 0, [0, 1])  # nobody records
    assert len(lineage) == 0


def test_nothing_is_recorded_outside_a_recording():
    model, optimizer = built("sgd")
    lineage = L.Lineage()
    remove(model, X, CONV1)
    assert len(lineage) == 0
    assert lineage.remap_optimizer(optimizer, model) == {"remapped": 0, "dropped": len(CUTS_CONV1), "reset": 0}
    assert len(optimizer_params(optimizer)) == len(list(model.parameters())) - len(CUTS_CONV1)


def test_the_kept_heads_keep_their_state():
    """torchvision's MultiheadAttention loses heads 1 and 3 of 4: it is rebuilt as a HeadPrunedMultiheadAttention
    (a copy of each parameter, recorded), then its q/k/v rows and output columns are cut (recorded)."""
    torch.manual_seed(0)
    model = tiny_vit4()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(images).square().mean().backward()
        optimizer.step()
    layer = "encoder.layers.encoder_layer_0.self_attention"
    before = state_by_name(model, optimizer)
    lineage = L.Lineage()
    with lineage.recording(model):
        remove(model, images, {H.head_root(layer): [1, 3]})
    assert type(model.get_submodule(layer)).__name__ == "HeadPrunedMultiheadAttention"
    counts = lineage.remap_optimizer(optimizer, model)
    d = 8
    rows = [part * 32 + h * d + r for part in range(3) for h in (0, 2) for r in range(d)]
    columns = [h * d + c for h in (0, 2) for c in range(d)]
    cuts = {f"{layer}.in_proj_weight": [(0, rows)], f"{layer}.in_proj_bias": [(0, rows)],
            f"{layer}.out_proj.weight": [(1, columns)], f"{layer}.out_proj.bias": []}
    assert counts == {"remapped": 4, "dropped": 0, "reset": 0}  # out_proj.bias: copied whole into the new module
    assert_same_objects(optimizer_params(optimizer), list(model.parameters()))
    assert_cut(model, optimizer, before, cuts)
    optimizer.zero_grad()
    model(images).square().mean().backward()
    optimizer.step()


def depthwise() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


WHOLE_MODELS = {  # (factory, example, snapshot options, planned groups at least, a parameter that shrinks)
    "depthwise": (depthwise, lambda: torch.randn(2, 3, 8, 8), {}, 1, ("3.weight", 0)),  # one group with the conv
    "bare-parameter": (M.with_custom_scale, lambda: torch.randn(2, 3, 8, 8), {}, 1, ("scale", 1)),
    "groupnorm": (M.tiny_groupnorm, lambda: torch.randn(2, 3, 8, 8), {}, 1, ("1.weight", 0)),
    "timm-heads": (M.tiny_timm_vit, lambda: torch.randn(2, 3, 32, 32), {"heads": True}, 4,
                   ("blocks.0.attn.qkv.weight", 0)),
    "hf-heads-embed": (M.tiny_hf_distilbert, lambda: torch.randint(5, 100, (1, 12)), {"heads": True, "embed": True},
                       5, ("model.distilbert.transformer.layer.0.attention.q_lin.weight", 1)),  # embedding columns
}


@pytest.mark.parametrize("family", list(WHOLE_MODELS))
def test_every_parameter_of_a_planned_removal_carries_its_state(family):
    """The oracle: AdamW's state is set to functions of each parameter (exp_avg = p, exp_avg_sq = p^2,
    max_exp_avg_sq = |p|), so after any removal, by any path (torch-pruning's handlers, head removal, the embedding
    width), each state tensor must equal that function of the new parameter, for every parameter of the model."""
    build, example, options, at_least, (shrinks, dim) = WHOLE_MODELS[family]
    if family.startswith("timm"):
        pytest.importorskip("timm")
    if family.startswith("hf"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = build(), example()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    for p in model.parameters():
        optimizer.state[p].update(step=torch.tensor(5.0), exp_avg=p.detach().clone(),
                                  exp_avg_sq=p.detach().square(), max_exp_avg_sq=p.detach().abs())
    plan = plan_uniform(snapshot(model, x, [], build_scorer(ImportanceConfig()), **options), 0.4, Constraints())
    assert len(plan) >= at_least, plan
    dense, width = {id(p) for p in model.parameters()}, model.get_parameter(shrinks).shape[dim]
    lineage = L.Lineage()
    with lineage.recording(model):
        remove(model, x, plan)
    replaced = sum(id(p) not in dense for p in model.parameters())
    assert replaced >= 2 * at_least and model.get_parameter(shrinks).shape[dim] < width
    assert lineage.remap_optimizer(optimizer, model) == {"remapped": replaced, "dropped": 0, "reset": 0}
    assert_same_objects(optimizer_params(optimizer), list(model.parameters()))
    for name, p in model.named_parameters():
        state, p = optimizer.state[p], p.detach()
        assert torch.equal(state["step"], torch.tensor(5.0)), name
        assert torch.equal(state["exp_avg"], p) and torch.equal(state["exp_avg_sq"], p.square()), name
        assert torch.equal(state["max_exp_avg_sq"], p.abs()), name
    optimizer.zero_grad()
    model(x).float().square().mean().backward()
    optimizer.step()


def test_torch_pruning_multihead_attention_embed_width_composes_rows_then_columns():
    """torch-pruning's own MultiheadAttention handler cuts in_proj_weight twice (3 x rows, then columns) and
    out_proj twice: one chain each."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    optimizer = torch.optim.SGD(mha.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(3, 2, 8)
    for _ in range(2):
        optimizer.zero_grad()
        mha(x, x, x)[0].square().mean().backward()
        optimizer.step()
    before = state_by_name(mha, optimizer)
    lineage = L.Lineage()
    with lineage.recording(mha):
        tp.pruner.function.MultiheadAttentionPruner().prune_out_channels(mha, [2, 5])
    kept = keep(8, [2, 5])
    rows = [part * 8 + i for part in range(3) for i in kept]
    assert lineage.remap_optimizer(optimizer, mha) == {"remapped": 4, "dropped": 0, "reset": 0}
    assert_cut(mha, optimizer, before, {"in_proj_weight": [(0, rows), (1, kept)], "in_proj_bias": [(0, rows)],
                                        "out_proj.weight": [(0, kept), (1, kept)], "out_proj.bias": [(0, kept)]})


def test_every_torch_pruning_handler_replaces_parameters_through_the_patched_function():
    """The premise of the patch: no handler of this torch-pruning overrides _prune_parameter_and_grad or builds
    a Parameter itself (a newer version that does fails here, not silently in a user's optimizer)."""
    handlers = [c for c in vars(tp.pruner.function).values() if isinstance(c, type) and issubclass(c, BASE)]
    assert len(handlers) >= 12
    for handler in handlers:
        assert "_prune_parameter_and_grad" not in vars(handler) or handler is BASE, handler
        if handler is not BASE:
            assert "Parameter(" not in inspect.getsource(handler), handler


F_ = tp.pruner.function
HANDLERS = {  # handler call, layer, input, {parameter: dim cut}
    "layernorm": (F_.LayernormPruner().prune_out_channels, lambda: nn.LayerNorm(8), (4, 3, 8),
                  {"weight": 0, "bias": 0}),
    "groupnorm": (F_.GroupNormPruner().prune_out_channels, lambda: nn.GroupNorm(1, 8), (4, 8, 3),
                  {"weight": 0, "bias": 0}),
    "instancenorm": (F_.InstanceNormPruner().prune_out_channels, lambda: nn.InstanceNorm1d(8, affine=True),
                     (4, 8, 3), {"weight": 0, "bias": 0}),
    "prelu": (F_.PReLUPruner().prune_out_channels, lambda: nn.PReLU(8), (4, 8, 3), {"weight": 0}),
    "embedding": (F_.EmbeddingPruner().prune_out_channels, lambda: nn.Embedding(5, 8), None, {"weight": 1}),
    "lstm-input": (F_.LSTMPruner().prune_in_channels, lambda: nn.LSTM(8, 4, bidirectional=True), (4, 3, 8),
                   {"weight_ih_l0": 1, "weight_ih_l0_reverse": 1}),
}


@pytest.mark.parametrize("kind", list(HANDLERS))
def test_norm_prelu_embedding_and_lstm_handlers_are_recorded(kind):
    prune, layer, shape, cut = HANDLERS[kind]
    torch.manual_seed(0)
    module = layer()
    x = torch.randint(0, 5, (4, 3)) if shape is None else torch.randn(shape)

    def output():
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    weights = torch.randn(output().shape)  # every channel its own gradient
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        (output() * weights).sum().backward()
        optimizer.step()
    before = state_by_name(module, optimizer)
    lineage = L.Lineage()
    with lineage.recording(module):
        prune(module, [0, 6])
    assert lineage.remap_optimizer(optimizer, module) == {"remapped": len(cut), "dropped": 0, "reset": 0}
    assert_cut(module, optimizer, before, {name: [(dim, keep(8, [0, 6]))] for name, dim in cut.items()})


def test_a_replacement_that_did_not_report_is_found_by_name_and_reset():
    model, optimizer = built("adamw")
    lineage = L.Lineage()
    with lineage.recording(model):
        model.head.weight = nn.Parameter(model.head.weight.detach()[:3].clone())  # no record: a foreign path
        model.head.bias = nn.Parameter(model.head.bias.detach()[:3].clone())
    assert lineage.remap_optimizer(optimizer, model) == {"remapped": 0, "dropped": 0, "reset": 2}
    assert_same_objects(optimizer_params(optimizer), list(model.parameters()))
    assert model.head.weight not in optimizer.state and model.conv1.weight in optimizer.state
    train(model, optimizer, steps=1)
    assert optimizer.state[model.head.weight]["exp_avg"].shape == (3, 8)
    # without the model's names the same change drops the parameter (its state is gone, it is not trained)
    lineage = L.Lineage()
    with lineage.recording():
        model.head.weight = nn.Parameter(model.head.weight.detach()[:2].clone())
    assert lineage.remap_optimizer(optimizer, model) == {"remapped": 0, "dropped": 1, "reset": 0}


def test_a_removed_layer_is_dropped_and_state_of_another_shape_is_reset():
    model, optimizer = built("sgd")
    optimizer.state[model.conv1.weight]["ring"] = torch.zeros(3)  # a state tensor not shaped like its parameter
    lineage = L.Lineage()
    with lineage.recording(model):
        remove(model, X, CONV1)
        model.head = nn.Identity()  # a layer replaced without parameters
    counts = lineage.remap_optimizer(optimizer, model)
    assert counts == {"remapped": len(CUTS_CONV1) - 1, "dropped": 2, "reset": 1}
    assert_same_objects(optimizer_params(optimizer), list(model.parameters()))
    assert model.conv1.weight not in optimizer.state and model.conv1.bias in optimizer.state


def test_a_tied_weight_cut_in_two_places_keeps_its_state_in_both():
    param = nn.Parameter(torch.randn(4, 6))
    first, second = nn.Linear(6, 4, bias=False), nn.Linear(6, 4, bias=False)
    first.weight = second.weight = param
    model = nn.Sequential(first, second)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    param.grad = torch.randn(4, 6)
    optimizer.step()
    momentum = optimizer.state[param]["momentum_buffer"].clone()
    lineage = L.Lineage()
    with lineage.recording(model):
        tp.pruner.function.LinearPruner().prune_in_channels(first, [0])
        tp.pruner.function.LinearPruner().prune_in_channels(second, [5])
    assert lineage.remap_optimizer(optimizer, model) == {"remapped": 1, "dropped": 0, "reset": 0}
    assert_same_objects(optimizer_params(optimizer), [first.weight, second.weight])
    a, b = (optimizer.state[p]["momentum_buffer"] for p in (first.weight, second.weight))
    assert torch.equal(a, momentum[:, 1:]) and torch.equal(b, momentum[:, :5])
    assert a.data_ptr() != b.data_ptr()


def test_a_distributed_data_parallel_model_keeps_its_optimizer_state(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, _ = built("sgd")
        wrapped = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=0.01)
        train(wrapped, optimizer)
        before = state_by_name(model, optimizer)
        lineage = L.Lineage()
        with lineage.recording(wrapped):
            remove(model, X, CONV1)
        assert lineage.remap_optimizer(optimizer, wrapped)["remapped"] == len(CUTS_CONV1)
        assert_same_objects(optimizer_params(optimizer), list(model.parameters()))
        assert_cut(model, optimizer, before, CUTS_CONV1)
        train(DistributedDataParallel(model), optimizer, steps=1)  # re-wrapped, as after any structure change
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_on_cuda_stays_on_cuda():
    model, _ = built("sgd")
    model = model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    train(model, optimizer)
    before = state_by_name(model, optimizer)
    lineage = L.Lineage()
    with lineage.recording(model):
        remove(model, X.cuda(), STEM)
    assert lineage.remap_optimizer(optimizer, model)["remapped"] == len(CUTS_STEM)
    assert_cut(model, optimizer, before, CUTS_STEM)
    assert all(v.is_cuda for p in model.parameters() for v in optimizer.state[p].values() if v.dim() > 0)
    train(model, optimizer, steps=1)
