"""The recipe's prune section, assembled from the registries: prune.method, prune.host and prune.importance.kind
accept exactly the registered names, and every method or host with settings adds its own sub-section
(`config_section`: prune.dpm, prune.fggp, prune.ocsp, prune.sparse_learning). A new method or host is one new
module; nothing here changes."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, PrivateAttr, create_model, field_validator

from compressor.config import Strict
from compressor.prune.config import AttentionConfig, DecoderConfig, ScheduleConfig, TargetConfig
from compressor.prune.importance import ImportanceConfig
from compressor.prune.methods import HOSTS, METHODS
from compressor.registry import Registry


class PruneBase(Strict):
    """The settings every method shares; PruneConfig adds method, host and the registered sub-sections."""

    method: str = "dpm"  # narrowed to the registered names in PruneConfig
    host: str = "depgraph"
    importance: ImportanceConfig = Field(default_factory=ImportanceConfig)
    target: TargetConfig = Field(default_factory=lambda: TargetConfig(macs=0.5))
    global_ranking: bool = Field(True, alias="global")
    round_to: Optional[Union[int, Literal["auto"]]] = Field(
        None, description="kept widths rounded up to a multiple of this; auto: what the bench/export targets run "
                          "fastest on (8 on AVX2 CPUs and GPUs, 16 with AVX-512, 32 for TensorRT INT8)")
    max_layer_ratio: float = Field(0.8, gt=0.0, le=1.0)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)  # decoder LMs only (prune/decoder_snapshot.py)
    # set by round_to.resolve_round_to when round_to was `auto` (narrow groups may keep a smaller power of two)
    _round_to_auto: bool = PrivateAttr(False)
    # set by latency_target.resolve_latency_target: the latency target the measured MAC target came from
    _latency_target: Optional[TargetConfig] = PrivateAttr(None)
    # set with it when the target names a latency table: the planner's cost model (prune/latency_cost.py)
    _latency_cost: Any = PrivateAttr(None)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @field_validator("round_to", mode="before")
    @classmethod
    def _round_to(cls, v: Any) -> Any:
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("must be a positive whole number of channels (8, 16, ...), auto or null")


def registered_names(registry: Registry) -> Any:
    """A Literal of the registry's names, so that validation and the JSON schema list exactly them."""
    return Literal[tuple(registry.names())]  # type: ignore[valid-type]


def registered_sections(*registries: Registry) -> dict[str, Any]:
    """{key: (model, default)} of every registered class that declares a config_section."""
    sections: dict[str, Any] = {}
    for registry in registries:
        for name in registry.names():
            section = getattr(registry.get(name), "config_section", None)
            if section is None:
                continue
            key, model = section
            if key in sections or key in PruneBase.model_fields:
                raise ValueError(f"prune.{key} is claimed twice ({registry.kind} {name})")
            sections[key] = (model, Field(default_factory=model))
    return sections


PruneConfig = create_model(
    "PruneConfig", __base__=PruneBase, __doc__="The recipe's prune section (see the module docstring).",
    method=(registered_names(METHODS), "dpm"), host=(registered_names(HOSTS), "depgraph"),
    **registered_sections(METHODS, HOSTS))
