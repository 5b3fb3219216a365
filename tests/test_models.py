"""Model references and checkpoint loading (compressor.models.loading)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compressor.errors import ModelLoadError
from compressor.models.loading import build_arch, example_inputs, load_model
from compressor.prune.op_count import snapshot_macs
from compressor.models.config import ModelConfig
from compressor.models.zoo import ZOO

REPO_ROOT = Path(__file__).resolve().parents[1]


def cfg(arch: str | None = "zoo:resnet20", num_classes: int = 10, in_channels: int = 1) -> ModelConfig:
    return ModelConfig(arch=arch, num_classes=num_classes, in_channels=in_channels, input_shape=[in_channels, 32, 32])


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return ZOO["resnet20"](num_classes=10, in_channels=1).eval()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_plain_state_dict_loads_equal_weights(model, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    assert_same_weights(load_model(path, cfg()), model)


def test_wrapped_state_dict_with_module_prefix(model, tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    assert_same_weights(load_model(str(path), cfg()), model)


def test_model_key_with_orig_mod_and_module_prefixes(model, tmp_path):
    path = tmp_path / "compiled.bin"
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}}, path)
    assert_same_weights(load_model(path, cfg()), model)


def test_plain_weights_preferred_over_ema(model, tmp_path):
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    path = tmp_path / "ema.pt"
    torch.save({"model_ema": ema, "state_dict": model.state_dict()}, path)
    assert_same_weights(load_model(path, cfg()), model)
    torch.save({"model_ema": model.state_dict(), "optimizer": {"lr": 0.1}}, path)
    assert_same_weights(load_model(path, cfg()), model)


def test_safetensors_loads(model, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert_same_weights(load_model(path, cfg()), model)


def test_pickled_module_needs_trust(model, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, cfg())
    assert "--trust-checkpoint" in str(info.value)
    assert "arbitrary code" in str(info.value)
    assert info.value.exit_code == 2
    loaded = load_model(path, cfg(arch=None), trust_checkpoint=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(model, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 1, 32, 32)), str(path))
    with pytest.raises(ModelLoadError, match="TorchScript") as info:
        load_model(path, cfg(), trust_checkpoint=True)
    assert "state_dict" in str(info.value)


def test_wrong_arch_names_missing_keys(model, tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, cfg(arch="zoo:resnet32"))
    message = str(info.value)
    assert "missing keys" in message
    assert "layer1.3.conv1.weight" in message
    assert "model.arch" in message


def test_num_classes_mismatch_names_shapes(model, tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, cfg(num_classes=100))
    message = str(info.value)
    assert "fc.weight: checkpoint (10, 64) vs model (100, 64)" in message
    assert "fc.bias: checkpoint (10,) vs model (100,)" in message
    assert "missing keys" not in message


def test_unexpected_keys_are_named(model, tmp_path):
    path = tmp_path / "extra.pt"
    torch.save({**model.state_dict(), "head.extra": torch.zeros(3)}, path)
    with pytest.raises(ModelLoadError, match=r"1 unexpected keys: head\.extra"):
        load_model(path, cfg())


def test_state_dict_without_arch(model, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"needs model\.arch in the recipe \(e\.g\. zoo:resnet20\)"):
        load_model(path, cfg(arch=None))


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(ModelLoadError) as info:
        load_model(path, cfg())
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_corrupt_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ModelLoadError) as info:
        load_model(path, cfg())
    assert str(path) in str(info.value)
    assert "not a PyTorch checkpoint" in str(info.value)


def test_other_object_types_are_named(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ModelLoadError, match="holds a list"):
        load_model(path, cfg())
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelLoadError, match=r"without a state dict \(keys: epoch, lr\)"):
        load_model(path, cfg())


def test_bare_zoo_reference_builds():
    model = load_model("zoo:resnet56", cfg(in_channels=3))
    assert sum(p.numel() for p in model.parameters()) == 855_770
    assert model.conv1.in_channels == 3 and model.fc.out_features == 10


def test_torchvision_reference_with_one_channel():
    model = load_model("torchvision:resnet18", cfg(num_classes=5, in_channels=1))
    assert model.conv1.in_channels == 1
    assert (model.conv1.out_channels, model.conv1.kernel_size, model.conv1.stride) == (64, (7, 7), (2, 2))
    assert model.fc.out_features == 5
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("zoo:resnet2", "did you mean resnet"),
        ("torchvision:resnet1", "did you mean resnet18?"),
        ("resnet20", "zoo:NAME, torchvision:NAME, timm:NAME, python:pkg.module:factory, hf:DIR or ultralytics:NAME.yaml"),
        ("tv:resnet18", "zoo:NAME, torchvision:NAME"),
        ("zoo:", "is not understood"),
    ],
)
def test_bad_references(ref, expected):
    with pytest.raises(ModelLoadError) as info:
        build_arch(ref, 10, 3)
    assert expected in str(info.value)
    assert info.value.exit_code == 2


def test_unknown_zoo_name_lists_known():
    with pytest.raises(ModelLoadError, match="known: mobilenetv2, resnet110, resnet20"):
        build_arch("zoo:resnet", 10, 3)


def test_timm_without_timm_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelLoadError, match=r"pip install -e '\.\[timm\]'"):
        load_model("timm:resnet18", cfg())


def test_python_reference(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    model = load_model("python:tests.helpers_models:tiny", cfg(num_classes=7, in_channels=2))
    assert model[0].in_channels == 2 and model[-1].out_features == 7
    assert isinstance(build_arch("python:tests.helpers_models:no_kwargs", 10, 3), nn.Linear)
    with pytest.raises(ModelLoadError, match="returned int, not a torch.nn.Module"):
        build_arch("python:tests.helpers_models:not_a_module", 10, 3)
    with pytest.raises(ModelLoadError, match="has no callable 'missing'"):
        build_arch("python:tests.helpers_models:missing", 10, 3)
    with pytest.raises(ModelLoadError, match="cannot import module 'no_such_pkg.models'"):
        build_arch("python:no_such_pkg.models:factory", 10, 3)


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn", "vgg19_bn", "mobilenetv2"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_zoo_models_forward(name, in_channels):
    model = build_arch(f"zoo:{name}", num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_resnet20_size_and_macs():
    model = build_arch("zoo:resnet20", 10, 3)
    macs, params = snapshot_macs(model, example_inputs(cfg(in_channels=3)))
    assert 0.26e6 < params < 0.29e6
    assert params == sum(p.numel() for p in model.parameters())
    assert 38e6 < macs < 45e6


def test_example_inputs_are_reproducible():
    first = example_inputs(cfg(in_channels=3), batch=4)
    assert first.shape == (4, 3, 32, 32)
    assert torch.equal(first, example_inputs(cfg(in_channels=3), batch=4))


def test_trusted_pickle_with_unimportable_class(tmp_path, monkeypatch):
    (tmp_path / "vanishing_models.py").write_text("from torch import nn\nclass Net(nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_models

    path = tmp_path / "whole.pt"
    torch.save(vanishing_models.Net(2, 2), path)
    (tmp_path / "vanishing_models.py").unlink()
    monkeypatch.delitem(sys.modules, "vanishing_models")
    with pytest.raises(ModelLoadError, match="could not be unpickled.*vanishing_models") as info:
        load_model(path, cfg(), trust_checkpoint=True)
    assert "must be importable" in str(info.value)
