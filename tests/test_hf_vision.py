"""Hugging Face image classifiers as hf:DIR (models/hf.py): recognised from transformers' Auto mappings whatever
fields their config has, compressed with their heads (Swin, BEiT and Data2Vec-Vision relative position biases and
Swin v2's per-head scale go with the heads; a bias shared by the layers keeps every head), saved without the APIs
vision models lack, or refused before training; `inspect hf:DIR` without a recipe reads the model's own labels.
benchmarks/hf_vision.py runs every family of the mapping."""
from __future__ import annotations

import pytest
import torch

from compressor.app.recipe import recipe_from_dict
from compressor.errors import ModelLoadError
from compressor.models.config import ModelConfig
from compressor.prune import heads as H
from tests.conftest import tiny_recipe

transformers = pytest.importorskip("transformers")

VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=64, num_labels=3)
SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=3)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _build(family: str, **extra):
    """A randomly initialised (seed 0) tiny classifier of `family`, 3 labels, 32x32 inputs."""
    t = transformers
    configs = {
        "resnet": lambda: t.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_labels=3),
        "convnext": lambda: t.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3),
        "pp_lcnet": lambda: t.PPLCNetConfig(scale=0.25, stem_channels=16, class_expand=64, num_labels=3, block_configs=[
            [[3, 16, 32, 1, False]], [[3, 32, 64, 2, False]], [[3, 64, 64, 2, False]], [[3, 64, 128, 2, False]],
            [[5, 128, 256, 2, True]]]),
        "clip": lambda: t.CLIPConfig(vision_config={k: v for k, v in VIT.items() if k != "num_labels"}, num_labels=3,
                                     text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=4)),
        "vit": lambda: t.ViTConfig(**VIT),
        "swin": lambda: t.SwinConfig(**SWIN),
        "swinv2": lambda: t.Swinv2Config(**SWIN),
        "beit": lambda: t.BeitConfig(**VIT, use_relative_position_bias=True),
        "data2vec-vision": lambda: t.Data2VecVisionConfig(**VIT, use_relative_position_bias=True),
        "hiera": lambda: t.HieraConfig(embed_dim=16, image_size=[32, 32], patch_size=[3, 3], patch_stride=[2, 2],
                                       patch_padding=[1, 1], depths=[1, 1], num_heads=[2, 4], masked_unit_size=[4, 4],
                                       query_stride=[2, 2], num_query_pool=1, mlp_ratio=2.0, num_labels=3),
        "mobilevit": lambda: t.MobileViTConfig(image_size=32, patch_size=2, hidden_sizes=[16, 24, 32], num_labels=3,
                                               neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2),
        "imagegpt": lambda: t.ImageGPTConfig(vocab_size=17, n_positions=64, n_embd=32, n_layer=1, n_head=4, num_labels=3),
        "siglip2": lambda: t.Siglip2Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                              num_attention_heads=4, patch_size=8, num_patches=16),
                                           text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                            num_hidden_layers=1, num_attention_heads=4), num_labels=3),
    }
    config = configs[family]()
    for key, value in extra.items():
        setattr(config, key, value)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as classes

    name = classes[config.model_type]
    torch.manual_seed(0)
    return getattr(transformers, name if isinstance(name, str) else name[0])(config).eval()


def _saved(tmp_path, family: str, **extra) -> str:
    folder = tmp_path / family
    _build(family, **extra).save_pretrained(folder)
    return f"hf:{folder}"


def _load(ref: str, size: int = 32):
    from compressor.models.loading import load_model

    return load_model(ref, ModelConfig(num_classes=3, input_shape=[3, size, size]))


@pytest.mark.parametrize("family", ["resnet", "pp_lcnet", "clip"])
def test_image_classifiers_are_recognised_by_their_class_not_by_config_fields(tmp_path, family):
    """ResNet's and PP-LCNet's configs have no image_size, CLIP keeps num_channels in its vision_config: each loaded
    as a sequence classifier before; PP-LCNet's output carries its class scores as last_hidden_state."""
    model = _load(_saved(tmp_path, family))
    with torch.no_grad():
        assert model(X).shape == (2, 3)


@pytest.mark.parametrize("family", ["resnet", "convnext", "swin", "vit"])
def test_vision_families_compress_with_heads_and_parity(tmp_path, family):
    """compress hf:DIR with prune.attention.heads at macs 0.7: the ONNX matches, and where the config cannot describe
    the pruned shapes the run says why instead of raising (ConvNeXt and ResNet raised NotImplementedError from
    get_input_embeddings while saving; ResNet loaded as a text model)."""
    from compressor.app.pipeline import compress

    ref = _saved(tmp_path, family)
    recipe = recipe_from_dict(tiny_recipe(
        model={"arch": ref, "num_classes": 3, "in_channels": 3, "input_shape": [3, 32, 32]},
        data={"batch_size": 8, "synthetic": {"train_size": 16, "val_size": 8}},
        prune={"method": "oneshot", "target": {"macs": 0.7}, "attention": {"heads": True}},
        finetune={"epochs": 0}, verify={"samples": 8}, bench={"backends": []}))
    report = compress(ref, recipe, tmp_path / "run")
    assert report["status"] == "ok"
    assert report["parity"]["onnx"]["max_abs_diff"] < 1e-4 and not report["parity"]["onnx"].get("same_output_for_all")
    assert report["compressed"]["macs"] / report["dense"]["macs"] == pytest.approx(0.7, abs=0.03)
    saved = report["exports"]["hf_pretrained"]
    assert not saved["written"] and ("after pruning" in saved["reason"] or "heads were pruned" in saved["reason"])


@pytest.mark.parametrize("family", ["swin", "swinv2", "beit", "data2vec-vision", "mobilevit", "hiera"])
def test_per_head_position_biases_go_with_their_heads(family):
    """Zeroing a head's q, k, v rows and removing it give the same function, with the relative position bias
    tables (Swin, BEiT's beside its attention, Data2Vec-Vision), Swin v2's logit scale and bias MLP rows and Hiera's
    inner width following the heads (MobileViT: Data2Vec-Vision's layout without a table) (random tables: a column kept for the wrong head changes the output); a fresh
    model conformed to the pruned state dict (the slim reload) computes the same. Each raised after removal before."""
    from compressor.models.slim import conform_to_state_dict

    model = _build(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "logit_scale" in name:
                p.copy_(torch.randn_like(p))
    site = max(H.head_sites(model), key=lambda s: s.num_heads)
    drop = site.num_heads - 1
    with torch.no_grad():
        for sl, heads in site.slices(out_only=True):
            rows = [i for i, h in zip(sl.idxs, heads) if h == drop]
            sl.param.index_fill_(sl.dim, torch.tensor(rows), 0.0)
        masked = model(pixel_values=X).logits
        H.remove_heads(model, H.head_root(site.name), [drop])
        pruned = model(pixel_values=X).logits
    assert H.head_counts(model)[H.head_root(site.name)] == drop
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-6)
    fresh = _build(family)
    conform_to_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=X).logits, pruned)


def test_heads_removed_by_name_take_the_position_bias_beside_them():
    """remove_heads on a model nothing has scanned yet (a copy, a resumed run) still finds BEiT's bias table in the
    layer beside the attention (it was left with every column, and the forward failed)."""
    model = _build("beit")
    H.remove_heads(model, "beit.layers.1.attention:heads", [0, 2])
    assert model.beit.layers[1].relative_position_bias.relative_position_bias_table.shape[1] == 2
    with torch.no_grad():
        assert model(pixel_values=X).logits.shape == (2, 3)


def test_a_relative_position_bias_shared_by_the_layers_keeps_every_head():
    """BEiT with use_shared_relative_position_bias: one table for every layer, so no layer may lose a head alone."""
    model = _build("beit", use_relative_position_bias=False, use_shared_relative_position_bias=True)
    assert H.head_sites(model) == []
    reasons = H.unsupported_sites(model)
    assert len(reasons) == 2 and all("shared by the layers (beit.shared_position_bias)" in r for r in reasons.values())


@pytest.mark.parametrize("family, message", [
    ("imagegpt", "ImageGPTForImageClassification takes input_ids, .* not pixel_values"),
    ("siglip2", r"Siglip2ForImageClassification does not run on one image of model.input_shape \[3, 32, 32\]")])
def test_image_models_that_need_other_inputs_are_refused_before_training(tmp_path, family, message):
    from compressor.app.pipeline import compress

    ref = _saved(tmp_path, family)
    with pytest.raises(ModelLoadError, match=message) as caught:
        compress(ref, recipe_from_dict(tiny_recipe(
            model={"arch": ref, "num_classes": 3, "in_channels": 3, "input_shape": [3, 32, 32]},
            prune={"method": "oneshot", "target": {"macs": 0.7}, "attention": {"heads": True}})), tmp_path / "run")
    assert caught.value.exit_code == 2 and not (tmp_path / "run" / "report.json").exists()


def test_inspect_without_a_recipe_reads_the_models_own_labels_and_input(tmp_path):
    """It refused a 3-label model before (model.num_classes defaulted to 10)."""
    from compressor.app.inspection import inspect_checkpoint

    report = inspect_checkpoint(_saved(tmp_path, "vit"), None)
    assert report.num_classes == 3 and report.input_shape == [3, 32, 32]
    assert {name: info["heads"] for name, info in report.heads.items()} == {
        "model.vit.layers.0.attention": 4, "model.vit.layers.1.attention": 4}
