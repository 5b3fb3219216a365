"""Exports that ONNX Runtime's transformer optimizer fuses into Attention, dense and with per-layer head counts
(deploy/attention_graph.py), and graphs the rewrite must leave alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compressor.deploy.attention_graph import explicit_heads, fusable_attention, noop_casts, scale_as_div
from compressor.deploy.config import OnnxConfig
from compressor.deploy.export import export_onnx
from compressor.deploy.ort_fusion import fused_operators
from compressor.prune import heads as H
from tests.helpers_models import tiny_hf_bert, tiny_hf_deit, tiny_hf_distilbert, tiny_hf_roberta, tiny_hf_vit

FAMILIES = {"bert": (tiny_hf_bert, "bert"), "distilbert": (tiny_hf_distilbert, "bert"),
            "roberta": (tiny_hf_roberta, "bert"), "vit": (tiny_hf_vit, "vit"), "deit": (tiny_hf_deit, "vit")}


def _inputs(kind: str, batch: int, length: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    if kind == "bert":
        return torch.randint(5, 100, (batch, length), generator=generator)
    return torch.randn(batch, 3, 32, 32, generator=generator)


def _optimized(path, kind: str):
    from onnxruntime.transformers.optimizer import optimize_model

    return optimize_model(str(path), model_type=kind, num_heads=0, hidden_size=0).model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_and_head_pruned_exports_fuse_attention_with_each_layers_heads(family, tmp_path):
    pytest.importorskip("transformers")
    build, kind = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    attention = model.model.config._attn_implementation
    assert attention != "eager"  # transformers' default (sdpa), which the export switches away from and back
    for pruned, expected in ((False, [4, 4]), (True, [3, 2])):
        if pruned:
            sites = H.head_sites(model)
            H.remove_heads(model, H.head_root(sites[0].name), [1])
            H.remove_heads(model, H.head_root(sites[1].name), [0, 3])
        path = tmp_path / f"{family}-{pruned}.onnx"
        info = export_onnx(model, _inputs(kind, 2), path, OnnxConfig())
        assert info["attention_rewrites"]["head_reshapes"] == 6  # q, k and v of both layers
        assert "onnxslim skipped" in info["simplify_note"]
        assert model.model.config._attn_implementation == attention  # exported eager, given back as it was
        assert fused_operators(path, kind)["Attention"] == 2
        optimized = _optimized(path, kind)
        heads = [next(a.i for a in n.attribute if a.name == "num_heads")
                 for n in optimized.graph.node if n.op_type == "Attention"]
        assert heads == expected
        fused = tmp_path / f"{family}-{pruned}.fused.onnx"
        onnx.save(optimized, str(fused))
        session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
        x = _inputs(kind, 3, 11)  # another batch and sequence length than the export's
        with torch.no_grad():
            expected_out = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, expected_out, atol=1e-5)


def _head_split(batch_from: str) -> onnx.ModelProto:
    """MatMul(x, W) reshaped to (B, S, -1, 8) with B and S read from Shape(`batch_from`)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32), "W")
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in
              (([0], "i0"), ([1], "i1"), ([-1], "minus"), ([8], "size"))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["proj"]),
             helper.make_node("Shape", [batch_from], ["shape"]),
             helper.make_node("Gather", ["shape", "i0"], ["b"]), helper.make_node("Gather", ["shape", "i1"], ["s"]),
             helper.make_node("Concat", ["b", "s", "minus", "size"], ["to"], axis=0),
             helper.make_node("Reshape", ["proj", "to"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 16]),
              helper.make_tensor_value_info("other", TensorProto.FLOAT, ["B", "S", 16])]
    graph = helper.make_graph(nodes, "split", inputs if batch_from == "other" else inputs[:1],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, *consts])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_head_count_is_written_only_where_it_is_what_the_minus_one_resolves_to():
    model = _head_split("x")
    assert explicit_heads(model) == 1
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert [int(values[i][0]) for i in concat.input[2:]] == [4, 8]  # 32 outputs / head size 8
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # ORT's and numpy's matmul kernels round differently by CPU (AVX2: 3e-7 absolute, 6e-6 relative near zero);
    # a wrong split moves values by O(1)
    np.testing.assert_allclose(got, (x @ values["W"]).reshape(2, 5, 4, 8), rtol=1e-5, atol=1e-5)

    elsewhere = _head_split("other")  # B and S from another tensor: -1 need not be 4 there
    before = elsewhere.SerializeToString()
    assert explicit_heads(elsewhere) == 0 and fusable_attention(elsewhere)["head_reshapes"] == 0
    assert elsewhere.SerializeToString() == before


def test_graphs_without_attention_are_left_byte_for_byte(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(net, torch.randn(1, 3, 8, 8), str(path), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    model = onnx.load(str(path))
    before = model.SerializeToString()
    assert fusable_attention(model) == {"head_reshapes": 0, "noop_casts": 0, "scales_as_div": 0}
    assert model.SerializeToString() == before
    info = export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / "e.onnx", OnnxConfig())
    assert info["attention_rewrites"]["head_reshapes"] == 0 and "skipped" not in str(info["simplify_note"])


def _graph(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_only_casts_to_the_type_they_already_have_are_removed():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    model = _graph([helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),
                    helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT),
                    helper.make_node("Relu", ["b"], ["c"]),
                    helper.make_node("Cast", ["c"], ["d"], to=TensorProto.INT64),
                    helper.make_node("Cast", ["c"], ["out"], to=TensorProto.FLOAT)],
                   [x], [helper.make_tensor_value_info("d", TensorProto.INT64, [2]),
                         helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    assert noop_casts(model) == 2
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == [("Relu", ["x"]), ("Cast", ["c"]),
                                                                      ("Cast", ["c"])]
    onnx.checker.check_model(model)


def test_the_unmasked_score_scale_becomes_a_division_by_its_reciprocal():
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 4, 8])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 8, 4])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, 4, 8])
    scale = numpy_helper.from_array(np.array(8 ** -0.5, np.float32), "scale")
    nodes = [helper.make_node("MatMul", ["q", "k"], ["scores"]), helper.make_node("Mul", ["scores", "scale"], ["m"]),
             helper.make_node("Softmax", ["m"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["out"])]
    model = _graph(nodes, [q, k, v], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [scale])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("q", (1, 2, 4, 8)), ("k", (1, 2, 8, 4)),
                                                                       ("v", (1, 2, 4, 8)))}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert scale_as_div(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Div", "Softmax", "MatMul"]
    divisor = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[model.graph.node[1].input[1]]
    assert float(divisor) == pytest.approx(8 ** 0.5, rel=1e-7)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)

    masked = _graph([*nodes[:2], helper.make_node("Add", ["m", "q"], ["a"]),
                     helper.make_node("Softmax", ["a"], ["p"], axis=-1), nodes[3]],
                    [q, k, v], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [scale])
    assert scale_as_div(masked) == 0  # with a mask the optimizer's own pattern takes the Mul as it is
