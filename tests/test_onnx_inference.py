"""compressor.deploy.onnx_runtime.run_onnx / onnx_feed: the one way parity, quantization checks and ONNX
evaluation run a session on data (the feed cast to the model's declared input dtype, float32 out)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.deploy.onnx_runtime import create_session, model_input, onnx_feed, run_onnx
from compressor.errors import UsageError


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return create_session(path, "ort-cpu")


@pytest.fixture(scope="module")
def half_session(tmp_path_factory):
    """A float16 model end to end (input, weights and output in float16, as convert_fp16 without keep_io_types
    writes): y = x * 3 + 0.5."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["t"]), helper.make_node("Add", ["t", "half"], ["y"])], "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])],
        initializer=[numpy_helper.from_array(np.array(3, np.float16), "three"),
                     numpy_helper.from_array(np.array(0.5, np.float16), "half")])
    return _save(graph, tmp_path_factory.mktemp("half") / "half.onnx")


TABLE = np.arange(10 * 3, dtype=np.float32).reshape(10, 3) / 7


@pytest.fixture(scope="module")
def token_session(tmp_path_factory):
    """A text model's first layer: int64 token ids [N, S] -> embedding rows [N, S, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["y"], axis=0)], "tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 3])],
        initializer=[numpy_helper.from_array(TABLE, "table")])
    return _save(graph, tmp_path_factory.mktemp("tokens") / "tokens.onnx")


def test_a_float16_model_gets_float16_and_gives_float32(half_session):
    x = np.array([[0.0, 1.0, -2.0, 0.25], [4.0, 5.5, 6.0, -7.0]], np.float32)
    assert onnx_feed(half_session, x)["x"].dtype == np.float16
    out = run_onnx(half_session, x)
    assert out.dtype == np.float32 and out.shape == (2, 4)
    np.testing.assert_array_equal(out, x * 3 + 0.5)  # all exact in float16
    from_torch = run_onnx(half_session, torch.from_numpy(x).double().requires_grad_())  # any float, any tensor
    np.testing.assert_array_equal(from_torch, out)


def test_token_ids_stay_integers_and_are_cast_to_the_declared_width(token_session):
    ids = np.array([[1, 2, 9], [0, 0, 5]])
    node, dtype = model_input(token_session)
    assert node.name == "input_ids" and dtype == np.int64
    for given in (ids.astype(np.int32), torch.from_numpy(ids)):
        feed = onnx_feed(token_session, given)
        assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].tolist() == ids.tolist()
        out = run_onnx(token_session, given)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, TABLE[ids])


def test_float_data_for_token_ids_is_refused(token_session):
    with pytest.raises(UsageError, match=r"'tokens.onnx' takes int64 token ids as 'input_ids', but the data is float32"):
        run_onnx(token_session, np.zeros((1, 3), np.float32), source="'tokens.onnx'")


def test_batch_size_splits_the_runs_and_joins_the_outputs(half_session):
    calls = []

    class Counting:
        def get_inputs(self):
            return half_session.get_inputs()

        def run(self, names, feed):
            calls.append(len(feed["x"]))
            return half_session.run(names, feed)

    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 4) / 8
    out = run_onnx(Counting(), x, batch_size=2)
    assert calls == [2, 2, 1]
    np.testing.assert_array_equal(out, run_onnx(half_session, x))
    calls.clear()
    run_onnx(Counting(), x, batch_size=64)
    assert calls == [5]


def test_models_compressor_cannot_feed_are_named(tmp_path):
    two = _save(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), tmp_path / "two.onnx")
    with pytest.raises(UsageError, match=r"'two.onnx' has 2 inputs \(a, b\); compressor feeds models with exactly one"):
        run_onnx(two, np.zeros(1, np.float32), source="'two.onnx'")
    flags = _save(helper.make_graph(
        [helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT)], "flags",
        [helper.make_tensor_value_info("m", TensorProto.BOOL, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), tmp_path / "flags.onnx")
    with pytest.raises(UsageError, match=r"takes tensor\(bool\) as 'm'; compressor feeds float inputs"):
        onnx_feed(flags, np.ones(2, bool))
