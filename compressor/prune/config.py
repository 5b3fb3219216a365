"""Recipe pieces every pruning method shares: the target and the event schedule."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from compressor.config import Strict


class TargetConfig(Strict):
    macs: Optional[float] = Field(None, gt=0.0, lt=1.0, description="remaining fraction of dense MACs")
    speedup: Optional[float] = Field(None, gt=1.0, description="dense MACs / pruned MACs")
    channels: Optional[float] = Field(None, gt=0.0, lt=1.0, description="fraction of prunable channels removed")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TargetConfig":
        given = [k for k in ("macs", "speedup", "channels") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of macs, speedup, channels (got {', '.join(given) or 'none'})")
        return self

    def remaining_macs(self) -> Optional[float]:
        """The remaining MAC fraction asked for, or None for a channel-ratio target."""
        if self.macs is not None:
            return self.macs
        if self.speedup is not None:
            return 1.0 / self.speedup
        return None


class ScheduleConfig(Strict):
    events: int = Field(4, gt=0, description="number of host selection events")
    start_epoch: int = Field(0, ge=0)
    end_epoch: Optional[int] = Field(None, ge=0, description="default: half of finetune.epochs")
    shape: Literal["linear", "cubic"] = "linear"
