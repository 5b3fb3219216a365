"""The recipe's export, verify and bench sections."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator

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


class ExportConfig(Strict):
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)


class VerifyConfig(Strict):
    samples: int = Field(256, gt=0)
    atol: float = Field(1e-4, gt=0.0)
    rtol: float = Field(1e-6, ge=0.0, description="allowed max abs diff = atol + rtol * max |PyTorch output| "
                                                  "(untrained or unnormalised logits reach 1e5-1e12)")
    fp16_atol: float = Field(5e-2, gt=0.0, description="max abs diff allowed for an FP16 TensorRT engine")
    int8_atol: float = Field(0.5, gt=0.0, description="max abs diff allowed for an INT8 TensorRT engine")
    reduced_min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0, description="top-1 agreement for FP16/INT8")
    min_top1_agreement: float = Field(0.999, ge=0.0, le=1.0)


BackendName = Literal[tuple(BACKENDS.names())]  # type: ignore[valid-type]  (the registered runtimes)


class BenchConfig(Strict):
    backends: list[BackendName] = Field(["ort-cpu", "torch"])
    batch_sizes: list[int] = Field([1, 8])
    warmup_ms: float = Field(500.0, ge=0.0)
    min_runs: int = Field(50, gt=0)
    min_seconds: float = Field(2.0, ge=0.0)
    threads: Optional[int] = Field(None, gt=0)

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("must be a non-empty list of positive integers")
        return v
