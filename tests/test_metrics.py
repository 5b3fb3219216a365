"""compressor.train.metrics: the one accumulation of top-1 / top-5 / loss / a user's metric over batches that
train.loop.evaluate (a PyTorch module) and app.evaluation.evaluate_onnx (an ONNX Runtime session) share."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compressor.app.evaluation import evaluate_onnx
from compressor.train.loop import evaluate
from compressor.train.metrics import FIELDS, batch_sums, evaluate_batches, from_sums

LOGITS = torch.tensor([[5.0, 4, 3, 2, 1, 0],    # class 0 first
                       [0.0, 1, 2, 3, 4, 5],    # class 5 first, class 0 last (6th)
                       [1.0, 0, 0, 0, 0, 9]])   # class 5 first, class 0 second
TARGETS = torch.tensor([0, 0, 0])


def test_one_batch_sums_known_hits_and_loss():
    sums = batch_sums(LOGITS, TARGETS)
    expected_loss = sum(-torch.log_softmax(row, 0)[0].item() for row in LOGITS)
    assert sums.dtype == torch.float64 and len(sums) == len(FIELDS)
    loss, top1, top5, count, metric = sums.tolist()
    assert (top1, top5, count, metric) == (1, 2, 3, 0)  # the second sample's class is 6th: outside the top 5
    assert loss == pytest.approx(expected_loss)
    three = batch_sums(LOGITS[:, :3], torch.tensor([2, 0, 1]))  # three classes: top-5 is top-3, every sample a hit
    assert three.tolist()[1:4] == [0, 3, 3]


def test_means_are_per_sample_and_the_metric_is_weighted_by_batch_size():
    batches = [(LOGITS, TARGETS), (LOGITS[:1], TARGETS[:1])]  # 3 samples then 1
    means = iter([0.5, 1.0])  # the batches' own means
    result = evaluate_batches(lambda x: x, batches, metric=lambda logits, targets: next(means))
    assert result["count"] == 4
    assert result["top1"] == pytest.approx(100 * 2 / 4) and result["top5"] == pytest.approx(100 * 3 / 4)
    assert result["metric"] == pytest.approx((0.5 * 3 + 1.0 * 1) / 4)
    assert result["loss"] == pytest.approx((batch_sums(LOGITS, TARGETS)[0] + batch_sums(LOGITS[:1], TARGETS[:1])[0]).item() / 4)
    doubled = evaluate_batches(lambda x: x, batches, reduce=lambda sums: sums * 2)  # two ranks with equal shards
    assert doubled["count"] == 8 and doubled["top1"] == result["top1"] and "metric" not in doubled
    assert from_sums(torch.zeros(len(FIELDS)))["count"] == 1  # an empty set divides by one, not zero


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 7)).eval()


def test_pytorch_and_onnx_evaluation_agree_on_the_same_model(tmp_path):
    model = _classifier()
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(23, 1, 6, 6), torch.randint(0, 7, (23,)))
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.randn(1, 1, 6, 6),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    ours = evaluate(model, data, batch_size=5)
    onnx = evaluate_onnx(path, data, batch_size=5)
    with torch.no_grad():
        logits = model(data.tensors[0])
    direct = from_sums(batch_sums(logits, data.tensors[1]))
    assert ours["count"] == onnx["count"] == direct["count"] == 23
    for key in ("top1", "top5"):
        assert ours[key] == onnx[key] == pytest.approx(direct[key])
    assert ours["loss"] == pytest.approx(direct["loss"], rel=1e-6) and onnx["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert math.isfinite(ours["loss"]) and 0 < ours["top5"] <= 100


def test_evaluate_restores_the_model_when_the_forward_fails():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 3)

        def forward(self, x):
            raise RuntimeError("forward failed")

    model = Failing().train()
    with pytest.raises(RuntimeError, match="forward failed"):
        evaluate(model, TensorDataset(torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), batch_size=2)
    assert model.training
