"""Decoder LMs deployed with their key/value cache (issue 34): export (onnxruntime-genai's model builder, or
torch.onnx for per-layer widths), cached-decode parity against PyTorch at two prompt lengths, weight-only int4/int8
quantization, and the torch-free prefill / decode tokens-per-second bench. Tiny random-init Llama and Qwen2 with
grouped-query attention (4 query heads in 2 key/value groups) and a word-level tokenizer built offline."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from compressor.deploy.lm_session import EXPORTER_KEY, KV_SHAPES_KEY, LMSession
from compressor.errors import ExportError, ModelLoadError, ParityError, RecipeError, UsageError
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

from compressor.deploy.lm_bench import bench_lms  # noqa: E402
from compressor.deploy.lm_export import choose_method, export_causal_lm, verify_kv_parity  # noqa: E402

VOCAB = 256  # != the MLP width (96): the model builder takes any Linear as wide as the vocabulary for the LM head
LENGTHS = (5, 19)
try:
    import onnxruntime_genai  # noqa: F401
    GENAI = True
except ImportError:
    GENAI = False


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", eos_token="w1")


def _model(family: str, layers: int = 2):
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = transformers.LlamaConfig(**shape) if family == "llama" else transformers.Qwen2Config(**shape)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-hf")
    _model("llama").save_pretrained(str(folder))
    _tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def llama_export(llama_dir, tmp_path_factory):
    return export_causal_lm(llama_dir, tmp_path_factory.mktemp("llama-onnx"), quantize="int4")


@pytest.fixture(scope="module")
def depth_pruned():
    """The tiny Llama with its second layer removed: layer indices and config.num_hidden_layers fixed by hand."""
    model = _model("llama")
    del model.model.layers[1]
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = 1
    return model


@pytest.fixture(scope="module")
def depth_export(depth_pruned, tmp_path_factory):
    return export_causal_lm(depth_pruned, tmp_path_factory.mktemp("depth-onnx"), tokenizer=_tokenizer())


def _graph(path):
    return onnx.load(str(path), load_external_data=False)


def test_llama_gqa_exports_with_cache_and_matches_pytorch(llama_dir, llama_export):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    graph = _graph(llama_export.fp32_path)
    inputs = [i.name for i in graph.graph.input]
    assert inputs[:2] == ["input_ids", "attention_mask"]
    assert sorted(inputs[2:]) == sorted(f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value"))
    assert [o.name for o in graph.graph.output][0] == "logits"
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta[KV_SHAPES_KEY]) == [[2, 16], [2, 16]]  # 2 key/value groups of head dim 64 / 4
    if GENAI:  # the builder's graph: attention as onnxruntime's fused GroupQueryAttention
        assert llama_export.method == "genai" and meta[EXPORTER_KEY].startswith("onnxruntime-genai")
        assert sum(n.op_type == "GroupQueryAttention" for n in graph.graph.node) == 2
    result = verify_kv_parity(model, llama_export.fp32_path, prompt_lengths=LENGTHS, steps=4)
    assert result["passed"] and result["max_abs_diff"] < 1e-4 and result["same_greedy_tokens"]
    assert [r["prompt_length"] for r in result["per_length"]] == list(LENGTHS)
    assert result["relative_diff"] == pytest.approx(result["max_abs_diff"] / result["max_abs_reference"])


def test_qwen2_exports_from_memory_and_matches_pytorch(tmp_path):
    model = _model("qwen2")
    exported = export_causal_lm(model, tmp_path, tokenizer=_tokenizer())
    assert exported.kv_shapes == [(2, 16), (2, 16)]
    assert exported.method == ("genai" if GENAI else "torch")
    result = verify_kv_parity(model, exported.path, prompt_lengths=LENGTHS, steps=3)
    assert result["passed"] and result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0


def test_planted_bad_weight_fails_parity(llama_dir, llama_export, tmp_path):
    """One LM-head weight set to 1.0 (the others are ~0.02): its token's logit moves by about the hidden state's
    size, far beyond rtol 1e-3 of the logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    graph = onnx.load(str(llama_export.fp32_path))  # with its external data
    gathered = {i for n in graph.graph.node if n.op_type == "Gather" for i in n.input}  # the embedding table
    weight = next(t for t in graph.graph.initializer if VOCAB in t.dims and t.name not in gathered)
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[7] = 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(graph, str(bad))
    with pytest.raises(ParityError, match="disagrees with the PyTorch model when decoding with its key/value cache"):
        verify_kv_parity(model, bad, prompt_lengths=LENGTHS)


def test_depth_pruned_model_exports_and_matches(depth_pruned, depth_export):
    assert depth_export.kv_shapes == [(2, 16)]
    assert LMSession.open(depth_export.path).layers == 1
    result = verify_kv_parity(depth_pruned, depth_export.path, prompt_lengths=LENGTHS)
    assert result["passed"] and result["max_abs_diff"] < 1e-4


def test_layer_removed_without_fixing_the_config_is_a_clear_error(tmp_path):
    model = _model("llama")
    del model.model.layers[1]
    with pytest.raises(ExportError, match="num_hidden_layers=2, but its forward fills a key/value cache for 1"):
        export_causal_lm(model, tmp_path, method="torch")


def test_per_layer_widths_export_through_torch_and_match(tmp_path):
    """Layer 1 keeps 1 of its 2 key/value groups (its 4 query heads now share it) and 48 of 96 MLP channels: the
    config no longer describes the model, so the model builder can not take it and torch.onnx does."""
    model = _model("llama")
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    with torch.no_grad():
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight = torch.nn.Parameter(proj.weight[:16].clone())
            proj.out_features = 16
        attn.num_key_value_groups = 4
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight = torch.nn.Parameter(proj.weight[:48].clone())
            proj.out_features = 48
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, :48].clone())
        mlp.down_proj.in_features = 48
    method, note = choose_method(model, "auto", tokenizer=True)
    assert method == "torch" and "per-layer widths" in note
    with pytest.raises(RecipeError, match="per-layer widths"):
        choose_method(model, "genai", tokenizer=True)
    exported = export_causal_lm(model, tmp_path, tokenizer=_tokenizer())
    assert exported.method == "torch" and exported.kv_shapes == [(2, 16), (1, 16)]
    result = verify_kv_parity(model, exported.path, prompt_lengths=LENGTHS)
    assert result["passed"] and result["max_abs_diff"] < 1e-4


def test_int4_and_int8_weight_only_quantization(llama_dir, llama_export, tmp_path):
    """Tolerances: the tiny model's random Gaussian weights have no structure that 4 bits keep, so 4-bit blocks of
    32 (symmetric) err by ~10% of each weight's spread and the logits by ~13% of their largest value (measured);
    rtol 0.3 leaves room for that and still fails a broken graph (a wrong weight or cache moves the logits by
    about their own size). 8 bits err ~1% (rtol 0.05). Both must also miss the float tolerance: quantized for real."""
    from compressor.deploy.lm_export import quantize_weights

    model = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    assert llama_export.path.name == "model.int4.onnx" and llama_export.quantize == "int4"
    graph = _graph(llama_export.path)
    weights = {t.name for t in graph.graph.initializer}
    quantized = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    # per layer q/k/v (one fused MatMul in the builder's graph), o, gate, up, down; and the LM head
    assert len(quantized) == (5 if llama_export.method == "genai" else 7) * 2 + 1
    assert not [n.name for n in graph.graph.node if n.op_type == "MatMul" and weights & set(n.input)]
    int4 = verify_kv_parity(model, llama_export.path, prompt_lengths=LENGTHS, rtol=0.3)
    assert int4["passed"] and 1e-3 < int4["relative_diff"] < 0.3
    int8_path = quantize_weights(llama_export.fp32_path, tmp_path / "model.int8.onnx", 8)
    int8 = verify_kv_parity(model, int8_path, prompt_lengths=LENGTHS, rtol=0.05)
    assert int8["passed"] and 1e-4 < int8["relative_diff"] < int4["relative_diff"]
    with pytest.raises(ParityError):
        verify_kv_parity(model, llama_export.path, prompt_lengths=LENGTHS)  # the float tolerance
    with pytest.raises(RecipeError, match="4 or 8 bits"):
        quantize_weights(llama_export.fp32_path, tmp_path / "x.onnx", 3)


def test_bench_reports_prefill_and_decode_speed_of_two_models(llama_export, depth_export):
    report = bench_lms([llama_export.fp32_path, depth_export.path], prompt_tokens=16, new_tokens=8,
                       warmup_ms=10, min_runs=3, min_seconds=0.05)
    dense, pruned = report["results"]
    assert report["config"]["interleaved"] and report["config"]["prompt_tokens"] == 16
    for r in (dense, pruned):
        assert r["prefill_ms"] > 0 and r["decode_tokens_per_second"] > 0 and r["decode"]["count"] >= 3
        assert r["decode_ms_per_token"] == pytest.approx(1e3 / r["decode_tokens_per_second"])
    assert dense["prefill_speedup"] == 1.0 and dense["decode_speedup"] == 1.0
    assert pruned["decode_speedup"] == pytest.approx(pruned["decode_tokens_per_second"] /
                                                     dense["decode_tokens_per_second"])
    assert (dense["layers"], pruned["layers"]) == (2, 1)
    with pytest.raises(UsageError, match="at least 1"):
        bench_lms([depth_export.path], prompt_tokens=0)


def test_bench_imports_no_torch():
    code = "import sys, compressor.deploy.lm_bench; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_graph_without_a_cache_is_rejected(tmp_path, depth_export):
    graph = _graph(depth_export.path)
    del graph.metadata_props[:]
    plain = tmp_path / "model.onnx"
    onnx.save(graph, str(plain))
    for name in (f"{depth_export.path.name}.data",):  # the builder keeps weights beside the graph
        if (depth_export.path.parent / name).exists():
            shutil.copy(depth_export.path.parent / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="compressor.kv_shapes"):
        LMSession.open(plain)


def test_a_head_width_the_gqa_kernel_refuses_exports_through_torch(tmp_path):
    """ONNX Runtime's GroupQueryAttention (the model builder's attention) needs head widths in multiples of 16: a
    head of 8 would build and then fail at its first run, so auto takes torch.onnx and says why, and parity holds."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    method, note = choose_method(model, "auto", tokenizer=True)
    assert method == "torch" and "head width 8 is not a multiple of 16" in note
    with pytest.raises(RecipeError, match="multiple of 16"):
        choose_method(model, "genai", tokenizer=True)
    exported = export_causal_lm(model, tmp_path, tokenizer=_tokenizer())
    assert exported.method == "torch"
    assert verify_kv_parity(model, exported.path, prompt_lengths=LENGTHS)["passed"]
