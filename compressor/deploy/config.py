"""The recipe's export, verify and bench sections."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from compressor.config import Strict
import compressor.deploy.backends  # noqa: F401  (registers the backends)
from compressor.deploy.runners import BACKENDS


class OnnxConfig(Strict):
    opset: int = Field(17, ge=11, le=23)
    dynamic_batch: bool = True
    simplify: bool = True
    dynamo: bool = False


class TensorRTConfig(Strict):
    enabled: Union[bool, Literal["auto"]] = "auto"
    fp16: bool = True
    int8: bool = False
    calib_samples: int = Field(512, gt=0)
    sparse: bool = False
    workspace_gb: float = Field(4.0, gt=0.0)


class CalibrationConfig(Strict):
    samples: int = Field(512, gt=0, description="training samples (seeded draw) the activation ranges come from")
    method: Literal["minmax", "entropy", "percentile"] = "minmax"


class QATConfig(Strict):
    """Quantization-aware fine-tuning before int8 (compressor/train/qat.py)."""

    enabled: Union[bool, Literal["auto"]] = Field(
        "auto", description="auto: only when post-training int8 misses gates.max_accuracy_drop; true: always")
    epochs: int = Field(1, gt=0)
    lr: float = Field(1e-3, gt=0.0, description="constant learning rate of the QAT epochs (finetune.optimizer's kind)")


class QuantizeConfig(Strict):
    """export.quantize: a quantized copy of model.onnx (model.int8.onnx, static QDQ; or model.fp16.onnx). The
    shorthands `quantize: int8`, `quantize: fp16` and `quantize: auto` (int8, exclude: auto) are accepted.
    Language models (task: language-modeling) quantize their MatMul weights only (onnxruntime's MatMulNBits,
    activations in float, no calibration): int8 is 8-bit weights, int4 (language models only) 4-bit."""

    mode: Literal["none", "int8", "int4", "fp16"] = "none"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    per_channel: bool = Field(True, description="int8: one weight scale per output channel")
    exclude: Union[Literal["auto"], list[str]] = Field(
        default_factory=list, description="layers kept in float: module names (layer3.0.conv1), ONNX node names or "
                                          "re: patterns; auto: by measured sensitivity until gates.max_accuracy_drop "
                                          "holds")
    activations: Literal["auto", "uint8", "int8"] = Field(
        "auto", description="int8 activation type; auto: uint8 for CPU backends, int8 (symmetric) for GPU ones")
    reduce_range: Union[bool, Literal["auto"]] = Field(
        "auto", description="7-bit weights; auto: on x86 CPUs without VNNI (onnxruntime's advice against "
                            "saturation), off elsewhere")
    max_auto_steps: int = Field(6, gt=0, description="exclude: auto re-quantizes at most this many times")
    qat: QATConfig = Field(default_factory=QATConfig)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        if isinstance(v, str):
            if v == "auto":
                return {"mode": "int8", "exclude": "auto"}
            return {"mode": v}
        return v

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


class NmsConfig(Strict):
    """export.nms (task: detection): model.nms.onnx beside model.onnx, the raw model with its post-processing in the
    graph (ONNX NonMaxSuppression; compressor/deploy/nms_graph.py), outputs num_dets (N, 1), det_boxes (N, max_det,
    4) x0, y0, x1, y1 pixels, det_scores (N, max_det), det_classes (N, max_det) as TensorRT's EfficientNMS_TRT
    writes them; checked against compressor's postprocess of the PyTorch outputs and benchmarked with dense.nms.onnx.
    model.onnx keeps the raw head outputs either way (mAP is measured on those, at conf 0.001)."""

    enabled: bool = Field(False, description="also write model.nms.onnx and dense.nms.onnx (detection runs only)")
    conf: float = Field(0.25, ge=0.0, lt=1.0, description="an anchor is a candidate when its best class probability "
                                                         "is above this")
    iou: float = Field(0.45, gt=0.0, le=1.0, description="NMS within each class drops a box whose IoU with a kept, "
                                                        "higher-scoring box is above this")
    max_det: int = Field(100, gt=0, description="detections kept per image, highest scores first (the outputs' "
                                                "fixed second dimension)")


class ExportConfig(Strict):
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    nms: NmsConfig = Field(default_factory=NmsConfig)


class VerifyConfig(Strict):
    samples: int = Field(256, gt=0)
    atol: float = Field(1e-4, gt=0.0)
    rtol: float = Field(1e-6, ge=0.0, description="allowed max abs diff = atol + rtol * max |PyTorch output| "
                                                  "(untrained or unnormalised logits reach 1e5-1e12)")
    fp16_atol: float = Field(5e-2, gt=0.0, description="max abs diff allowed for an FP16 TensorRT engine")
    int8_atol: float = Field(0.5, gt=0.0, description="max abs diff allowed for an INT8 TensorRT engine")
    reduced_min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0, description="top-1 agreement for FP16/INT8")
    int8_rtol: float = Field(0.25, gt=0.0, description="quantized INT8 ONNX: max abs diff allowed as a fraction of "
                                                        "max |fp32 output|")
    fp16_rtol: float = Field(0.01, gt=0.0, description="FP16 ONNX: max abs diff allowed as a fraction of max |output|")
    int8_min_top1_agreement: float = Field(0.97, ge=0.0, le=1.0, description="quantized INT8 ONNX vs fp32")
    min_top1_agreement: float = Field(0.999, ge=0.0, le=1.0)


DEFAULT_PROMPT_TOKENS, DEFAULT_NEW_TOKENS = 128, 32  # a language model's bench (bench.prompt_tokens / new_tokens)
BackendName = Literal[tuple(BACKENDS.names())]  # type: ignore[valid-type]  (the registered runtimes)


class BenchConfig(Strict):
    backends: list[BackendName] = Field(["ort-cpu", "torch"])
    batch_sizes: list[int] = Field([1, 8])
    warmup_ms: float = Field(500.0, ge=0.0)
    min_runs: int = Field(50, gt=0)
    min_seconds: float = Field(2.0, ge=0.0)
    threads: Optional[int] = Field(None, gt=0)
    prompt_tokens: Optional[int] = Field(None, gt=0, description="language models: the prompt's length in tokens "
                                         "(prefill ms; decode starts after it); default 128")
    new_tokens: Optional[int] = Field(None, gt=0, description="language models: greedy tokens generated with the "
                                      "key/value cache (decode tokens/s); default 32")

    @property
    def lm_lengths(self) -> tuple[int, int]:
        """(prompt tokens, new tokens) of a language model's bench, the defaults filled in."""
        return (self.prompt_tokens or DEFAULT_PROMPT_TOKENS, self.new_tokens or DEFAULT_NEW_TOKENS)

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("must be a non-empty list of positive integers")
        return v
