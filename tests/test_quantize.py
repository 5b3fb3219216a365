"""export.quantize: int8 settings from the machine, layer names, QDQ placement, exclusion, precision-aware parity
(a planted bad scale fails with exit 1), fp16, the auto exclusion loop, and compress / export end to end."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compressor.app.quantization import quantize_model, verify_quantized
from compressor.app.recipe import recipe_from_dict
from compressor.deploy.config import OnnxConfig
from compressor.deploy.export import export_onnx
from compressor.deploy.quantize import (Int8Quantizer, int8_settings, module_name, qdq_summary, resolve_exclude,
                                        weight_nodes)
from compressor.errors import ParityError, RecipeError
from tests.conftest import invoke_cli, tiny_recipe


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    work = tmp_path_factory.mktemp("quant")
    model = cnn()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so the folded weights are real
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 1, 16, 16)
    export_onnx(model, x, work / "model.onnx", OnnxConfig())
    g = torch.Generator().manual_seed(1)
    calibration = torch.randn(96, 1, 16, 16, generator=g).numpy()
    samples = torch.randn(128, 1, 16, 16, generator=g)
    with torch.no_grad():
        reference = model(samples).numpy()
    return {"model": model, "path": work / "model.onnx", "work": work, "calibration": calibration,
            "samples": samples.numpy(), "reference": reference}


def recipe(**quantize):
    return recipe_from_dict(tiny_recipe(export={"quantize": quantize}, gates={"max_accuracy_drop": 1.0}))


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("flags, machine, gpu, act, reduce", [
    ({"avx2", "fma"}, "x86_64", False, "uint8", True),           # AVX2 without VNNI: 7-bit weights
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False, "uint8", False),
    ({"avx2", "avx_vnni"}, "x86_64", False, "uint8", False),
    ({"asimd"}, "aarch64", False, "int8", False),                 # ARM: symmetric int8
    ({"avx2"}, "x86_64", True, "int8", False),                    # TensorRT target: symmetric, 8-bit
])
def test_int8_settings_follow_the_machine(flags, machine, gpu, act, reduce):
    s = int8_settings(flags=flags, machine=machine, gpu=gpu)
    assert (s.activations, s.reduce_range, s.symmetric_activations) == (act, reduce, act == "int8")
    assert s.reason


def test_int8_settings_as_the_recipe_asks():
    s = int8_settings("int8", False, flags={"avx2"}, machine="x86_64")
    assert (s.activations, s.reduce_range) == ("int8", False) and "as the recipe asks" in s.reason


@pytest.mark.parametrize("node, module", [("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"), ("/conv1/Conv", "conv1"),
                                          ("/fc/Gemm", "fc"), ("/features/features.3/Conv", "features.3"),
                                          ("Conv_12", "")])
def test_module_names_of_exported_nodes(node, module):
    assert module_name(node) == module


def test_exclude_names_resolve_or_fail_naming_the_entry():
    nodes = ["/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0/conv2/Conv", "/fc/Gemm"]
    assert resolve_exclude(["fc"], nodes) == ["/fc/Gemm"]
    assert resolve_exclude(["re:layer1\\..*"], nodes) == nodes[:2]
    assert resolve_exclude(["/fc/Gemm", "fc"], nodes) == ["/fc/Gemm"]
    with pytest.raises(RecipeError) as err:
        resolve_exclude(["layer9.conv"], nodes)
    assert err.value.exit_code == 2 and "'layer9.conv'" in err.value.render() and "layer1.0.conv1" in err.value.render()


def test_recipe_shorthands_and_auto_needs_a_gate():
    assert recipe_from_dict(tiny_recipe(export={"quantize": "int8"})).export.quantize.mode == "int8"
    auto = recipe_from_dict(tiny_recipe(export={"quantize": "auto"}, gates={"max_accuracy_drop": 0.5}))
    assert (auto.export.quantize.mode, auto.export.quantize.exclude) == ("int8", "auto")
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_recipe(export={"quantize": "auto"}))
    assert "gates.max_accuracy_drop" in err.value.render()
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_recipe(export={"quantize": {"mode": "int4"}}))
    assert "export.quantize.mode" in err.value.render()


# ---------------------------------------------------------------------------------------------- int8
def test_qdq_nodes_where_expected_and_none_in_excluded_layers(exported, tmp_path):
    nodes = weight_nodes(onnx.load(str(exported["path"])))
    assert len(nodes) == 4  # three convs and the classifier
    quantizer = Int8Quantizer(exported["path"], exported["calibration"])
    try:
        info = quantizer.quantize(tmp_path / "all.int8.onnx")
        assert sorted(info["quantized_layers"]) == sorted(nodes) and info["quantize_linear"] >= 4
        excluded = quantizer.quantize(tmp_path / "ex.int8.onnx", exclude=[nodes[0]])
    finally:
        quantizer.close()
    assert nodes[0] not in excluded["quantized_layers"] and excluded["float_layers"] == [nodes[0]]
    assert sorted(excluded["quantized_layers"]) == sorted(nodes[1:]) and not excluded["excluded_but_quantized"]
    # the excluded conv reads its float weight directly: no DequantizeLinear feeds it
    model = onnx.load(str(tmp_path / "ex.int8.onnx"))
    first = next(n for n in model.graph.node if n.name == nodes[0])
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert producers.get(first.input[1]) != "DequantizeLinear"
    assert qdq_summary(tmp_path / "ex.int8.onnx", [nodes[0]]) == {k: excluded[k] for k in qdq_summary(
        tmp_path / "ex.int8.onnx", [nodes[0]])}


def test_int8_passes_parity_and_a_planted_bad_scale_fails_with_exit_1(exported, tmp_path):
    r = recipe(mode="int8")
    path = tmp_path / "model.int8.onnx"
    quantizer = Int8Quantizer(exported["path"], exported["calibration"])
    try:
        quantizer.quantize(path)
    finally:
        quantizer.close()
    good = verify_quantized(exported["reference"], path, exported["samples"], r, "int8")
    assert good["passed"] and good["precision"] == "int8" and good["rtol"] == r.verify.int8_rtol
    assert good["relative_diff"] < 0.1 and good["top1_agreement"] >= 0.97
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and numpy_helper.to_array(inits[n.input[0]]).dtype == np.int8 and inits[n.input[0]].dims[0] == 32)
    scale = inits[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 40, scale.name))  # one layer's weights x40
    onnx.save(model, str(tmp_path / "bad.int8.onnx"))
    with pytest.raises(ParityError) as err:
        verify_quantized(exported["reference"], tmp_path / "bad.int8.onnx", exported["samples"], r, "int8")
    assert err.value.exit_code == 1 and "INT8 ONNX bad.int8.onnx" in err.value.render()


def test_fp16_runs_within_its_tolerance(exported, tmp_path):
    r = recipe(mode="fp16")
    result = quantize_model(exported["path"], r, calibration=None, reference=exported["reference"],
                            samples=exported["samples"], evaluate=lambda p: 50.0)
    assert result["path"] == str(exported["path"].with_name("model.fp16.onnx")) and result["mode"] == "fp16"
    assert result["parity"]["passed"] and result["parity"]["relative_diff"] < r.verify.fp16_rtol
    model = onnx.load(result["path"])
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out


def test_auto_excludes_the_most_harmful_layers_first_until_the_gate_holds(exported, monkeypatch):
    """evaluate() stands in for the validation set: top-1 rises with each layer kept in float."""
    r = recipe_from_dict(tiny_recipe(export={"quantize": "auto"}, gates={"max_accuracy_drop": 0.5}))
    seen = []

    def evaluate(path):
        floats = len(qdq_summary(path)["float_layers"])
        seen.append(floats)
        return {0: 90.0, 1: 91.0, 2: 92.6, 4: 93.0}.get(floats, 93.0)

    result = quantize_model(exported["path"], r, calibration=exported["calibration"],
                            reference=exported["reference"], samples=exported["samples"], evaluate=evaluate,
                            baseline_top1=93.0)
    assert seen == [0, 1, 2]  # 1, then 2 of the most harmful layers: the gate (0.5 pp) holds at 92.6
    assert [len(t["excluded"]) for t in result["auto_tries"]] == [0, 1, 2] and result["top1"] == 92.6
    ranking = [s["node"] for s in result["sensitivity"]]
    assert sorted(result["float_layers"]) == sorted(ranking[:2]) and len(ranking) == 4
    agreements = [(s["top1_agreement"], -s["relative_diff"]) for s in result["sensitivity"]]
    assert agreements == sorted(agreements)


# ---------------------------------------------------------------------------------------------- end to end
def test_compress_writes_a_verified_int8_model_timed_with_dense_and_pruned(tmp_path):
    from compressor.app.pipeline import compress

    r = recipe_from_dict(tiny_recipe(
        prune={"method": "oneshot", "target": {"macs": 0.6}}, finetune={"epochs": 1},
        export={"quantize": {"mode": "int8", "calibration": {"samples": 64}, "exclude": ["fc"]}},
        bench={"backends": ["ort-cpu"], "batch_sizes": [1, 4], "min_runs": 5, "min_seconds": 0.0, "warmup_ms": 0},
        # one epoch on noise leaves near-tied logits (max |output| 0.25), where int8 noise flips a few argmaxes
        verify={"int8_min_top1_agreement": 0.85}, gates={"max_accuracy_drop": 100.0}))
    report = compress("zoo:resnet20", r, tmp_path / "run")
    q = report["quantized"]
    assert (tmp_path / "run" / "model.int8.onnx").is_file() and q["path"].endswith("model.int8.onnx")
    assert q["float_layers"] == ["/fc/Gemm"] and q["settings"]["calibration_samples"] == 64
    assert report["parity"]["int8"]["passed"] and report["parity"]["int8"]["samples"] == 64
    assert 0.0 <= q["top1"] <= 100.0
    assert [row["batch_size"] for row in report["latency"]] == [1, 4]
    assert all(row["quantized_mode"] == "int8" and row["quantized_speedup"] > 0 for row in report["latency"])
    assert any(g["name"] == "max_accuracy_drop (int8 ONNX)" for g in report["gates"])
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Deployment: dense, pruned and pruned int8" in md and "pruned int8" in md
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["quantized"]["top1"] == q["top1"]


def test_export_cli_quantize_needs_a_recipe_and_writes_the_int8_file(tmp_path):
    from compressor.models.loading import load_model
    from compressor.models.slim import save_slim

    r = recipe_from_dict(tiny_recipe())
    save_slim(load_model("zoo:resnet20", r.model), tmp_path / "slim", r.model)
    bad = invoke_cli("export", tmp_path / "slim", "--quantize", "int8")
    assert bad.returncode == 2 and "--quantize needs --recipe" in bad.stdout + bad.stderr
    (tmp_path / "r.yaml").write_text(json.dumps(tiny_recipe()))
    typo = invoke_cli("export", tmp_path / "slim", "--recipe", tmp_path / "r.yaml", "--quantize", "int3")
    assert typo.returncode == 2 and "--quantize 'int3'" in typo.stdout + typo.stderr
    lm_only = invoke_cli("export", tmp_path / "slim", "--recipe", tmp_path / "r.yaml", "--quantize", "int4")
    assert lm_only.returncode == 2 and "int4 is weight-only 4-bit" in " ".join(lm_only.stderr.split())
    ok = invoke_cli("export", tmp_path / "slim", "--recipe", tmp_path / "r.yaml", "--quantize", "int8",
                    "--set", "export.quantize.calibration.samples=32", "--out", tmp_path / "m.onnx")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (tmp_path / "m.int8.onnx").is_file() and "m.int8.onnx (int8" in ok.stdout


# ---------------------------------------------------------------------------------------------- QAT
def test_fake_quant_matches_the_int8_grid_and_detaches_to_the_float_weights():
    from compressor.train import qat

    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = qat.attach(model, symmetric_inputs=False, reduce_range=False, per_channel=True, skip={"10"})
    assert state.modules == ["0", "3", "6"]  # the Linear "10" is kept in float
    w = model[0].weight  # the parametrized (fake-quantized) weight
    scale = before["0.weight"].abs().flatten(1).amax(1) / 127
    levels = w / scale[:, None, None, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 127 + 1e-4
    assert not torch.equal(w, before["0.weight"])
    model.train()
    model(torch.randn(8, 1, 16, 16))  # observers see a batch; the next forward quantizes the inputs
    hook = next(iter(model[3]._forward_pre_hooks.values()))
    assert hook.low is not None and hook.low <= 0.0 <= hook.high
    qat.detach(model, state)
    assert not hasattr(model[0], "parametrizations") and not model[3]._forward_pre_hooks
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.endswith("weight") and "0." in k[:2])


def test_reduce_range_fake_quantizes_to_seven_bits():
    from compressor.train.qat import WeightFakeQuant

    w = torch.randn(4, 3, 3, 3)
    q = WeightFakeQuant(63, per_channel=True)(w)
    scale = w.abs().flatten(1).amax(1) / 63
    assert (q / scale[:, None, None, None]).round().abs().max() == 63


@pytest.mark.parametrize("enabled, limit, ptq, expected", [
    ("auto", 1.0, 48.0, True),    # 2 pp lost, gate 1 pp: QAT
    ("auto", 1.0, 49.5, False),   # within the gate
    ("auto", None, 0.0, False),   # no gate: auto never runs QAT
    (True, None, 49.9, True),     # always
    (False, 1.0, 0.0, False),     # never
])
def test_qat_runs_when_post_training_int8_misses_the_gate(enabled, limit, ptq, expected):
    from compressor.app.quantization import needs_qat

    r = recipe_from_dict(tiny_recipe(export={"quantize": {"mode": "int8", "qat": {"enabled": enabled}}},
                                     gates={"max_accuracy_drop": limit}))
    assert needs_qat(r, {"top1": ptq}, 50.0) is expected


def test_qat_in_compress_makes_the_int8_file_from_the_qat_weights(tmp_path, monkeypatch):
    """QAT after post-training int8 (planted at 0% so the report's record is known): the int8 file is written
    from the QAT weights, with the layers post-training int8 kept in float (none here)."""
    from compressor.app import quantization
    from compressor.app.pipeline import compress

    real = quantization.quantize_model
    calls = []

    def first_misses(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(kwargs.get("exclude"))
        if len(calls) == 1:
            result["top1"] = 0.0  # as if post-training int8 had lost everything
        return result

    monkeypatch.setattr(quantization, "quantize_model", first_misses)
    r = recipe_from_dict(tiny_recipe(
        finetune={"epochs": 1}, export={"quantize": {"mode": "int8", "calibration": {"samples": 32},
                                                     "qat": {"enabled": True, "epochs": 1}}},
        bench={"backends": []}, verify={"int8_min_top1_agreement": 0.5}, gates={"max_accuracy_drop": 100.0}))
    report = compress("zoo:resnet20", r, tmp_path / "run")
    q = report["quantized"]
    assert len(calls) == 2 and calls[1] == [] and q["qat"]["post_training_top1"] == 0.0
    assert q["qat"]["epochs"] == 1 and q["qat"]["fake_quantized_layers"] == 22  # 21 convs + fc of ResNet-20
    assert q["path"].endswith("model.int8.onnx") and (tmp_path / "run" / "model.int8.onnx").is_file()
    assert report["parity"]["int8"]["passed"] and q["top1"] != 0.0  # the QAT model's own evaluation
    assert "Quantization-aware fine-tuning: post-training int8 gave top-1 0.00%" in (tmp_path / "run" / "report.md").read_text()


def test_parity_says_when_every_sample_predicts_one_class():
    from compressor.deploy.verify import check, compare_outputs

    r = recipe(mode="int8")
    ref = np.tile(np.array([[3.0, 1.0, 0.0]]), (8, 1)) + np.linspace(0, 0.1, 8)[:, None]  # class 0 always wins
    result = check(compare_outputs(ref, ref + 0.01), r.verify, "INT8 ONNX m.onnx", precision="int8", atol=0.0,
                   rtol=0.25)
    assert result["passed"] and result["distinct_top1"] == 1 and "same class for all 8 samples" in result["note"]
    varied = np.eye(3)[[0, 1, 2, 0]] * 2.0
    assert "note" not in check(compare_outputs(varied, varied), r.verify, "x", precision="int8", atol=0.0, rtol=0.25)


@pytest.mark.ddp("qat")
def test_qat_under_torchrun_runs_on_the_main_process_alone(ddp):
    """compress under 2 DDP ranks (tests/ddp_worker.py's qat case, in the session's one torchrun launch): QAT runs
    after the DDP stages on rank 0 by itself, so no collective waits for the rank that has finished (it hung
    before `fit(..., alone=True)`)."""
    out, ranks = ddp
    assert [(r["rank"], r["exit"]) for r in ranks] == [(0, 0), (1, 0)]  # both ranks came back from compress
    report = json.loads((out / "run" / "report.json").read_text())
    assert report["quantized"]["qat"]["epochs"] == 1 and report["parity"]["int8"]["passed"]


def test_models_over_two_gigabytes_are_refused_with_the_reason(exported, tmp_path):
    import shutil

    big = tmp_path / "big.onnx"
    shutil.copy(exported["path"], big)
    (tmp_path / "big.onnx.data").write_bytes(b"\0")
    from compressor.errors import ExportError

    with pytest.raises(ExportError) as err:
        Int8Quantizer(big, exported["calibration"])
    assert "2 GB" in err.value.render() and "big.onnx.data" in err.value.render()
