"""The recipe's model section."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from compressor.config import Strict


class ModelConfig(Strict):
    arch: Optional[str] = Field(None, description="torchvision:NAME | timm:NAME | zoo:NAME | python:pkg.mod:factory")
    num_classes: int = Field(10, gt=0)
    in_channels: int = Field(3, gt=0)
    inputs: Literal["image", "tokens"] = Field("image", description="image: float C,H,W; tokens: int64 token ids "
                                               "of a text model (hf:DIR), input_shape [sequence length]")
    input_shape: list[int] = Field([3, 224, 224], description="C,H,W of one sample (tokens: [sequence length]); "
                                   "the batch axis is free")
    ignore: list[str] = Field(default_factory=list, description="never pruned: module names or re:patterns")

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if len(v) not in (1, 3) or any(int(d) <= 0 for d in v):
            raise ValueError("must be three positive integers [C, H, W] (or, with inputs: tokens, one: [sequence "
                             "length])")
        return v

    @field_validator("ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for item in v:
            if item.startswith("re:"):
                try:
                    re.compile(item[3:])
                except re.error as exc:
                    raise ValueError(f"{item!r} is not a valid regular expression ({exc})") from None
        return v

    @model_validator(mode="after")
    def _channels_match(self) -> "ModelConfig":
        if self.inputs == "tokens":
            if len(self.input_shape) != 1:
                raise ValueError(f"inputs: tokens takes input_shape [sequence length], not {self.input_shape}")
            return self
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape {self.input_shape} has one value; images take [C, H, W] (a text model "
                             "takes inputs: tokens)")
        if self.input_shape[0] != self.in_channels:
            raise ValueError(
                f"input_shape[0]={self.input_shape[0]} differs from in_channels={self.in_channels}; make them equal"
            )
        return self
