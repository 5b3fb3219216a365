"""The planner's view of a decoder language model (prune.decoder): its structures as Candidates, scored from their
slices, with the analytic MAC cost, and the recipe checks that need the model.

torch-pruning cannot trace Hugging Face decoder LMs (tuple outputs, the cache, rotary embeddings: a TypeError inside
tracing), and its channel groups are not the structures that matter there. A model that is or holds a supported
causal LM (models/decoder: Llama, Mistral, Qwen2, Qwen3, Phi-3, GPT-2) is therefore never traced: its candidates are
the decoder sites of the kinds prune.decoder.kinds names (models/decoder/sites.py):
- `layers`: one candidate for all decoder layers (structure i is layer i), scored from each layer's residual branch
  outputs (o_proj / down_proj rows: the tensors whose zeroing makes the layer the identity, what DPM decays);
- `kv_groups`: one candidate per layer, its key/value groups (a key/value head with its query heads);
- `mlp`: one candidate per layer, its MLP intermediate channels;
- `hidden`: one candidate, the residual stream's channels.
Width structures are scored from all their tensors (producer rows and consumer columns, as attention heads are).
Scores are divided by the mean over every candidate of the same kind (normalize), so that per-layer widths ranked
across layers (prune.decoder.uniform: false) compare a kind's structures on one scale. Scoring reads the weights (and
a gradient scorer's sums) only: no forward pass, no tracing, no activation memory.

Snapshot.macs_after is decoder_macs(model, seq_len, plan) times the example's batch (exact for the formula's
widths; PlanCost evaluates it on the widths of the snapshot's moment); Snapshot.decoder holds the DecoderLayout that
prune/decoder_plan.py plans with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional

import torch
from torch import nn

from compressor.errors import NotPrunableError, RecipeError
from compressor.models.decoder import (allowed_head_counts, arch_of, check_head_ratio, config_problem, decoder_macs,
                                       decoder_sites, widths_of)
from compressor.models.decoder.arch import Arch
from compressor.prune.config import DecoderConfig
from compressor.prune.importance import Scorer, build_scorer
from compressor.prune.snapshot import Candidate, Snapshot

KIND_NAMES = {"layers": "decoder layers", "kv_groups": "key/value groups", "mlp": "MLP channels",
              "hidden": "hidden channels"}


def decoder_arch(model: nn.Module) -> Optional[Arch]:
    """The Arch of the supported decoder LM `model` is or holds, or None for any other model. A causal LM of a family
    models/decoder does not support raises its NotPrunableError (naming the supported families): tracing it would
    fail inside torch-pruning."""
    try:
        return arch_of(model)
    except NotPrunableError:
        if holds_causal_lm(model):
            raise
        return None


def is_decoder_model(model: nn.Module) -> bool:
    """Whether `model` is or holds a decoder LM whose structures models/decoder removes (never raises)."""
    try:
        return decoder_arch(model) is not None
    except NotPrunableError:
        return False


def holds_causal_lm(model: nn.Module) -> bool:
    """compressor's HFCausalLM wrapper, or a transformers *ForCausalLM / *LMHeadModel class, anywhere in `model`."""
    return any(getattr(m, "causal_lm", False) is True or type(m).__name__.endswith(("ForCausalLM", "LMHeadModel"))
               for m in model.modules())


def decoder_config(prune: Any) -> DecoderConfig:
    """prune.decoder of a prune section, a DecoderConfig as it is, the default for None."""
    if prune is None:
        return DecoderConfig()
    if isinstance(prune, DecoderConfig):
        return prune
    return prune.decoder


@dataclass
class DecoderLayout:
    """What decoder planning (prune/decoder_plan.py) needs beyond the candidates: the recipe's decoder settings, the
    LM's config and widths now, and the structures model.ignore holds back."""

    cfg: DecoderConfig
    kinds: list[str]  # the chosen kinds in KINDS order
    config: Any  # the LM's Hugging Face config (kept in step with uniform widths by models/decoder.sync_config)
    hidden: int
    layer_count: int
    widths: dict[str, list[int]]  # kv_groups / mlp: every layer's width now
    held: dict[str, set[int]] = field(default_factory=dict)  # root -> structures never removed (model.ignore)
    _kv_cache: dict[int, list[int]] = field(default_factory=dict, repr=False)
    _hidden_cache: dict[int, bool] = field(default_factory=dict, repr=False)

    @property
    def uniform(self) -> bool:
        return self.cfg.uniform

    def kv_kept_allowed(self, hidden_kept: int) -> list[int]:
        """Key/value groups every layer may keep under uniform widths (allowed_head_counts at that hidden size)."""
        if hidden_kept not in self._kv_cache:
            self._kv_cache[hidden_kept] = [k for k, _ in allowed_head_counts(self.config, hidden_kept)]
        return self._kv_cache[hidden_kept]

    def hidden_allowed(self, kept: int) -> bool:
        """Under uniform widths, whether a hidden size of `kept` leaves a config from_pretrained accepts with the
        current head count (Llama: a multiple of the query heads). Fewer heads are then chosen among those this
        hidden size allows too; asking the current count keeps the MACs falling as the hidden size does."""
        if kept not in self._hidden_cache:
            current = self.widths["kv_groups"][0] if self.widths.get("kv_groups") else None
            self._hidden_cache[kept] = current in self.kv_kept_allowed(kept)
        return self._hidden_cache[kept]


# ---------------------------------------------------------------------------------------------- snapshot
def decoder_snapshot(model: nn.Module, example: torch.Tensor, prune: Any, scorer: Scorer, *,
                     ignore: Iterable[str] = (), normalize: bool = True, heads: bool = False,
                     embed: bool = False, layer_scores: Optional[torch.Tensor] = None) -> Snapshot:
    """The decoder structures of prune.decoder.kinds as Candidates (module docstring). `prune`: the prune section, a
    DecoderConfig, or None for the default. The fractions are checked once, on the dense model (check_decoder_recipe),
    not here: a model pruned part of the way holds other counts. `layer_scores` (one per layer, e.g. block influence)
    rank the layers in place of the scorer's."""
    arch = arch_of(model)
    if heads or embed:
        _refuse_attention_settings(arch)
    cfg = decoder_config(prune)
    held_layers = _held_layers(model, arch, list(ignore), example)
    sites = [s for s in decoder_sites(model, cfg.kinds)
             if s.kind in ("layers", "hidden") or s.index not in held_layers]
    found: list[Candidate] = []
    for site in sites:
        if site.kind == "layers" and layer_scores is not None:
            if len(layer_scores) != site.width:
                raise ValueError(f"{len(layer_scores)} layer scores for {site.width} decoder layers")
            scores = layer_scores
        else:
            scores = scorer.slices(site.slices(out_only=site.kind == "layers"), site.width)
        if scores is None:
            raise RecipeError(
                f"the importance {type(scorer).__name__} cannot score the {KIND_NAMES[site.kind]} of a decoder "
                f"language model (it ranks batch-norm scales, which {type(arch.lm).__name__} does not have).",
                hint="Use prune.importance.kind magnitude, taylor, saliency or random, with host depgraph or taylor.")
        found.append(Candidate(root=site.root, width=site.width, scores=scores.detach().float().cpu(), members=[],
                               kind=site.kind))
    if normalize:
        for kind in {c.kind for c in found}:
            same = [c for c in found if c.kind == kind]
            mean = torch.cat([c.scores for c in same]).mean().clamp_min(1e-12)
            for c in same:
                c.scores = c.scores / mean
    layers_root = next((s.root for s in decoder_sites(model, ["layers"], prunable=False)), None)
    count = len(arch.layers)
    layout = DecoderLayout(cfg=cfg, kinds=[k for k in ("layers", "kv_groups", "mlp", "hidden") if k in cfg.kinds],
                           config=arch.config, hidden=arch.hidden(), layer_count=count,
                           widths={"kv_groups": [arch.kv_heads(i) for i in range(count)],
                                   "mlp": [arch.inter(i) for i in range(count)]},
                           held={layers_root: held_layers} if held_layers else {})
    batch, seq_len = _batch_and_length(example)
    params = sum(p.numel() for p in model.parameters())
    cost = PlanCost(model, batch, seq_len)
    return Snapshot(candidates=found, layer_macs={}, layer_dims={}, fixed_macs=0.0, total_macs=cost({}),
                    params=int(params), cost=cost, decoder=layout)


class PlanCost:
    """decoder_macs(model, seq_len, plan) x batch of the model as it was when built: its widths and roots are read
    once, so a snapshot's cost stays true after the model changed (a DPM step removing structures mid-event)."""

    def __init__(self, model: nn.Module, batch: int, seq_len: int) -> None:
        arch = arch_of(model)
        self.batch, self.seq_len = batch, seq_len
        self.widths = widths_of(model)
        self.rep = [arch.n_rep(i) for i in range(len(arch.layers))]
        self.where = {s.root: (s.kind, s.index if s.kind in ("kv_groups", "mlp") else None)
                      for s in decoder_sites(model, prunable=False)}

    def __call__(self, plan: dict[str, list[int]]) -> float:
        widths = replace(self.widths, layers=[replace(w) for w in self.widths.layers])
        gone: set[int] = set()
        for root, idxs in plan.items():
            count = len(set(idxs))
            if not count:
                continue
            if root not in self.where:
                raise NotPrunableError(f"{root!r} names no decoder structure of this model.")
            kind, i = self.where[root]
            if kind == "layers":
                gone |= {int(j) for j in idxs}
            elif kind == "hidden":
                widths.hidden -= count
            elif kind == "kv_groups":
                widths.layers[i].kv -= count
                widths.layers[i].q -= count * self.rep[i]
            else:
                widths.layers[i].inter -= count
        widths.layers = [w for j, w in enumerate(widths.layers) if j not in gone]
        return float(self.batch * widths.macs(self.seq_len))


def decoder_model_macs(model: nn.Module, example: torch.Tensor) -> tuple[float, int]:
    """(MACs, params) of a decoder LM now: the analytic MACs of the example's sequences (what its planner counts)."""
    batch, seq_len = _batch_and_length(example)
    return float(batch * decoder_macs(model, seq_len)), int(sum(p.numel() for p in model.parameters()))


def _batch_and_length(example: torch.Tensor) -> tuple[int, int]:
    return (int(example.shape[0]) if example.dim() > 1 else 1), int(example.shape[-1])


def _held_layers(model: nn.Module, arch: Arch, patterns: list[str], example: torch.Tensor) -> set[int]:
    """Decoder layers that hold a module of model.ignore: they are neither removed nor narrowed."""
    if not patterns:
        return set()
    from compressor.prune import graph as dg

    with dg.quiet_eval(model):
        ignored = {id(m) for m in dg.resolve_ignored(model, patterns, example)}
    return {i for i, layer in enumerate(arch.layers) if any(id(m) in ignored for m in layer.modules())}


# ---------------------------------------------------------------------------------------------- recipe checks
def check_decoder_recipe(model: nn.Module, prune: Any) -> None:
    """The prune section against the model, before any training: RecipeError when prune.decoder is set on a model
    that is not a decoder LM, when a decoder LM is asked for attention-head or embedding pruning of the channel
    planner, a host or importance that cannot score decoder structures, or (uniform widths, a channel target) a
    fraction that leaves a key/value group count the config cannot hold (check_head_ratio names the nearest allowed
    counts), a hidden size it refuses, or no structure of a kind removed. Nothing happens for other models."""
    arch = decoder_arch(model)
    if arch is None:
        if "decoder" in getattr(prune, "model_fields_set", ()):
            raise RecipeError(f"prune.decoder: {type(model).__name__} is not a decoder language model (supported: "
                              "Llama, Mistral, Qwen2, Qwen3, Phi-3 and GPT-2 causal LMs), so it has no decoder "
                              "structures.", hint="Remove prune.decoder; channel groups are pruned as usual.")
        return
    from compressor.prune.methods import METHODS

    method = METHODS.get(prune.method)
    if method.keeps_dense_shapes(prune):
        return  # no structure is removed (method none, FGGP unstructured / 2:4)
    if prune.attention.heads or prune.attention.embed:
        _refuse_attention_settings(arch)
    _check_scorer(prune, method)
    cfg = prune.decoder
    from compressor.prune.methods.hosts import EventMethod

    if cfg.layer_importance == "block_influence" and not issubclass(method, EventMethod):
        raise RecipeError(f"prune.decoder.layer_importance: block_influence ranks the layers at a host method's "
                          f"selection events; method {prune.method} ranks every structure by its own scores.",
                          hint="Use method dpm, oneshot or iterative, or remove layer_importance.")
    target = prune.target
    if target.channels is None:
        return
    fractions = {kind: cfg.ratios.get(kind, target.channels) for kind in cfg.kinds}
    field_of = {kind: f"prune.decoder.ratios.{kind}" if kind in cfg.ratios else
                f"prune.target.channels (the fraction of {KIND_NAMES[kind]} removed)" for kind in cfg.kinds}
    count = len(arch.layers)
    if "layers" in fractions:
        removed = round_half(count * fractions["layers"])
        if not 0 < removed < count:
            raise RecipeError(
                f"{field_of['layers']} {fractions['layers']:g} of {count} decoder layers is {removed} layers: "
                f"{'none' if removed == 0 else 'all'} of them.",
                hint=f"Remove between 1 and {count - 1} layers: a ratio from {1 / count:g} to {(count - 1) / count:g}.")
    hidden_kept = None
    if "hidden" in fractions:
        width = arch.hidden()
        hidden_kept = width - round_half(width * fractions["hidden"])
        _check_count(field_of["hidden"], fractions["hidden"], width, "hidden channels")
    if "mlp" in fractions:
        _check_count(field_of["mlp"], fractions["mlp"], max(arch.inter(i) for i in range(count)), "MLP channels")
    if not cfg.uniform:
        return
    if hidden_kept is not None and arch.kv_heads(0) not in [k for k, _ in allowed_head_counts(arch.config,
                                                                                              hidden_kept)]:
        problem = config_problem(arch.config, hidden_size=hidden_kept) or "the head width no longer fits"
        raise RecipeError(
            f"{field_of['hidden']} {fractions['hidden']:g} leaves a hidden size of {hidden_kept}, which "
            f"{arch.config.model_type}'s config refuses with {arch.q_heads(0)} attention heads ({problem}).",
            hint=f"Keep a hidden size the head count divides (a multiple of {arch.q_heads(0)}; the planner narrows "
                 "the hidden size in such steps).")
    if "kv_groups" in fractions:
        check_head_ratio(arch.config, fractions["kv_groups"], field=field_of["kv_groups"], hidden_size=hidden_kept)


def check_decoder_spec(model: nn.Module, spec: Any) -> None:
    """check_decoder_recipe of a method's PruneSpec or a Recipe (its prune section)."""
    check_decoder_recipe(model, spec.prune)


def _check_count(field_name: str, fraction: float, width: int, what: str) -> None:
    removed = round_half(width * fraction)
    if removed == 0:
        raise RecipeError(f"{field_name} {fraction:g} of {width} {what} rounds to no {what} removed.",
                          hint=f"Use a ratio of at least {1 / width:.3g}, or drop the kind from prune.decoder.kinds.")


def _check_scorer(prune: Any, method: type) -> None:
    from compressor.prune.methods.hosts import EventMethod, Host
    from compressor.prune.methods.registry import HOSTS

    if not issubclass(method, EventMethod):
        return  # fggp (magnitude and gradient norms) and ocsp (saliency) score with their own slices
    host = HOSTS.get(prune.host)
    if prune.host == "depgraph-sl":
        raise RecipeError("prune.host depgraph-sl regularises torch-pruning's channel groups, which a decoder "
                          "language model does not have (its structures are layers, key/value groups, MLP and "
                          "hidden channels).",
                          hint="Use host depgraph or taylor (or otov2, which drives the selected structures to zero), "
                               "or method dpm, whose decay is the gradual shrinking.")
    importance = host.importance(prune) if issubclass(host, Host) else prune.importance
    scorer = build_scorer(importance)
    if type(scorer).slices is Scorer.slices:
        raise RecipeError(
            f"prune.host {prune.host} ranks by {importance.kind!r}, which scores batch-norm scales; a decoder "
            "language model's layers, key/value groups and MLP or hidden channels have none.",
            hint="Use host depgraph (importance magnitude, taylor, saliency or random), taylor or otov2.")


def _refuse_attention_settings(arch: Arch) -> None:
    raise RecipeError(
        f"prune.attention.heads / embed prune attention heads and embeddings of encoders; {type(arch.lm).__name__} "
        "is a decoder language model, whose heads go with their key/value group and whose hidden size is its own "
        "kind.", hint="Set prune.attention.heads and embed to false and list kv_groups (and hidden) in "
                      "prune.decoder.kinds.")


def round_half(x: float) -> int:
    """Round half up (Python's round() takes half to even)."""
    return int(math.floor(x + 0.5))
