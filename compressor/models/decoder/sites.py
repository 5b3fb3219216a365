"""The planner's view of a decoder LM's structures (DecoderSite), their MACs, and removing a plan of them.

Sites and their roots (the names plans use; `model.` is the LM's base model prefix, `transformer.` for GPT-2, with the
path of the LM in front when a wrapper holds it):
- `model.layers:layers`: the decoder layers (depth); structure i is layer i. One site for all layers, so that a
  ratio of the layers and scores normalised within a candidate compare layers with each other.
- `model.layers.3.self_attn:kv_groups`: layer 3's key/value groups (a key/value head and its query heads).
- `model.layers.3.mlp:channels`: layer 3's MLP intermediate channels.
- `:hidden`: the residual stream's channels, shared by every layer.

slices(out_only) gives (Slice, structure of each index) pairs as prune/heads.HeadSite does, so the importance scorers'
slices() (magnitude, taylor, saliency, random) rank them and DPM's decay (prune/slices.scale_channels) shrinks them.
out_only keeps the tensors that define a structure's output: q/k/v rows (and biases) of a group, gate/up rows of a
channel, the embedding columns, output-projection rows and norm entries of a hidden channel; out_only=False adds
the consumers (o_proj columns, down_proj columns, the projections' input columns, an untied LM head's columns).
A layer's out_only slices are its residual branches' outputs, o_proj and down_proj rows and biases (GPT-2: both
c_proj's): each layer adds them to the residual stream, so scaled to zero the layer is the identity and removing it
changes nothing (what DPM's decay converges to); out_only=False adds every other tensor of the layer.

MACs (decoder_macs; multiply-accumulates for one sequence of L tokens, as in training or a prefill, batch 1):
  per layer  L*H*d*(q + 2*kv)        q/k/v projections (H hidden size, d head width, q query heads, kv key/value heads)
           + L*q*d*H                 output projection
           + 2*L*L*q*d               attention scores Q.K^T and their weighted sum of V over L keys (query heads)
           + m*L*H*I                 MLP (I its width; m = 3 gate/up/down, GPT-2 m = 2 fc/proj)
  model      sum over layers + L*H*V LM head (logits at every position; V the vocabulary)
Norms, activations, the softmax, rotary embeddings and embedding lookups are not counted (no multiply-accumulates
of weights; a few per element). Projections scale with the structures kept on both of their sides, the attention
matmuls with the query heads kept, so the cost of one structure at the current widths (DecoderSite.macs) is:
  key/value group: L*d*(H*(2*n_rep + 2) + 2*L*n_rep)     MLP channel: m*L*H
  hidden channel:  L*(sum over layers of d*(2q + 2kv) + m*I) + L*V     layer i: that layer's MACs
Removing several kinds interacts (a hidden channel costs less once heads are gone); decoder_macs(model, L, plan)
evaluates the formula at the widths the plan leaves, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from torch import nn

from compressor.errors import NotPrunableError
from compressor.models.decoder import surgery
from compressor.models.decoder.arch import Arch, arch_of
from compressor.structure_slice import Slice

KINDS = ("layers", "kv_groups", "mlp", "hidden")
SUFFIX = {"layers": ":layers", "kv_groups": ":kv_groups", "mlp": ":channels", "hidden": ":hidden"}


def is_decoder_root(root: Optional[str]) -> bool:
    return root is not None and any(root.endswith(s) for s in SUFFIX.values())


@dataclass
class DecoderSite:
    """One set of structures of a decoder LM: its root name, kind and (for kv_groups and mlp) its layer module."""

    arch: Arch
    kind: str
    layer: Optional[nn.Module] = None  # the decoder layer (kv_groups, mlp), followed by identity across removals

    @property
    def index(self) -> int:
        """The layer's current index (kv_groups, mlp)."""
        return self.arch.index_of(self.layer)

    @property
    def root(self) -> str:
        a, p = self.arch, self.arch.prefix
        if self.kind == "layers":
            return f"{p}{a.layers_path}:layers"
        if self.kind == "hidden":
            return f"{p.rstrip('.')}:hidden"
        sub = a.attn_name if self.kind == "kv_groups" else a.mlp_name
        return f"{p}{a.layers_path}.{self.index}.{sub}{SUFFIX[self.kind]}"

    @property
    def width(self) -> int:
        a = self.arch
        if self.kind == "layers":
            return len(a.layers)
        if self.kind == "hidden":
            return a.hidden()
        return a.kv_heads(self.index) if self.kind == "kv_groups" else a.inter(self.index)

    def slices(self, out_only: bool = True) -> list[tuple[Slice, list[int]]]:
        """(Slice, structure of each index) pairs of every structure of the site (see the module docstring)."""
        a = self.arch
        if self.kind == "layers":
            return [pair for i in range(len(a.layers)) for pair in _layer_slices(a, i, out_only)]
        tensors = (a.hidden_tensors() if self.kind == "hidden" else
                   a.kv_tensors(self.index) if self.kind == "kv_groups" else a.mlp_tensors(self.index))
        return [(Slice(getattr(owner, attr), dim, list(range(len(of))), output), of)
                for owner, attr, dim, of, output in tensors if output or not out_only]

    def macs(self, seq_len: int) -> list[float]:
        """MACs each structure costs at the current widths for one sequence of seq_len tokens (its removal saves
        that much while nothing else changes)."""
        total = _widths(self.arch).macs(seq_len)
        if self.kind == "layers":
            return [total - _widths(self.arch, {self.root: [i]}).macs(seq_len) for i in range(self.width)]
        return [total - _widths(self.arch, {self.root: [0]}).macs(seq_len)] * self.width

    def remove(self, idxs: Iterable[int]) -> None:
        lm = self.arch.lm
        if self.kind == "layers":
            surgery.remove_layers(lm, idxs)
        elif self.kind == "hidden":
            surgery.remove_hidden_channels(lm, idxs)
        elif self.kind == "kv_groups":
            surgery.remove_kv_groups(lm, self.index, idxs)
        else:
            surgery.remove_mlp_channels(lm, self.index, idxs)


def _layer_slices(arch: Arch, i: int, out_only: bool) -> list[tuple[Slice, list[int]]]:
    outputs = {(id(owner), attr): dim for owner, attr, dim in arch.layer_outputs(i)}
    pairs = []
    for module in arch.layers[i].modules():
        for attr, param in module.named_parameters(recurse=False):
            output = (id(module), attr) in outputs
            if out_only and not output:
                continue
            dim = outputs.get((id(module), attr), 0)
            pairs.append((Slice(param, dim, list(range(param.shape[dim])), output), [i] * param.shape[dim]))
    return pairs


def decoder_sites(model: nn.Module, kinds: Iterable[str] = KINDS, *, prunable: bool = True) -> list[DecoderSite]:
    """The sites of `kinds` (KINDS) of the decoder LM `model` is or holds; with prunable, those with more than one
    structure (a site keeps at least one)."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown decoder structure kinds {unknown}; known: {list(KINDS)}")
    return _sites(arch_of(model), kinds, prunable)


def _sites(arch: Arch, kinds: Iterable[str] = KINDS, prunable: bool = True) -> list[DecoderSite]:
    found = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        if kind in ("layers", "hidden"):
            found.append(DecoderSite(arch, kind))
        else:
            found += [DecoderSite(arch, kind, layer) for layer in arch.layers]
    return [s for s in found if not prunable or s.width > 1]


def site_of(model: nn.Module, root: str) -> DecoderSite:
    """The site named `root` (DecoderSite.root) in the current model."""
    return _site_of(arch_of(model), root)


def _site_of(arch: Arch, root: str) -> DecoderSite:
    for site in _sites(arch, prunable=False):
        if site.root == root:
            return site
    raise NotPrunableError(f"{root!r} names no decoder structure of this model; roots are '<layers>:layers', "
                           "'<layer>.<attention>:kv_groups', '<layer>.<mlp>:channels' and ':hidden'.")


def remove_plan(model: nn.Module, plan: dict[str, list[int]]) -> int:
    """Remove a plan {root: structure indices} of decoder roots; returns the count removed. Every root is resolved
    before anything changes (removing layers renumbers them): widths first, then the hidden size, then layers."""
    sites = [(site_of(model, root), list(idxs)) for root, idxs in plan.items() if idxs]
    order = {"kv_groups": 0, "mlp": 0, "hidden": 1, "layers": 2}
    removed = 0
    for site, idxs in sorted(sites, key=lambda pair: order[pair[0].kind]):
        site.remove(idxs)
        removed += len(set(idxs))
    return removed


# ---------------------------------------------------------------------------------------------- MACs
@dataclass
class _Layer:
    q: int
    kv: int
    d: int
    inter: int


@dataclass
class Widths:
    """The widths the MAC formula reads (widths_of), optionally after a plan."""

    hidden: int
    vocab: int
    mlp_factor: int  # 3 gated (gate, up, down), 2 GPT-2 (fc, proj)
    layers: list[_Layer] = field(default_factory=list)

    def macs(self, seq_len: int) -> float:
        L, H = float(seq_len), float(self.hidden)
        per_layer = sum(L * H * w.d * (w.q + 2 * w.kv) + L * w.q * w.d * H + 2 * L * L * w.q * w.d
                        + self.mlp_factor * L * H * w.inter for w in self.layers)
        return per_layer + L * H * self.vocab


def widths_of(model: nn.Module, plan: Optional[dict[str, list[int]]] = None) -> Widths:
    """The current widths, or those `plan` (decoder roots only) leaves."""
    return _widths(arch_of(model), plan)


def _widths(arch: Arch, plan: Optional[dict[str, list[int]]] = None) -> Widths:
    head = arch.lm_head()
    vocab = head.out_features if head is not None else 0
    layers = [_Layer(arch.q_heads(i), arch.kv_heads(i), arch.head_dim(i), arch.inter(i))
              for i in range(len(arch.layers))]
    widths = Widths(arch.hidden(), vocab, 3 if arch.gated else 2, layers)
    if not plan:
        return widths
    gone: set[int] = set()
    for root, idxs in plan.items():
        n = len(set(idxs))
        if not n:
            continue
        site = _site_of(arch, root)
        if site.kind == "layers":
            gone |= {int(i) for i in idxs}
        elif site.kind == "hidden":
            widths.hidden -= n
        elif site.kind == "kv_groups":
            w = layers[site.index]
            w.kv, w.q = w.kv - n, w.q - n * arch.n_rep(site.index)
        else:
            layers[site.index].inter -= n
    widths.layers = [w for i, w in enumerate(layers) if i not in gone]
    return widths


def decoder_macs(model: nn.Module, seq_len: int, plan: Optional[dict[str, list[int]]] = None) -> float:
    """MACs of one sequence of seq_len tokens through the decoder LM (module docstring's formula), now or after
    `plan`."""
    return widths_of(model, plan).macs(seq_len)
