"""Top-1 agreement of parity checks for outputs that are not (N, classes): segmentation maps and outputs without
classes."""
from __future__ import annotations

import numpy as np
import pytest

from compressor.deploy.config import VerifyConfig
from compressor.deploy.quantize import output_error
from compressor.deploy.verify import check, compare_outputs
from compressor.errors import ParityError


def _segmentation_pair():
    """(2, 3 classes, 2, 2) maps, class 0 everywhere; the candidate predicts class 1 at one of the 8 pixels."""
    reference = np.zeros((2, 3, 2, 2), dtype=np.float32)
    reference[:, 0] = 1.0
    candidate = reference.copy()
    candidate[0, :, 0, 0] = [0.0, 2.0, 0.0]
    return reference, candidate


def test_a_segmentation_map_agrees_per_pixel_and_a_wrong_pixel_fails_the_check():
    reference, candidate = _segmentation_pair()
    metrics = compare_outputs(reference, candidate)
    assert metrics["top1_agreement"] == pytest.approx(7 / 8)
    assert output_error(reference, candidate)["top1_agreement"] == pytest.approx(7 / 8)  # int8 sensitivity scan
    with pytest.raises(ParityError, match=r"top-1 agreement 0\.8750 \(required 0\.999\)"):
        check(metrics, VerifyConfig(atol=10.0), "ONNX m.onnx")  # within the diff tolerance: agreement decides


@pytest.mark.parametrize("shape", [(4,), (4, 1)])
def test_an_output_without_classes_has_no_agreement_and_is_checked_on_its_values(shape):
    reference = np.arange(4, dtype=np.float32).reshape(shape)
    metrics = compare_outputs(reference, reference + 1e-7)
    assert metrics["top1_agreement"] is None and metrics["distinct_top1"] is None
    assert check(metrics, VerifyConfig(), "ONNX m.onnx")["passed"]
    with pytest.raises(ParityError, match="no top-1 agreement \\(the output has no class axis\\)"):
        check(compare_outputs(reference, reference + 1.0), VerifyConfig(), "ONNX m.onnx")
