"""Recipe pieces every pruning method shares: the target and the event schedule."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from compressor.config import Strict


class TargetConfig(Strict):
    macs: Optional[float] = Field(None, gt=0.0, lt=1.0, description="remaining fraction of dense MACs")
    speedup: Optional[float] = Field(None, gt=1.0, description="dense MACs / pruned MACs")
    channels: Optional[float] = Field(None, gt=0.0, lt=1.0, description="fraction of prunable channels removed")
    latency: Optional[float] = Field(None, gt=0.0, lt=1.0, description="measured latency as a fraction of the dense "
                                                                       "model's, on `backend` at `batch`")
    latency_speedup: Optional[float] = Field(None, gt=1.0, description="measured dense latency / pruned latency")
    tokens_per_second_speedup: Optional[float] = Field(
        None, gt=1.0, description="language models: measured decode tokens/s of the pruned model / the dense model's "
                                  "(KV-cache ONNX, bench.prompt_tokens and bench.new_tokens)")
    backend: Optional[str] = Field(None, description="latency targets: the bench backend measured (default: the "
                                                     "first of bench.backends)")
    batch: Optional[int] = Field(None, gt=0, description="latency targets: the batch size measured (default: the "
                                                         "first of bench.batch_sizes)")
    table: Optional[str] = Field(None, description="latency targets: a `compressor latency-table` JSON of this "
                                                   "model on the target backend and batch; plans by importance per ms")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TargetConfig":
        given = [k for k in ("macs", "speedup", "channels", "latency", "latency_speedup", "tokens_per_second_speedup")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of macs, speedup, channels, latency, latency_speedup, "
                             "tokens_per_second_speedup "
                             f"(got {', '.join(given) or 'none'})")
        if not self.is_latency and (self.backend is not None or self.batch is not None or self.table is not None):
            raise ValueError("backend, batch and table belong to a latency target (latency, latency_speedup or "
                             "tokens_per_second_speedup)")
        return self

    @property
    def is_latency(self) -> bool:
        return any(v is not None for v in (self.latency, self.latency_speedup, self.tokens_per_second_speedup))

    def asked_latency_speedup(self) -> Optional[float]:
        """Dense latency / pruned latency asked by a latency target (None for other targets)."""
        if self.latency_speedup is not None:
            return self.latency_speedup
        if self.tokens_per_second_speedup is not None:  # decode time per token: tokens/s speedup = time speedup
            return self.tokens_per_second_speedup
        return 1.0 / self.latency if self.latency is not None else None

    def remaining_macs(self) -> Optional[float]:
        """The remaining MAC fraction asked for, or None for a channel-ratio target. A latency target counts as
        1 / speedup MACs until compress has measured which MAC fraction gives that speedup (prune/latency_target.py)."""
        if self.macs is not None:
            return self.macs
        if self.speedup is not None:
            return 1.0 / self.speedup
        if self.is_latency:
            return 1.0 / self.asked_latency_speedup()
        return None


class AttentionConfig(Strict):
    """prune.attention: whether attention heads are structures too (prune/heads.py, docs/heads.md), and whether
    the embedding width (each attention layer's input and output) may go too (embed; docs/heads.md)."""

    heads: bool = Field(False, description="remove whole attention heads (q, k, v rows and output-projection "
                                           "columns); each layer keeps its own head count")
    embed: bool = Field(False, description="prune the embedding width (the residual stream every attention layer "
                                           "reads and writes, the embeddings and every LayerNorm on it): Hugging "
                                           "Face layers with separate q/k/v projections only")


DecoderKind = Literal["layers", "kv_groups", "mlp", "hidden"]


class DecoderConfig(Strict):
    """prune.decoder: the structures of a decoder language model (hf:DIR Llama, Mistral, Qwen2/3, Phi-3, GPT-2) the
    planner removes, in place of torch-pruning's channel groups (prune/decoder_snapshot.py, docs/planning.md).

    The target applies per kind: `target.channels: F` removes F of each kind (of each layer's key/value groups and
    MLP channels, of the layers, of the hidden size); a MAC target (macs, speedup, or the MAC fraction a latency
    target resolves to) is met by one common fraction over the kinds not named in `ratios`, found by bisection on
    the analytic cost (models/decoder.decoder_macs at the recipe's sequence length)."""

    kinds: list[DecoderKind] = Field(
        default_factory=lambda: ["mlp", "kv_groups"], min_length=1,
        description="what is removed: layers (whole decoder layers, depth), kv_groups (a key/value head with its "
                    "query heads), mlp (MLP intermediate channels), hidden (the residual stream's channels)")
    ratios: dict[DecoderKind, float] = Field(
        default_factory=dict, description="fraction removed per kind, overriding the target's fraction for that kind "
                                          "(e.g. {mlp: 0.5, kv_groups: 0.25})")
    uniform: bool = Field(True, description="every layer keeps the same widths, so the pruned model is an ordinary "
                                            "config that from_pretrained (and vLLM, TensorRT-LLM) loads; false: "
                                            "widths ranked across layers, per-layer widths that do NOT reload with "
                                            "from_pretrained")
    layer_importance: Literal["host", "block_influence"] = Field(
        "host", description="how whole layers are ranked: host (the host's importance of each layer's o_proj / "
                            "down_proj rows) or block_influence (1 - the mean cosine between the hidden state "
                            "entering and leaving the layer on calibration batches, ShortGPT's measure; host "
                            "methods only)")

    @model_validator(mode="after")
    def _consistent(self) -> "DecoderConfig":
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds {self.kinds} lists a kind twice")
        stray = [k for k in self.ratios if k not in self.kinds]
        if stray:
            raise ValueError(f"ratios names {stray}, which kinds {self.kinds} does not prune; add them to kinds or "
                             "drop their ratios")
        bad = {k: v for k, v in self.ratios.items() if not 0.0 < v < 1.0}
        if bad:
            raise ValueError(f"ratios {bad}: each is the fraction of that kind removed, above 0 and below 1")
        if self.layer_importance == "block_influence" and "layers" not in self.kinds:
            raise ValueError(f"layer_importance block_influence ranks whole layers, which kinds {self.kinds} does "
                             "not prune; add layers to kinds or remove layer_importance")
        return self


class ScheduleConfig(Strict):
    events: int = Field(4, gt=0, description="number of host selection events")
    start_epoch: int = Field(0, ge=0)
    end_epoch: Optional[int] = Field(None, ge=0, description="default: half of finetune.epochs")
    shape: Literal["linear", "cubic"] = "linear"
