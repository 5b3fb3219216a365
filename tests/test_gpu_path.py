"""The GPU path: what runs without a GPU (errors, static TensorRT check, build configuration), and GPU tests
that run only where an NVIDIA GPU, tensorrt and cuda-python are present."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from compressor.deploy import onnx_runtime
from compressor.deploy.bench import run_benchmark
from compressor.deploy.timing import make_runner
from compressor.errors import BackendUnavailable, ExportError
from compressor.deploy.export import export_onnx
from compressor.models.loading import build_arch, example_inputs
from compressor.app.recipe import recipe_from_dict, shipped_recipes, load_recipe
from compressor.deploy.config import OnnxConfig, VerifyConfig
from compressor.deploy.tensorrt_engine import engine_settings, parser_errors, settings_from_recipe
from compressor.deploy.tensorrt_runtime import tensorrt_missing
from compressor.deploy.trt_compat import check_model, check_onnx
from compressor.deploy.verify import check

from .conftest import REPO, invoke_cli, requires_fmnist, run_cli, tiny_recipe

NO_GPU = bool(tensorrt_missing())  # no GPU, tensorrt or cuda-python: the native TensorRT path cannot run


def _ort_provider(name: str) -> bool:
    """onnxruntime offers this provider and an NVIDIA GPU is present (onnxruntime-gpu lists CUDA without a GPU)."""
    import onnxruntime

    from compressor.deploy.tensorrt_runtime import nvidia_gpus

    return name in onnxruntime.get_available_providers() and bool(nvidia_gpus())


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    model = build_arch("zoo:resnet20", 4, 1).eval()
    export_onnx(model, torch.randn(1, 1, 16, 16), path, OnnxConfig())
    return path


# ---------------------------------------------------------------------------------------------- no GPU here
@pytest.mark.parametrize("backend, named", [("ort-cuda", "CUDAExecutionProvider"), ("ort-trt", "TensorrtExecutionProvider")])
def test_ort_gpu_backends_are_unavailable_with_a_clear_reason(tiny_onnx, backend, named):
    if _ort_provider(named):  # gated on the provider itself: onnxruntime-gpu without tensorrt still has CUDA
        pytest.skip(f"this machine runs {named}")
    with pytest.raises(BackendUnavailable) as info:
        make_runner(backend, tiny_onnx)
    assert info.value.exit_code == 3 and named in str(info.value) and "[gpu]" in str(info.value)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_native_tensorrt_is_unavailable_and_names_what_is_missing(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(BackendUnavailable) as info:
        make_runner("tensorrt", engine)
    assert "backend tensorrt needs" in str(info.value) and "NVIDIA GPU" in str(info.value)
    result = run_cli("bench", engine, "--backend", "tensorrt")
    assert result.returncode == 3 and "tensorrt" in result.stderr


def test_silent_cpu_fallback_is_never_reported_as_gpu(tiny_onnx, monkeypatch):
    """onnxruntime-gpu on a machine without a usable GPU lists CUDA but runs on the CPU: that must not count."""
    import onnxruntime

    real_session = onnxruntime.InferenceSession

    def cpu_only_session(path, sess_options=None, providers=None):
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", cpu_only_session)
    for backend in ("ort-cuda", "ort-trt"):
        with pytest.raises(BackendUnavailable, match="fell back to CPUExecutionProvider"):
            onnx_runtime.create_session(tiny_onnx, backend)
        with pytest.raises(BackendUnavailable):
            run_benchmark(tiny_onnx, backends=[backend], batch_sizes=[1], warmup_ms=0, min_runs=1, min_seconds=0,
                          threads=1)


def test_provider_options_carry_fp16_and_engine_cache(tmp_path):
    chain = onnx_runtime.provider_chain("ort-trt", fp16=True, cache_dir=tmp_path)
    name, options = chain[0]
    assert name == "TensorrtExecutionProvider" and options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] is True and options["trt_engine_cache_path"] == str(tmp_path)
    assert [c if isinstance(c, str) else c[0] for c in chain[1:]] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# ---------------------------------------------------------------------------------------------- static check
def _graph(node, opset=17):
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [inp], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.example", 1)])


def test_compatibility_flags_a_custom_domain_op_by_node_name():
    model = _graph(helper.make_node("FancyAct", ["x"], ["y"], name="head/fancy", domain="com.example"))
    report = check_model(model)
    assert not report.compatible
    [finding] = report.findings
    assert (finding.node, finding.op, finding.level) == ("head/fancy", "FancyAct", "unsupported")
    assert "plugin" in finding.reason


def test_compatibility_flags_restrictions_and_opset():
    resize = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")
    report = check_model(_graph(resize, opset=21))
    levels = {(f.node, f.level) for f in report.findings}
    assert ("up", "restricted") in levels and ("(model)", "restricted") in levels
    unique = check_model(_graph(helper.make_node("Unique", ["x"], ["y"], name="u")))
    assert unique.findings[0].level == "unsupported"


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_exports_a_tensorrt_compatible_onnx(name, tmp_path):
    recipe = load_recipe(name)
    model = build_arch(recipe.model.arch, recipe.model.num_classes, recipe.model.in_channels).eval()
    path = export_onnx(model, example_inputs(recipe.model), tmp_path / "m.onnx", recipe.export.onnx)["path"]
    report = check_onnx(path)
    assert report.compatible and not report.findings, report.findings
    assert report.ops.get("Conv", 0) > 0


def test_inspect_onnx_reports_compatibility(tmp_path):
    model = _graph(helper.make_node("FancyAct", ["x"], ["y"], name="head/fancy", domain="com.example"))
    onnx.save(model, tmp_path / "custom.onnx")
    result = invoke_cli("inspect", "--onnx", tmp_path / "custom.onnx", "--json", tmp_path / "c.json")
    assert result.returncode == 0, result.stderr
    assert "not compatible" in result.stdout and "head/fancy" in result.stdout


# ---------------------------------------------------------------------------------------------- build configuration
def test_engine_settings_profile_and_flags():
    s = engine_settings([3, 224, 224], [8, 1, 32], fp16=True, sparse=True, workspace_gb=2)
    assert s.min_shape == (1, 3, 224, 224) and s.opt_shape == (8, 3, 224, 224) and s.max_shape == (32, 3, 224, 224)
    assert s.flags == ("FP16", "SPARSE_WEIGHTS") and s.precision == "fp16" and s.workspace_bytes == 2 << 30
    int8 = engine_settings([1, 28, 28], [1], int8_calib=256)
    assert int8.flags == ("INT8",) and int8.precision == "int8" and int8.calib_samples == 256
    assert int8.min_shape == int8.opt_shape == int8.max_shape == (1, 1, 28, 28)
    assert engine_settings([1, 28, 28], [1, 8]).flags == () and engine_settings([1, 28, 28], [1, 8]).precision == "fp32"
    with pytest.raises(ExportError, match="batch sizes must be positive"):
        engine_settings([1, 28, 28], [0])


def test_settings_from_recipe_and_cli_overrides():
    recipe = recipe_from_dict(tiny_recipe(export={"tensorrt": {"enabled": "auto", "fp16": True, "int8": True,
                                                                "calib_samples": 64, "sparse": False}},
                                          bench={"batch_sizes": [1, 4, 16]}))
    s = settings_from_recipe(recipe)
    assert s.flags == ("FP16", "INT8") and s.calib_samples == 64 and s.max_shape == (16, 1, 16, 16)
    s = settings_from_recipe(recipe, fp16=False, int8_calib=0, sparse=True, batch_sizes=[2])
    assert s.flags == ("SPARSE_WEIGHTS",) and s.min_shape == (1, 1, 16, 16) and s.precision == "fp32"


@pytest.mark.parametrize("bench, samples", [([1, 8], 256), ([8, 32], 100), ([4], 5), ([2, 16, 64], 1000)])
def test_the_profile_covers_every_batch_verify_and_bench_use(bench, samples):
    """verify_engine infers in chunks of the profile's max and a remainder; bench times each bench batch size."""
    from compressor.deploy.tensorrt_engine import inference_batches, profile_covers

    s = engine_settings([1, 28, 28], bench)
    used = inference_batches(samples, s.max_shape[0])
    assert sum(used) == samples and max(used) == min(samples, max(bench))
    assert profile_covers(s, used) and profile_covers(s, bench)
    assert not profile_covers(s, [max(bench) + 1])


class FakeTrt:
    """The parts of the tensorrt module the pure build helpers read: TensorRT 10 has the precision flags,
    TensorRT 11 does not (its STRONGLY_TYPED flag stays, ignored)."""

    def __init__(self, version: str) -> None:
        import enum

        self.__version__ = version
        members = {"SPARSE_WEIGHTS": 3, **({"FP16": 0, "INT8": 1} if version.startswith("10") else {})}
        self.BuilderFlag = enum.Enum("BuilderFlag", members)
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})


@pytest.mark.parametrize("version", ["10.13.0", "11.0.0"])
def test_quantized_onnx_builds_strongly_typed_without_precision_flags(version):
    from compressor.deploy.tensorrt_engine import check_builder_flags, network_flags

    trt = FakeTrt(version)
    recipe = recipe_from_dict(tiny_recipe(export={"tensorrt": {"fp16": True, "int8": True, "calib_samples": 64},
                                                  "quantize": {"mode": "int8"}}))
    s = settings_from_recipe(recipe, quantized="int8")
    assert s.flags == () and s.strongly_typed and s.precision == "int8" and s.calib_samples == 0
    assert network_flags(trt, s) == 1 << 1
    check_builder_flags(trt, s)  # nothing to miss on either version
    legacy = settings_from_recipe(recipe)
    assert network_flags(trt, legacy) == 0 and legacy.flags == ("FP16", "INT8")
    if version.startswith("11"):
        with pytest.raises(ExportError) as err:
            check_builder_flags(trt, legacy)
        assert "no FP16, INT8 builder flag" in err.value.render() and "export.quantize.mode" in err.value.render()
    else:
        check_builder_flags(trt, legacy)


def test_parser_errors_name_nodes():
    error = SimpleNamespace(node_name=lambda: "layer3/conv", node_operator=lambda: "Conv", node=lambda: 7,
                            desc=lambda: "weights must be an initializer")
    parser = SimpleNamespace(num_errors=1, get_error=lambda i: error)
    assert parser_errors(parser) == ["node layer3/conv (Conv): weights must be an initializer"]


def test_parity_tolerance_depends_on_precision():
    cfg = VerifyConfig(atol=1e-4, fp16_atol=5e-2, int8_atol=0.5, min_top1_agreement=0.999, reduced_min_top1_agreement=0.99)
    metrics = {"max_abs_diff": 0.01, "mean_abs_diff": 0.001, "top1_agreement": 0.995, "samples": 200}
    assert check(metrics, cfg, "engine", precision="fp16")["atol"] == 5e-2
    with pytest.raises(Exception, match="allowed 0.0001"):
        check(metrics, cfg, "engine", precision="fp32")


# ---------------------------------------------------------------------------------------------- on a GPU
SAMPLE = REPO / "samples" / "resnet20-fmnist.safetensors"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs an NVIDIA GPU, tensorrt and cuda-python")
@requires_fmnist
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_for_the_sample_builds_matches_pytorch_and_benchmarks(tmp_path, precision):
    recipe = ["--recipe", "resnet20-fmnist-finetune", "--set", "data.val_subset=512"]
    fp16 = ["--fp16"] if precision == "fp16" else ["--no-fp16"]
    result = run_cli("export", SAMPLE, *recipe, "--format", "tensorrt", "--batch", "1,8,32", *fp16,
                     "--out", tmp_path / "sample.onnx")
    assert result.returncode == 0, result.stderr
    engine = tmp_path / "sample.engine"
    assert engine.is_file() and (tmp_path / "sample.build.log").is_file() and (tmp_path / "sample.layers.json").is_file()
    report = run_benchmark(engine, baseline=None, backends=["tensorrt"], batch_sizes=[1, 8], warmup_ms=200,
                           min_runs=20, min_seconds=0.5, threads=None)
    for row in report["results"]:
        assert row["model"]["latency"]["p50"] > 0 and row["model"]["gpu_compute"]["p50"] > 0
        assert row["model"]["gpu_compute"]["p50"] <= row["model"]["latency"]["p50"]


@pytest.mark.gpu
@pytest.mark.skipif(not _ort_provider("CUDAExecutionProvider"), reason="needs an NVIDIA GPU with onnxruntime-gpu")
def test_ort_cuda_really_runs_on_the_gpu(tiny_onnx):
    session = onnx_runtime.create_session(tiny_onnx, "ort-cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    out = session.run(None, {"input": np.zeros((2, 1, 16, 16), np.float32)})[0]
    assert out.shape == (2, 4)


def test_parity_tolerance_scales_with_the_output_magnitude():
    """Untrained torchvision models put out logits of 1e5 (ResNet-101) to 1e12 (Inception-v3): fp32 rounding then
    differs by more than any fixed atol, so the allowed diff is atol + rtol * max |PyTorch output|."""
    import numpy as np

    from compressor.errors import ParityError
    from compressor.deploy.config import VerifyConfig
    from compressor.deploy.verify import compare_outputs

    cfg = VerifyConfig(atol=1e-3, rtol=1e-6)
    reference = np.array([[9.6e11, -2.0e11], [1.0e11, 3.0e11]])
    close = check(compare_outputs(reference, reference + 3.7e4), cfg, "ONNX m.onnx")
    assert close["passed"] and close["allowed_abs_diff"] == pytest.approx(1e-3 + 9.6e5)
    assert close["max_abs_reference"] == pytest.approx(9.6e11)
    with pytest.raises(ParityError) as err:
        check(compare_outputs(reference, reference + 2e6), cfg, "ONNX m.onnx")
    assert "max abs diff 2e+06 (allowed 9.6e+05 = atol 0.001 + rtol 1e-06 x max |output| 9.6e+11)" in str(err.value)
    trained = np.array([[4.0, -1.0]])  # ordinary logits: the atol decides, as before
    with pytest.raises(ParityError):
        check(compare_outputs(trained, trained + 2e-3), cfg, "ONNX m.onnx")


def test_parity_says_when_it_proves_nothing():
    """Untrained torchvision ViTs have a zero-initialised head: every output is 0, any export 'matches'."""
    import numpy as np

    from compressor.deploy.config import VerifyConfig
    from compressor.deploy.verify import compare_outputs

    cfg = VerifyConfig()
    zeros = check(compare_outputs(np.zeros((4, 10)), np.zeros((4, 10))), cfg, "ONNX m.onnx")
    assert zeros["passed"] and zeros["relative_diff"] is None
    assert "same output for all 4 samples" in zeros["note"] and "can not tell" in zeros["note"]
    biased = np.tile(np.arange(10.0), (4, 1))  # a zero weight with a bias: different classes, same for every sample
    assert "note" in check(compare_outputs(biased, biased), cfg, "ONNX m.onnx")
    varied = np.array([[1e-14, -2e-14], [3e-14, 0.0]])  # tiny but input-dependent (untrained EfficientNet): informative
    result = check(compare_outputs(varied, varied + 3e-21), cfg, "ONNX m.onnx")
    assert "note" not in result and result["relative_diff"] == pytest.approx(1e-7, rel=1e-3)


# ---------------------------------------------------------------------------------------------- review fixes (no GPU)
def test_calibration_batches_never_come_out_empty():
    from compressor.deploy.tensorrt_engine import calibration_batches

    samples = np.zeros((20, 1, 4, 4), np.float32)
    assert [len(b) for b in calibration_batches(samples, 8)] == [8, 8]  # the 4 left over do not fill a batch
    assert [len(b) for b in calibration_batches(samples[:5], 8)] == [5]  # fewer than opt: one batch (was: none)
    assert calibration_batches(samples[:0], 8) == []


def test_a_calibration_cache_is_only_read_for_its_own_model_and_samples(tmp_path):
    from compressor.deploy.tensorrt_engine import calibration_cache_path

    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"model a")
    b.write_bytes(b"model b")
    samples = [np.ones((2, 3), np.float32)]
    engine = tmp_path / "model.engine"
    first = calibration_cache_path(engine, a, samples)
    assert first == calibration_cache_path(engine, a, [s.copy() for s in samples]) and first.parent == tmp_path
    assert first != calibration_cache_path(engine, b, samples)
    assert first != calibration_cache_path(engine, a, [samples[0] * 2])
    assert first.name.startswith("model.calib-") and first.suffix == ".cache"


def test_engine_parity_infers_within_the_profile(monkeypatch, tmp_path):
    """verify_engine inferred 256 samples at batch 32 against a profile whose max is 8 (every shipped recipe)."""
    from compressor.deploy import tensorrt_engine, tensorrt_runtime

    seen = []

    class FakeEngine:
        def __init__(self, path):
            pass

        def infer(self, inputs, batch_size=32):
            seen.append(batch_size)
            if batch_size > 8:
                raise RuntimeError("set_input_shape: batch outside the optimisation profile")
            return inputs.reshape(len(inputs), -1)[:, :4]

        def close(self):
            pass

    monkeypatch.setattr(tensorrt_runtime, "TrtEngine", FakeEngine)
    inputs = np.random.default_rng(0).standard_normal((40, 1, 2, 2)).astype(np.float32)
    result = tensorrt_engine.verify_engine(tmp_path / "m.engine", inputs.reshape(40, -1)[:, :4], inputs, VerifyConfig(),
                                           "fp16", max_batch=8)
    assert seen == [8] and result["passed"]


def test_both_onnxruntime_wheels_installed_is_named_with_the_fix(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(onnx_runtime, "installed", lambda name: name in ("onnxruntime", "onnxruntime-gpu"))
    with pytest.raises(BackendUnavailable, match="both onnxruntime and onnxruntime-gpu are installed") as info:
        onnx_runtime.require_provider("ort-cuda")
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in info.value.hint
    monkeypatch.setattr(onnx_runtime, "installed", lambda name: name == "onnxruntime")
    with pytest.raises(BackendUnavailable, match="offers only CPUExecutionProvider") as info:
        onnx_runtime.require_provider("ort-cuda")
    assert "[gpu]" in info.value.hint


def test_gpu_libraries_are_loaded_before_the_session(tiny_onnx, monkeypatch):
    import onnxruntime

    calls = []
    real_session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **k: calls.append("preload_dlls"), raising=False)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def session(path, sess_options=None, providers=None):
        calls.append("session")
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    with pytest.raises(BackendUnavailable):  # no GPU here: the session falls back and that is refused
        onnx_runtime.create_session(tiny_onnx, "ort-cuda")
    assert calls == ["preload_dlls", "session"]
    calls.clear()
    onnx_runtime.create_session(tiny_onnx, "ort-cpu")
    assert calls == ["session"]  # nothing to load for the CPU
