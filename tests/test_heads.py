"""Attention heads as structures (prune/heads.py): what removal takes out, equivalence with masking, the planner's
view, save / reload / ONNX, and every method seeing heads."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from compressor.app.recipe import recipe_from_dict
from compressor.errors import RecipeError
from compressor.models.attention import HeadPrunedMultiheadAttention
from compressor.prune import heads as H
from compressor.prune.op_count import snapshot_macs
from compressor.prune.planning import Constraints, allowed_removals, plan_global
from compressor.prune.removal import remove
from compressor.prune.snapshot import snapshot
from compressor.prune.importance import ImportanceConfig, build_scorer
from tests.conftest import tiny_recipe
from tests.helpers_models import (tiny_hf_bert, tiny_hf_deit, tiny_hf_distilbert, tiny_hf_roberta, tiny_hf_vit, tiny_swin_shifted, tiny_swin_v2,
                                  tiny_timm_swin, tiny_timm_vit, tiny_vit4)

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
FAMILIES = {"torchvision": (tiny_vit4, "encoder.layers.encoder_layer_0.self_attention"),
            "timm": (tiny_timm_vit, "blocks.0.attn"),
            "hf-vit": (tiny_hf_vit, "model.vit.layers.0.attention"),
            "hf-deit": (tiny_hf_deit, "model.deit.layers.1.attention"),
            "timm-swin": (tiny_timm_swin, "layers.1.blocks.0.attn"),
            "torchvision-swin": (tiny_swin_shifted, "features.3.1.attn"),  # a shifted-window block
            "torchvision-swin-v2": (tiny_swin_v2, "features.3.1.attn")}


def _model(family: str) -> tuple[nn.Module, str]:
    if family.startswith("timm"):
        pytest.importorskip("timm")
    if family.startswith("hf"):
        pytest.importorskip("transformers")
    build, layer = FAMILIES[family]
    torch.manual_seed(0)
    return build().eval(), layer


def _packed(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if hasattr(module, "qkv"):
        return module.qkv.weight, module.qkv.bias, module.proj.weight
    return module.in_proj_weight, module.in_proj_bias, module.out_proj.weight


@pytest.mark.parametrize("family", ["torchvision", "timm", "timm-swin", "torchvision-swin"])
def test_a_removed_heads_rows_and_columns_are_gone(family):
    model, layer = _model(family)
    weight, bias, out = (t.detach().clone() for t in _packed(model.get_submodule(layer)))
    d = weight.shape[0] // 12  # 4 heads of d: rows [q heads | k heads | v heads]
    H.remove_heads(model, H.head_root(layer), [1, 3])
    new_weight, new_bias, new_out = _packed(model.get_submodule(layer))
    kept = [r for part in range(3) for h in (0, 2) for r in range(part * 4 * d + h * d, part * 4 * d + (h + 1) * d)]
    assert new_weight.shape == (6 * d, weight.shape[1]) and torch.equal(new_weight, weight[kept])
    assert torch.equal(new_bias, bias[kept])
    columns = [c for h in (0, 2) for c in range(h * d, (h + 1) * d)]
    assert new_out.shape == (out.shape[0], 2 * d) and torch.equal(new_out, out[:, columns])
    assert H.head_counts(model)[H.head_root(layer)] == 2
    assert model(X).shape == (3, 10)


def test_a_removed_heads_query_key_value_rows_and_output_columns_are_gone_in_hugging_face_layers():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_hf_bert().eval()
    layer = "model.bert.encoder.layer.1.attention"
    block = model.get_submodule(layer)
    before = {n: getattr(block.self, n).weight.detach().clone() for n in ("query", "key", "value")}
    out = block.output.dense.weight.detach().clone()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    H.remove_heads(model, H.head_root(layer), [0])
    kept = list(range(8, 32))  # 4 heads of 8: head 0 is rows 0-7
    for n in ("query", "key", "value"):
        assert torch.equal(getattr(block.self, n).weight, before[n][kept])
    assert torch.equal(block.output.dense.weight, out[:, kept])
    assert block.self.num_attention_heads == 3 and block.self.all_head_size == 24
    assert model(ids).shape == (2, 3)
    assert H.head_counts(model) == {"model.bert.encoder.layer.0.attention:heads": 4, f"{layer}:heads": 3}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_pruned_model_computes_what_the_masked_model_computes(family):
    """Zeroing a head's q, k, v rows (its output is then zero) and removing it give the same function."""
    model, layer = _model(family)
    site = next(s for s in H.head_sites(model) if s.name == layer)
    with torch.no_grad():
        for sl, heads in site.slices(out_only=True):
            rows = [i for i, h in zip(sl.idxs, heads) if h == 2]
            sl.param.index_fill_(sl.dim, torch.tensor(rows), 0.0)
        masked = model(X)
        H.remove_heads(model, H.head_root(layer), [2])
        pruned = model(X)
    assert masked.abs().max() > 1e-3  # the output is not trivially zero
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [tiny_hf_bert, tiny_hf_distilbert, tiny_hf_roberta], ids=["bert", "distilbert",
                                                                                             "roberta"])
def test_text_encoders_compute_what_their_masked_model_computes(build):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    sites = H.head_sites(model)
    assert len(sites) == 2 and all(s.family == "sep" and s.num_heads == 4 for s in sites)
    with torch.no_grad():
        for sl, heads in sites[1].slices(out_only=True):
            rows = [i for i, h in zip(sl.idxs, heads) if h in (0, 3)]
            sl.param.index_fill_(sl.dim, torch.tensor(rows), 0.0)
        masked = model(ids)
        H.remove_heads(model, H.head_root(sites[1].name), [0, 3])
        pruned = model(ids)
    assert H.head_counts(model)[H.head_root(sites[1].name)] == 2
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-6)


def test_a_pruned_multihead_attention_matches_torch_with_all_its_heads():
    """HeadPrunedMultiheadAttention with every head is torch's MultiheadAttention: masks, batch_first, weights."""
    torch.manual_seed(0)
    for batch_first in (False, True):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        ours = H.replace_mha(mha, 4).eval()
        q, k = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
        if batch_first:
            q, k = q.transpose(0, 1), k.transpose(0, 1)
        pad = torch.zeros(2, 7, dtype=torch.bool)
        pad[1, -2:] = True
        causal = torch.randn(5, 7)
        for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": causal}, {"need_weights": False}):
            expected = mha(q, k, k, **kwargs)
            got = ours(q, k, k, **kwargs)
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
            if kwargs.get("need_weights", True):
                torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["hf-vit", "timm", "torchvision"])  # 4 heads in both layers; Swin below
def test_the_planner_sees_heads_with_their_macs(family):
    model, layer = _model(family)
    scorer = build_scorer(ImportanceConfig())
    plain = snapshot(model, X[:1], [], scorer)
    snap = snapshot(model, X[:1], [], scorer, heads=True)
    roots = {c.root: c for c in snap.candidates}
    assert not any(H.is_head_root(c.root) for c in plain.candidates)
    heads = {r: c for r, c in roots.items() if H.is_head_root(r)}
    assert sorted(heads) == sorted(H.head_root(s.name) for s in H.head_sites(model)) and len(heads) == 2
    assert all(c.width == 4 and c.scores.shape == (4,) for c in heads.values())
    plan = {H.head_root(layer): [0, 1]}
    predicted = snap.macs_after(plan)
    remove(model, X[:1], plan)
    achieved = snapshot_macs(model, X[:1])[0]
    assert predicted < snap.total_macs and achieved == pytest.approx(predicted, rel=0.02)
    # heads do not follow round_to (a kept width is heads x head_dim, aligned when head_dim is)
    assert allowed_removals(4, Constraints(round_to=8, max_layer_ratio=0.8), H.head_root(layer)) == [0, 1, 2, 3]
    assert allowed_removals(4, Constraints(round_to=8, max_layer_ratio=0.5), H.head_root(layer)) == [0, 1, 2]


def test_heads_ranked_by_their_joint_norm():
    model, layer = _model("torchvision")
    site = next(s for s in H.head_sites(model) if s.name == layer)
    with torch.no_grad():
        for sl, heads in site.slices(out_only=False):
            rows = [i for i, h in zip(sl.idxs, heads) if h == 3]
            sl.param.index_copy_(sl.dim, torch.tensor(rows), sl.param.index_select(sl.dim, torch.tensor(rows)) * 0.01)
    snap = snapshot(model, X[:1], [], build_scorer(ImportanceConfig()), heads=True)
    scores = next(c for c in snap.candidates if c.root == H.head_root(layer)).scores
    assert int(scores.argmin()) == 3 and scores.mean() == pytest.approx(1.0)
    assert plan_global(snap, 1, Constraints()) in ({H.head_root(layer): [3]},)


def test_head_counts_survive_save_reload_and_onnx(tmp_path):
    import onnxruntime as ort

    from compressor.deploy.config import OnnxConfig
    from compressor.deploy.export import export_onnx
    from compressor.models.config import ModelConfig
    from compressor.models.slim import load_slim, save_slim

    model, _ = _model("torchvision")
    H.remove_heads(model, H.head_root("encoder.layers.encoder_layer_0.self_attention"), [0, 2])
    H.remove_heads(model, H.head_root("encoder.layers.encoder_layer_1.self_attention"), [3])
    with torch.no_grad():
        expected = model(X)
    cfg = ModelConfig(arch="python:tests.helpers_models:tiny_vit4", num_classes=10, in_channels=3,
                      input_shape=[3, 32, 32])
    save_slim(model, tmp_path, cfg)
    reloaded = load_slim(tmp_path)
    counts = {"encoder.layers.encoder_layer_0.self_attention:heads": 2,
              "encoder.layers.encoder_layer_1.self_attention:heads": 3}
    assert H.head_counts(reloaded) == counts
    assert isinstance(reloaded.encoder.layers[0].self_attention, HeadPrunedMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X), expected, rtol=0, atol=0)
    path = export_onnx(reloaded, X[:1], tmp_path / "model.onnx", OnnxConfig(simplify=False)) or tmp_path / "model.onnx"
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]  # a batch of 3: the batch axis is free
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,factory", [("timm", "tiny_timm_vit"), ("hf-vit", "tiny_hf_vit"),
                                            ("hf-deit", "tiny_hf_deit"),
                                            ("timm-swin", "tiny_timm_swin"), ("torchvision-swin", "tiny_swin_shifted"),
                                            ("torchvision-swin-v2", "tiny_swin_v2")])
def test_timm_and_hugging_face_head_counts_survive_save_and_reload(tmp_path, family, factory):
    from compressor.models.config import ModelConfig
    from compressor.models.slim import load_slim, save_slim

    model, layer = _model(family)
    H.remove_heads(model, H.head_root(layer), [1])
    cfg = ModelConfig(arch=f"python:tests.helpers_models:{factory}", num_classes=10, in_channels=3,
                      input_shape=[3, 32, 32])
    save_slim(model, tmp_path, cfg)
    reloaded = load_slim(tmp_path)
    counts = H.head_counts(reloaded)
    expected = {"timm-swin": [2, 3], "torchvision-swin": [2, 2, 3, 4], "torchvision-swin-v2": [2, 2, 3, 4]}
    assert counts[H.head_root(layer)] == 3 and sorted(counts.values()) == expected.get(family, [3, 4])
    if family == "timm":
        assert reloaded.blocks[0].attn.attn_dim == 24
    if family == "timm-swin":  # the position-bias table lost the removed head's column
        assert reloaded.get_submodule(layer).relative_position_bias_table.shape[1] == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X), model(X), rtol=0, atol=0)


def test_a_head_cannot_be_removed_twice_or_all_of_them():
    model, layer = _model("torchvision")
    from compressor.errors import NotPrunableError

    with pytest.raises(NotPrunableError, match="has 4 heads; cannot remove head 4"):
        H.remove_heads(model, H.head_root(layer), [4])
    with pytest.raises(NotPrunableError, match="removing all 4 heads"):
        H.remove_heads(model, H.head_root(layer), [0, 1, 2, 3])


def test_importances_without_head_scores_are_a_recipe_error():
    model, _ = _model("torchvision")
    with pytest.raises(RecipeError, match="prune.attention.heads"):
        snapshot(model, X[:1], [], build_scorer(ImportanceConfig(kind="gate")), heads=True)


def _vit_recipe(method: str, epochs: int = 1, **prune):
    return recipe_from_dict(tiny_recipe(
        model={"arch": "python:tests.helpers_models:tiny_vit4", "num_classes": 4, "in_channels": 3,
               "input_shape": [3, 32, 32]},
        prune={"method": method, "target": {"macs": 0.6}, "attention": {"heads": True}, **prune},
        finetune={"epochs": epochs}))


@pytest.mark.parametrize("method,extra", [
    ("oneshot", {}),
    ("dpm", {"schedule": {"events": 1, "end_epoch": 1}, "dpm": {"steps": 2, "interval": 1}}),
    ("fggp", {"fggp": {"granularity": "structured", "interval": 1}}),
    ("ocsp", {"epochs": 2, "ocsp": {"latest_prune_epoch": 1}}),
])
def test_every_structured_method_removes_heads(tmp_path, method, extra):
    from compressor.app.pipeline import compress

    report = compress("python:tests.helpers_models:tiny_vit4", _vit_recipe(method, **extra), tmp_path / "run")
    widths = report["compressed"]["widths"]
    heads = {k: v for k, v in widths.items() if k.endswith(":heads")}
    assert len(heads) == 2 and report["dense"]["widths"][next(iter(heads))] == 4
    assert sum(heads.values()) < 8, f"{method} removed no head: {heads}"
    assert report["compressed"]["macs"] / report["dense"]["macs"] == pytest.approx(0.6, abs=0.08)
    from compressor.models.slim import load_slim

    reloaded = load_slim(tmp_path / "run")
    assert {k: v for k, v in H.head_counts(reloaded).items()} == heads


def test_inspect_lists_attention_layers_and_their_heads():
    from compressor.app.inspection import inspect_model
    from compressor.models.config import ModelConfig
    from tests.helpers_models import tiny_swin

    torch.manual_seed(0)
    cfg = ModelConfig(arch="python:tests.helpers_models:tiny_vit4", num_classes=10, in_channels=3,
                      input_shape=[3, 32, 32])
    report = inspect_model(tiny_vit4(), cfg)
    assert report.heads == {f"encoder.layers.encoder_layer_{i}.self_attention": {"heads": 4, "head_dim": 8}
                            for i in range(2)}
    swin = inspect_model(tiny_swin(), cfg.model_copy(update={"arch": "python:tests.helpers_models:tiny_swin"}))
    assert swin.heads == {"features.1.0.attn": {"heads": 2, "head_dim": 8},  # embed 16, then 32 after merging
                          "features.3.0.attn": {"heads": 2, "head_dim": 16}}


def _hf_dir(tmp_path, text: bool = False):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = (tiny_hf_bert() if text else tiny_hf_vit(num_classes=4)).model
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_a_hugging_face_directory_compresses_with_its_heads(tmp_path):
    """hf:DIR (a save_pretrained directory) as the model: its weights load, heads and MLP widths are pruned, the
    slim model reloads from the same reference, the export matches."""
    from compressor.app.pipeline import compress
    from compressor.models.slim import load_slim

    ref = f"hf:{_hf_dir(tmp_path)}"
    recipe = recipe_from_dict(tiny_recipe(
        model={"arch": ref, "num_classes": 4, "in_channels": 3, "input_shape": [3, 32, 32]},
        prune={"method": "oneshot", "target": {"macs": 0.6}, "attention": {"heads": True}},
        finetune={"epochs": 1}))
    report = compress(ref, recipe, tmp_path / "run")
    heads = {k: v for k, v in report["compressed"]["widths"].items() if k.endswith(":heads")}
    assert sorted(heads) == ["model.vit.layers.0.attention:heads", "model.vit.layers.1.attention:heads"]
    assert sum(heads.values()) < 8 and report["parity"]["onnx"]["max_abs_diff"] < 1e-3
    assert H.head_counts(load_slim(tmp_path / "run")) == heads


def test_hugging_face_references_say_what_does_not_fit(tmp_path):
    from compressor.errors import ModelLoadError
    from compressor.models.config import ModelConfig
    from compressor.models.loading import build_arch, load_model

    with pytest.raises(ModelLoadError, match="config.json does not exist"):
        build_arch(f"hf:{tmp_path / 'missing'}", 4, 3)
    vit = _hf_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="model.num_classes is 10, the model's config.json has num_labels 4"):
        build_arch(f"hf:{vit}", 10, 3)
    text = f"hf:{_hf_dir(tmp_path / 'text', text=True)}"
    with pytest.raises(ModelLoadError, match="model.num_classes is 5, the model's config.json has num_labels 3"):
        build_arch(text, 5, 3)
    with pytest.raises(RecipeError, match="is a text model; the recipe has model.inputs: image"):
        load_model(text, ModelConfig(num_classes=3))
    with pytest.raises(RecipeError, match="is an image model; the recipe has model.inputs: tokens"):
        load_model(f"hf:{vit}", ModelConfig(num_classes=4, inputs="tokens", input_shape=[16]))
    with pytest.raises(RecipeError, match=r"model.input_shape \[4096\]: .* embeds at most 64 positions"):
        load_model(text, ModelConfig(num_classes=3, inputs="tokens", input_shape=[4096]))


def test_an_ignored_attention_layer_keeps_its_heads():
    model, layer = _model("torchvision")
    snap = snapshot(model, X[:1], [layer], build_scorer(ImportanceConfig()), heads=True)
    roots = {c.root for c in snap.candidates if H.is_head_root(c.root)}
    assert roots == {"encoder.layers.encoder_layer_1.self_attention:heads"}


def test_timm_swin_window_heads_are_planned_by_their_macs_and_compress(tmp_path):
    """timm's Swin v1 window attention: its heads (q/k/v rows, proj columns, position-bias column) are candidates
    whose predicted MACs the removal achieves, and a compress run removes some and reloads them."""
    from compressor.app.pipeline import compress
    from compressor.models.slim import load_slim

    model, layer = _model("timm-swin")
    snap = snapshot(model, X[:1], [], build_scorer(ImportanceConfig()), heads=True)
    widths = {c.root: c.width for c in snap.candidates if H.is_head_root(c.root)}
    assert widths == {"layers.0.blocks.0.attn:heads": 2, "layers.1.blocks.0.attn:heads": 4}
    plan = {H.head_root(layer): [0, 3]}
    predicted = snap.macs_after(plan)
    remove(model, X[:1], plan)
    assert snapshot_macs(model, X[:1])[0] == pytest.approx(predicted, rel=0.02) and predicted < snap.total_macs

    recipe = recipe_from_dict(tiny_recipe(
        model={"arch": "python:tests.helpers_models:tiny_timm_swin", "num_classes": 4, "in_channels": 3,
               "input_shape": [3, 32, 32]},
        prune={"method": "oneshot", "target": {"macs": 0.6}, "attention": {"heads": True}},
        finetune={"epochs": 1}, bench={"backends": ["ort-cpu"], "batch_sizes": [1]}))
    report = compress("python:tests.helpers_models:tiny_timm_swin", recipe, tmp_path / "run")
    heads = {k: v for k, v in report["compressed"]["widths"].items() if k.endswith(":heads")}
    assert len(heads) == 2 and sum(heads.values()) < 6, heads
    assert report["parity"]["onnx"]["passed"]
    assert H.head_counts(load_slim(tmp_path / "run")) == heads


@pytest.mark.parametrize("build", [tiny_swin_shifted, tiny_swin_v2], ids=["v1", "v2"])
def test_torchvision_swin_with_all_heads_computes_what_torchvision_computes(build):
    """The head-width-aware forward a torchvision Swin layer gets before its heads go (models/swin_heads.py) is
    torchvision's own function when no head is gone: shifted and unshifted windows, v1 bias table and v2 cosine
    attention."""
    from compressor.models.swin_heads import adopt

    torch.manual_seed(0)
    model = build().eval()
    expected = model(X)
    from compressor.models.attention import attention_modules

    layers = [m for _, m, family, _ in attention_modules(model)]
    assert len(layers) == 4 and all(not type(m).__name__.startswith("HeadPruned") for m in layers)
    for module in layers:
        adopt(module)
    assert all(type(m).__name__.startswith("HeadPruned") for m in layers)
    torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-6)


def test_torchvision_swin_heads_compress_export_and_reload(tmp_path):
    from compressor.app.pipeline import compress
    from compressor.models.slim import load_slim

    ref = "python:tests.helpers_models:tiny_swin_shifted"
    # per-layer ranking (global: false): every group, the heads included, loses its share, whatever the weights
    # rank first globally (at 0.6 of the MACs the global ranking of this initialisation takes MLP channels only)
    recipe = recipe_from_dict(tiny_recipe(
        model={"arch": ref, "num_classes": 4, "in_channels": 3, "input_shape": [3, 32, 32]},
        prune={"method": "oneshot", "target": {"macs": 0.6}, "global": False, "attention": {"heads": True}},
        finetune={"epochs": 1}, bench={"backends": ["ort-cpu"], "batch_sizes": [1]}))
    report = compress(ref, recipe, tmp_path / "run")
    heads = {k: v for k, v in report["compressed"]["widths"].items() if k.endswith(":heads")}
    assert len(heads) == 4 and sum(heads.values()) < 12, heads
    assert report["parity"]["onnx"]["passed"] and report["parity"]["onnx"]["max_abs_diff"] < 1e-4
    assert H.head_counts(load_slim(tmp_path / "run")) == heads


def test_window_attention_this_version_cannot_slice_says_why():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, window_size=4, embed_dim=16,
                              depths=(1, 1), num_heads=(2, 2), num_classes=4)
    reasons = set(H.unsupported_sites(model).values())
    assert reasons == {"WindowAttention: Swin v2 window attention whose per-head logit scale and position-bias MLP "
                       "this version cannot slice"}
