"""prune.attention.embed: the embedding width (the residual stream) of Hugging Face transformers as one more
structure, planned by its MACs, removed from every tensor that runs along it, refused where q/k/v follow it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.app.recipe import recipe_from_dict
from compressor.errors import RecipeError
from compressor.prune import heads as H
from compressor.prune.op_count import snapshot_macs
from compressor.prune.removal import remove
from compressor.prune.snapshot import Candidate, Snapshot, snapshot
from compressor.prune.importance import ImportanceConfig, build_scorer, channel_slices
from tests.conftest import tiny_recipe
from tests.helpers_models import (tiny_hf_bert, tiny_hf_deit, tiny_hf_distilbert, tiny_hf_roberta, tiny_hf_vit,
                                  tiny_timm_vit, tiny_vit4)

TEXT = {"bert": tiny_hf_bert, "distilbert": tiny_hf_distilbert, "roberta": tiny_hf_roberta}
IMAGE = {"vit": tiny_hf_vit, "deit": tiny_hf_deit}


def _build(family: str) -> tuple[nn.Module, torch.Tensor, int]:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family in TEXT:
        return TEXT[family]().eval(), torch.randint(5, 100, (1, 12), generator=torch.Generator().manual_seed(1)), 3
    return IMAGE[family]().eval(), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), 10


def _residual(snap: Snapshot) -> Candidate:
    found = [c for c in snap.candidates if not H.is_head_root(c.root)
             and any(m[0].endswith(("query", "q_lin", "q_proj")) and m[1] == "in" for m in c.members)]
    assert len(found) == 1, [c.root for c in snap.candidates]
    return found[0]


def _residual_widths(model: nn.Module) -> set[int]:
    """Every width that runs along the residual stream: embeddings, LayerNorms, q/k/v inputs, output projections'
    and MLP outputs, MLP and classifier inputs (the classifier's output and the MLP hidden width excluded)."""
    widths = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            widths.add(module.embedding_dim)
        elif isinstance(module, nn.LayerNorm):
            widths.add(module.normalized_shape[0])
        elif isinstance(module, nn.Linear) and name.endswith(("query", "key", "value", "q_lin", "k_lin", "v_lin",
                                                              "q_proj", "k_proj", "v_proj", "intermediate.dense",
                                                              "lin1", "fc1")):
            widths.add(module.in_features)
        elif isinstance(module, nn.Linear) and name.endswith(("attention.output.dense", "out_lin", "o_proj",
                                                              "lin2", "fc2")):
            widths.add(module.out_features)
    return widths


@pytest.mark.parametrize("family", sorted(TEXT) + sorted(IMAGE))
def test_the_residual_stream_is_one_structure_removed_from_every_tensor_along_it(family):
    model, x, classes = _build(family)
    snap = snapshot(model, x, [], build_scorer(ImportanceConfig()), heads=True, embed=True)
    residual = _residual(snap)
    assert residual.width == 32
    sides = {(m[0].rsplit(".", 1)[-1], m[1]) for m in residual.members}
    assert {("query", "in"), ("q_lin", "in"), ("q_proj", "in")} & sides  # q/k/v read it, the output writes it
    assert {("dense", "out"), ("out_lin", "out"), ("o_proj", "out")} & sides
    plan = {residual.root: list(range(0, 32, 4))}  # 8 of 32 channels
    predicted = snap.macs_after(plan)
    remove(model, x, plan)
    assert _residual_widths(model) == {24}
    assert set(H.head_counts(model).values()) == {4}  # the heads stay: their width is not the embedding's
    actual = snapshot_macs(model, x)[0]
    assert predicted == pytest.approx(actual, rel=0.02)  # an upper bound: norms and embeddings are not modelled
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, classes) and torch.isfinite(out).all()


def test_the_attention_layers_slices_are_part_of_the_structure():
    """DPM decays a structure's slices: for the residual stream those include each attention layer's q/k/v input
    columns and its output rows (and BERT's LayerNorm inside the layer), not only the layers outside it."""
    model, x, _ = _build("bert")
    attention = model.model.bert.encoder.layer[0].attention
    pairs = channel_slices(attention, _Handler("prune_out_channels"), [1, 5], [1, 5], out_only=False)
    got = {(id(sl.param), sl.dim, sl.output) for sl, _ in pairs}
    own = attention.self
    assert {(id(own.query.weight), 1, False), (id(own.key.weight), 1, False), (id(own.value.weight), 1, False),
            (id(attention.output.dense.weight), 0, True), (id(attention.output.dense.bias), 0, True),
            (id(attention.output.LayerNorm.weight), 0, True)} <= got
    assert all(sl.idxs == [1, 5] for sl, _ in pairs)


class _Handler:
    def __init__(self, name: str) -> None:
        self.__name__ = name


@pytest.mark.parametrize("build,layer", [(tiny_vit4, "encoder.layers.encoder_layer_0.self_attention"),
                                         (tiny_timm_vit, "blocks.0.attn")], ids=["torchvision", "timm"])
def test_attention_whose_qkv_width_follows_the_embedding_refuses_it(build, layer):
    if build is tiny_timm_vit:
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build().eval()
    with pytest.raises(RecipeError) as caught:
        snapshot(model, torch.randn(1, 3, 32, 32), [], build_scorer(ImportanceConfig()), embed=True)
    assert f"prune.attention.embed: attention layer {layer}" in str(caught.value)
    assert "prune.attention.embed: false" in caught.value.hint
    snapshot(model, torch.randn(1, 3, 32, 32), [], build_scorer(ImportanceConfig()))  # off: fine


def test_without_embed_the_residual_stream_stays():
    model, x, classes = _build("bert")
    snap = snapshot(model, x, [], build_scorer(ImportanceConfig()), heads=True)
    assert not [c for c in snap.candidates if any(m[0].endswith("query") and m[1] == "in" for m in c.members)]
    assert recipe_from_dict(tiny_recipe(prune={"attention": {"embed": True}})).prune.attention.embed


def test_compress_refuses_embed_before_training_naming_the_layer(tmp_path):
    import yaml

    from tests.conftest import invoke_cli

    recipe = tiny_recipe(model={"arch": "python:tests.helpers_models:tiny_vit4", "num_classes": 4, "in_channels": 3,
                                "input_shape": [3, 32, 32]},
                         prune={"method": "oneshot", "target": {"macs": 0.6},
                                "attention": {"heads": True, "embed": True}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = invoke_cli("compress", "python:tests.helpers_models:tiny_vit4", "--recipe", str(path),
                        "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert "prune.attention.embed: attention layer encoder.layers.encoder_layer_0.self_attention" in message
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "model.onnx").exists()
