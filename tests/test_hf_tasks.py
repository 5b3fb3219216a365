"""Hugging Face models for the segmentation and detection tasks by hf:DIR (models/hf_segmentation.py, models/hf.py):
a SegFormer directory loads as a segmenter (logits upsampled to the input, class convolution protected, any export
size), compresses with its heads and MLP widths on the 64x64 scenes, and its hf/ save_pretrained folder reloads to
the pruned shapes where the config can describe them; detection transformers (RT-DETR) are refused with the reason.
Tiny randomly initialised models written with save_pretrained; two compress runs of one epoch."""
from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compressor.errors import ModelLoadError
from compressor.models.config import ModelConfig
from compressor.models.loading import load_model
from tests.conftest import FMNIST_DIR

transformers = pytest.importorskip("transformers")

CLASSES, SIZE = 11, 64  # the scenes: background + 10 Fashion-MNIST classes
# 4 stages of one block, 4 heads each (head widths 4 and 8), MLP ratio 2: heads and MLP widths both prune at 0.7
SEGFORMER = dict(num_channels=3, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[16, 32, 32, 32],
                 num_attention_heads=[4, 4, 4, 4], mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=32)
X = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _segformer(folder, num_labels: int = CLASSES) -> str:
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(**SEGFORMER,
                                                                                       num_labels=num_labels))
    model.save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="module")
def segformer(tmp_path_factory) -> str:
    return _segformer(tmp_path_factory.mktemp("hf") / "segformer")


def _load(ref: str, classes: int = CLASSES):
    return load_model(ref, ModelConfig(num_classes=classes, input_shape=[3, SIZE, SIZE]))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    pytest.importorskip("torchmetrics")
    from compressor.datasets.scenes import write_scenes

    out = tmp_path_factory.mktemp("scenes")
    write_scenes(out, train=8, val=4, size=SIZE, fmnist_root=FMNIST_DIR)
    return out


def _compress(ref: str, scenes, out, **prune):
    from compressor.app.pipeline import compress

    ignore = prune.pop("ignore", [])
    recipe = {"name": "hf-segformer", "task": "segmentation",
              "model": {"arch": ref, "num_classes": CLASSES, "input_shape": [3, SIZE, SIZE], "ignore": ignore},
              "data": {"kind": "masks", "root": str(scenes), "batch_size": 4},
              "prune": {"method": "oneshot", "target": {"macs": 0.7}, **prune},
              "finetune": {"epochs": 1, "optimizer": {"kind": "adamw", "lr": 0.001}}, "verify": {"samples": 4},
              "bench": {"backends": []}}
    return compress(ref, recipe=recipe, out_dir=out)


# ---------------------------------------------------------------------------------------------- loading
def test_a_segformer_directory_loads_as_a_segmenter(segformer):
    """Logits upsampled (bilinear) from transformers' own quarter-size logits to any input size; the decode head's
    classifier is protected; pickling and deepcopy work after transformers installed its hidden-state hooks."""
    from compressor.models.hf_segmentation import HFSegmenter
    from compressor.tasks.segmentation import Segmentation

    model = _load(segformer)
    assert isinstance(model, HFSegmenter) and model.dynamic_size
    with torch.no_grad():
        out = model(X)
        own = model.model(pixel_values=X).logits
        assert own.shape == (2, CLASSES, SIZE // 4, SIZE // 4)
        torch.testing.assert_close(out, F.interpolate(own, size=(SIZE, SIZE), mode="bilinear", align_corners=False))
        assert model(torch.rand(1, 3, 96, 80)).shape == (1, CLASSES, 96, 80)
    assert model.protected_modules() == ["model.decode_head.classifier"]
    assert Segmentation(CLASSES).protected(model) == ["model.decode_head.classifier"]
    assert model.training is False
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    pickled = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        for other in (copied, pickled, model):  # the original still runs (its hooks are installed again)
            torch.testing.assert_close(other(X), out)


def test_num_labels_must_match_the_recipe(segformer, tmp_path):
    with pytest.raises(ModelLoadError, match=r"model.num_classes is 4, the model's config.json has num_labels 11"):
        _load(segformer, classes=4)
    with pytest.raises(ModelLoadError, match=r"num_classes is 11, the model's config.json has num_labels 4"):
        _load(_segformer(tmp_path / "four", num_labels=4))


def test_detection_transformers_are_refused_with_the_reason(tmp_path):
    from compressor.models.hf import model_section

    backbone = transformers.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                               layer_type="basic", out_indices=[2, 3, 4])
    config = transformers.RTDetrConfig(backbone_config=backbone, d_model=32, encoder_hidden_dim=32, num_labels=10,
                                       encoder_in_channels=[32, 64, 128], decoder_in_channels=[32, 32, 32])
    config.architectures = ["RTDetrForObjectDetection"]
    config.save_pretrained(tmp_path / "rtdetr")  # config.json alone: the refusal comes before any weights load
    ref = f"hf:{tmp_path / 'rtdetr'}"
    with pytest.raises(ModelLoadError, match="RTDetrForObjectDetection is a detection transformer, which compressor "
                                             "does not compress yet: for RT-DETR") as caught:
        load_model(ref, ModelConfig(num_classes=10, input_shape=[3, SIZE, SIZE]))
    assert caught.value.exit_code == 2
    assert "frozen batch norms" in caught.value.message and "ultralytics:yolo11n.yaml" in caught.value.hint
    config.architectures = None
    config.save_pretrained(tmp_path / "bare")  # no architectures: its model_type has no classifier either
    with pytest.raises(ModelLoadError, match="rt_detr is a detection transformer"):
        model_section(str(tmp_path / "bare"))


# ---------------------------------------------------------------------------------------------- compress
def test_compress_prunes_heads_and_mlp_widths_and_exports_any_size(segformer, scenes, tmp_path):
    """oneshot to 0.7 of the MACs with prune.attention.heads: heads leave SegFormer's efficient self-attention (its
    reduction convolution reads the embedding, which keeps its width), the ONNX matches PyTorch at the recipe's
    size and at another one, the slim folder reloads, and the hf/ folder is not written because the config cannot
    hold per-layer head counts."""
    import onnxruntime as ort

    from compressor.models.hf_segmentation import HFSegmenter

    report = _compress(segformer, scenes, tmp_path / "run", attention={"heads": True})
    assert report["status"] == "ok"
    assert report["compressed"]["macs"] / report["dense"]["macs"] == pytest.approx(0.7, abs=0.02)
    parity = report["parity"]["onnx"]
    assert parity["passed"] and parity["max_abs_diff"] < 1e-5 and parity["top1_agreement"] == 1.0
    widths = json.loads((tmp_path / "run" / "slim.json").read_text())["widths"]
    heads = [v for k, v in widths.items() if k.endswith("attention:heads")]
    assert len(heads) == 4 and sum(heads) < 16 and min(heads) >= 1
    assert widths["model.decode_head.classifier"] == CLASSES
    saved = report["exports"]["hf_pretrained"]
    assert not saved["written"] and "attention heads were pruned" in saved["reason"]
    slim = load_model(tmp_path / "run", ModelConfig(num_classes=CLASSES, input_shape=[3, SIZE, SIZE]))
    assert isinstance(slim, HFSegmenter) and slim.protected_modules() == ["model.decode_head.classifier"]
    session = ort.InferenceSession(str(tmp_path / "run" / "model.onnx"), providers=["CPUExecutionProvider"])
    for x in (X, torch.rand(3, 3, 96, 80, generator=torch.Generator().manual_seed(2))):
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            want = slim.eval()(x).numpy()
        assert got.shape == want.shape == (x.shape[0], CLASSES, *x.shape[2:])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_hf_folder_reloads_with_from_pretrained_to_the_pruned_widths(segformer, scenes, tmp_path):
    """Heads kept, the decode head left whole (its four projections prune to different widths, one
    decoder_hidden_size cannot say so) and MLP widths rounded to 32 (the config takes whole MLP ratios): each
    stage's pruned MLP width goes into mlp_ratios, and from_pretrained rebuilds the compressed model exactly."""
    from compressor.models.hf_segmentation import HFSegmenter

    report = _compress(segformer, scenes, tmp_path / "run", round_to=32, ignore=["re:model\\.decode_head\\..*"])
    assert report["status"] == "ok" and report["parity"]["onnx"]["max_abs_diff"] < 1e-5
    saved = report["exports"]["hf_pretrained"]
    assert saved["written"] and saved["max_abs_diff"] < 1e-6
    widths = json.loads((tmp_path / "run" / "slim.json").read_text())["widths"]
    fc1 = [widths[f"model.segformer.stages.{i}.blocks.0.mlp.fc1"] for i in range(4)]
    assert fc1 != [32, 64, 64, 64]  # something was pruned, in whole multiples of 32
    config = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert config["mlp_ratios"] == [w // h for w, h in zip(fc1, SEGFORMER["hidden_sizes"])]
    reloaded = transformers.SegformerForSemanticSegmentation.from_pretrained(str(tmp_path / "run" / "hf")).eval()
    assert [reloaded.segformer.stages[i].blocks[0].mlp.fc1.out_features for i in range(4)] == fc1
    slim = load_model(tmp_path / "run", ModelConfig(num_classes=CLASSES, input_shape=[3, SIZE, SIZE])).eval()
    with torch.no_grad():
        torch.testing.assert_close(HFSegmenter(reloaded)(X), slim(X), rtol=0, atol=1e-6)
