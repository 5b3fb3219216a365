"""Where a Hugging Face decoder language model keeps the tensors of each prunable structure (Arch), per family.

Families (config.model_type):
- `llama`: Llama, Mistral, Qwen2, Qwen3 — separate q/k/v/o projections (grouped-query attention, Qwen2's q/k/v
  biases, Qwen3's q_norm/k_norm over the head width, which losing heads leaves alone), gate/up/down MLP, RMSNorm.
- `phi3`: Phi-3 — one packed qkv_proj (rows [q heads | k heads | v heads]) and one packed gate_up_proj (rows
  [gate | up]), RMSNorm.
- `gpt2`: GPT-2 — a packed c_attn Conv1D (columns [q | k | v], multi-head attention: every head is its own key/value
  group), c_fc / c_proj Conv1D (weights stored transposed, [in, out]), LayerNorm, learned position embeddings.

Each family lists its tensors as (owner module, attribute, dim, structure of each index along dim, output): output
tensors define a structure's contribution (producer rows, their biases, norm affine entries), the others read it
(consumer input columns). Widths are read from the tensors, so a model whose layers lost different amounts of
heads or channels is described correctly; attributes forward() reads are set after each change (set_*).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from compressor.errors import NotPrunableError

FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "phi3", "gpt2": "gpt2"}
SUPPORTED_TEXT = ("Llama, Mistral, Qwen2, Qwen3 (model_type llama, mistral, qwen2, qwen3), Phi-3 (phi3) and GPT-2 "
                  "(gpt2) causal language models of transformers")

Tensor = tuple[nn.Module, str, int, list[int], bool]  # owner, attribute, dim, structure of each index, output


def _linear(owner: nn.Module, of: list[int], rows: bool = True) -> list[Tensor]:
    """An nn.Linear's rows (its weight's dim 0 and its bias) or its input columns (dim 1)."""
    if not rows:
        return [(owner, "weight", 1, of, False)]
    return [(owner, "weight", 0, of, True)] + ([(owner, "bias", 0, of, True)] if owner.bias is not None else [])


def _conv1d(owner: nn.Module, of: list[int], outputs: bool = True) -> list[Tensor]:
    """transformers' Conv1D (weight [in, out]): its output columns (weight dim 1 and bias) or its input rows."""
    if not outputs:
        return [(owner, "weight", 0, of, False)]
    return [(owner, "weight", 1, of, True), (owner, "bias", 0, of, True)]


class Arch:
    """A supported causal LM `lm` (its HF object) found at `prefix` inside the model the caller holds."""

    family = "llama"
    layers_name, attn_name, mlp_name = "layers", "self_attn", "mlp"
    heads_key, kv_key, inter_key, hidden_key, layers_key = ("num_attention_heads", "num_key_value_heads",
                                                           "intermediate_size", "hidden_size", "num_hidden_layers")
    gated = True  # gate * up MLP (3 projections) rather than fc -> act -> proj (2)
    explicit_head_dim = True  # the modeling code reads config.head_dim (else head width = hidden / heads)

    def __init__(self, lm: nn.Module, prefix: str = "") -> None:
        self.lm, self.prefix = lm, prefix
        inner = getattr(lm, getattr(lm, "base_model_prefix", ""), None)  # LlamaForCausalLM.model, or the base model
        self.base_path = lm.base_model_prefix if isinstance(inner, nn.Module) and inner is not lm else ""
        self.layers_path = f"{self.base_path}.{self.layers_name}" if self.base_path else self.layers_name

    # ------------------------------------------------------------------ modules
    @property
    def config(self):
        return self.lm.config

    @property
    def base(self) -> nn.Module:
        return self.lm.get_submodule(self.base_path)

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.get_submodule(self.layers_path)

    @layers.setter
    def layers(self, value: nn.ModuleList) -> None:
        owner, _, attr = self.layers_path.rpartition(".")
        setattr(self.lm.get_submodule(owner), attr, value)

    def attn(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.attn_name)

    def mlp(self, i: int) -> nn.Module:
        return getattr(self.layers[i], self.mlp_name)

    def index_of(self, module: nn.Module) -> int:
        """The index of the decoder layer that is or holds `module`."""
        layers = list(self.layers)
        for i, layer in enumerate(layers):  # the layer itself (what sites hold) first, its submodules only then
            if module is layer:
                return i
        for i, layer in enumerate(layers):
            if any(m is module for m in layer.modules()):
                return i
        raise NotPrunableError(f"{type(module).__name__} is not part of a decoder layer of this model (any more).")

    def embeddings(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def lm_head(self) -> Optional[nn.Module]:
        head = self.lm.get_output_embeddings() if hasattr(self.lm, "get_output_embeddings") else None
        return head if isinstance(head, nn.Linear) else None

    def tied(self) -> bool:
        head = self.lm_head()
        return head is not None and head.weight is self.embeddings().weight

    # ------------------------------------------------------------------ widths
    def head_dim(self, i: int) -> int:
        return int(self.attn(i).head_dim)

    def n_rep(self, i: int) -> int:
        return int(self.attn(i).num_key_value_groups)

    def kv_heads(self, i: int) -> int:
        return self.attn(i).k_proj.out_features // self.head_dim(i)

    def q_heads(self, i: int) -> int:
        return self.kv_heads(i) * self.n_rep(i)

    def inter(self, i: int) -> int:
        return self.mlp(i).gate_proj.out_features

    def hidden(self) -> int:
        return self.embeddings().weight.shape[1]

    # ------------------------------------------------------------------ tensors
    def kv_tensors(self, i: int) -> list[Tensor]:
        """The tensors of layer i's key/value groups: a group is one key/value head with its n_rep query heads."""
        attn, d, rep = self.attn(i), self.head_dim(i), self.n_rep(i)
        q = [(r // d) // rep for r in range(self.q_heads(i) * d)]
        kv = [r // d for r in range(self.kv_heads(i) * d)]
        return (_linear(attn.q_proj, q) + _linear(attn.k_proj, kv) + _linear(attn.v_proj, kv)
                + _linear(attn.o_proj, q, rows=False))

    def mlp_tensors(self, i: int) -> list[Tensor]:
        mlp, width = self.mlp(i), list(range(self.inter(i)))
        return _linear(mlp.gate_proj, width) + _linear(mlp.up_proj, width) + _linear(mlp.down_proj, width, rows=False)

    def layer_readers(self, i: int) -> list[nn.Module]:
        """Layer i's projections that read the residual stream (their input columns are hidden channels)."""
        attn, mlp = self.attn(i), self.mlp(i)
        return [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]

    def layer_writers(self, i: int) -> list[nn.Module]:
        """Layer i's projections that write the residual stream: their outputs are the layer's residual branches."""
        return [self.attn(i).o_proj, self.mlp(i).down_proj]

    def layer_norms(self, i: int) -> list[nn.Module]:
        layer = self.layers[i]
        return [layer.input_layernorm, layer.post_attention_layernorm]

    def final_norm(self) -> nn.Module:
        return self.base.norm

    def hidden_tensors(self) -> list[Tensor]:
        """Every tensor the residual stream (hidden channels) runs along, channel c at index c."""
        width = list(range(self.hidden()))
        found: list[Tensor] = [(self.embeddings(), "weight", 1, width, True)]
        for i in range(len(self.layers)):
            found += [t for norm in self.layer_norms(i) for t in self._norm(norm, width)]
            found += [t for m in self.layer_readers(i) for t in self._reader(m, width)]
            found += [t for m in self.layer_writers(i) for t in self._writer(m, width)]
        found += self._norm(self.final_norm(), width)
        head = self.lm_head()
        if head is not None and not self.tied():  # a tied head is the embedding's tensor, listed once
            found += self._reader(head, width)
        return found

    def layer_outputs(self, i: int) -> list[tuple[nn.Module, str, int]]:
        """The residual branches' output tensors of layer i (scaled to 0, the layer is the identity)."""
        return [(owner, attr, dim) for m in self.layer_writers(i) for owner, attr, dim, _, _ in self._writer(m, [0])]

    def _norm(self, norm: nn.Module, width: list[int]) -> list[Tensor]:
        return [(norm, attr, 0, width, True) for attr in ("weight", "bias") if getattr(norm, attr, None) is not None]

    def _reader(self, module: nn.Module, width: list[int]) -> list[Tensor]:
        return _linear(module, width, rows=False)

    def _writer(self, module: nn.Module, width: list[int]) -> list[Tensor]:
        return _linear(module, width)

    # ------------------------------------------------------------------ attributes forward() reads
    def set_kv(self, i: int) -> None:
        """After layer i's kv tensors changed width (num_key_value_groups does not change: groups go whole)."""
        attn = self.attn(i)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = self.kv_heads(i)

    def set_inter(self, i: int) -> None:
        mlp = self.mlp(i)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = self.inter(i)

    def set_hidden(self) -> None:
        width = self.hidden()
        for module in self.lm.modules():
            if isinstance(getattr(module, "hidden_size", None), int):
                module.hidden_size = width


class Phi3Arch(Arch):
    family = "phi3"

    def kv_heads(self, i: int) -> int:  # qkv_proj rows: (n_rep + 2) x kv heads x head_dim
        return self.attn(i).qkv_proj.out_features // ((self.n_rep(i) + 2) * self.head_dim(i))

    def inter(self, i: int) -> int:
        return self.mlp(i).down_proj.in_features

    def kv_tensors(self, i: int) -> list[Tensor]:
        attn, d, rep, kv = self.attn(i), self.head_dim(i), self.n_rep(i), self.kv_heads(i)
        q = [(r // d) // rep for r in range(kv * rep * d)]
        k = [r // d for r in range(kv * d)]
        return _linear(attn.qkv_proj, q + k + k) + _linear(attn.o_proj, q, rows=False)

    def mlp_tensors(self, i: int) -> list[Tensor]:
        mlp, width = self.mlp(i), list(range(self.inter(i)))
        return _linear(mlp.gate_up_proj, width + width) + _linear(mlp.down_proj, width, rows=False)

    def layer_readers(self, i: int) -> list[nn.Module]:
        return [self.attn(i).qkv_proj, self.mlp(i).gate_up_proj]


class GPT2Arch(Arch):
    family = "gpt2"
    layers_name, attn_name, mlp_name = "h", "attn", "mlp"
    heads_key, kv_key, inter_key, hidden_key, layers_key = "n_head", None, "n_inner", "n_embd", "n_layer"
    gated, explicit_head_dim = False, False

    def n_rep(self, i: int) -> int:
        return 1

    def kv_heads(self, i: int) -> int:
        return self.attn(i).c_attn.weight.shape[1] // (3 * self.head_dim(i))

    def inter(self, i: int) -> int:
        return self.mlp(i).c_fc.weight.shape[1]

    def kv_tensors(self, i: int) -> list[Tensor]:
        attn, d, heads = self.attn(i), self.head_dim(i), self.kv_heads(i)
        inner = [r // d for r in range(heads * d)]
        return _conv1d(attn.c_attn, inner * 3) + _conv1d(attn.c_proj, inner, outputs=False)

    def mlp_tensors(self, i: int) -> list[Tensor]:
        mlp, width = self.mlp(i), list(range(self.inter(i)))
        return _conv1d(mlp.c_fc, width) + _conv1d(mlp.c_proj, width, outputs=False)

    def layer_readers(self, i: int) -> list[nn.Module]:
        return [self.attn(i).c_attn, self.mlp(i).c_fc]

    def layer_writers(self, i: int) -> list[nn.Module]:
        return [self.attn(i).c_proj, self.mlp(i).c_proj]

    def layer_norms(self, i: int) -> list[nn.Module]:
        return [self.layers[i].ln_1, self.layers[i].ln_2]

    def final_norm(self) -> nn.Module:
        return self.base.ln_f

    def hidden_tensors(self) -> list[Tensor]:
        width = list(range(self.hidden()))
        return [(self.base.wpe, "weight", 1, width, True)] + super().hidden_tensors()

    def _reader(self, module: nn.Module, width: list[int]) -> list[Tensor]:
        return _conv1d(module, width, outputs=False) if is_conv1d(module) else super()._reader(module, width)

    def _writer(self, module: nn.Module, width: list[int]) -> list[Tensor]:
        return _conv1d(module, width) if is_conv1d(module) else super()._writer(module, width)

    def set_kv(self, i: int) -> None:
        attn = self.attn(i)
        attn.num_heads = self.kv_heads(i)
        attn.split_size = attn.num_heads * attn.head_dim

    def set_hidden(self) -> None:
        width = self.hidden()
        self.base.embed_dim = width
        for i in range(len(self.layers)):
            self.attn(i).embed_dim = width


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


ARCHES = {"llama": Arch, "phi3": Phi3Arch, "gpt2": GPT2Arch}


def arch_of(model: nn.Module) -> Arch:
    """The Arch of the supported causal LM that `model` is or holds (outermost first); NotPrunableError naming the
    supported families otherwise."""
    found = None
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(module, "base_model_prefix") or not hasattr(config, "model_type"):
            continue  # not a transformers PreTrainedModel
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise NotPrunableError(
                f"{type(module).__name__} (model_type {config.model_type!r}) is not a decoder language model whose "
                f"layers, attention heads, MLP width or hidden size this version can remove; supported: "
                f"{SUPPORTED_TEXT}.")
        found = (name, module, family)
        break
    if found is None:
        raise NotPrunableError(f"{type(model).__name__} is not a Hugging Face causal language model; decoder "
                               f"structure pruning supports {SUPPORTED_TEXT}.")
    name, lm, family = found
    arch = ARCHES[family](lm, f"{name}." if name else "")
    _check_supported(arch)
    return arch


def _check_supported(arch: Arch) -> None:
    config, lm = arch.config, arch.lm
    what = f"{type(lm).__name__} ({config.model_type})"
    try:
        layers = arch.layers
    except AttributeError:
        raise NotPrunableError(f"{what} has no decoder layers at {arch.layers_path}; decoder structure pruning "
                               f"supports {SUPPORTED_TEXT} (the *ForCausalLM classes or their base models).") from None
    if getattr(config, "add_cross_attention", False):
        raise NotPrunableError(f"{what} has cross-attention layers (add_cross_attention); decoder structure pruning "
                               "supports decoder-only language models.")
    if getattr(config, "is_heterogeneous", False):
        raise NotPrunableError(f"{what} has a heterogeneous config (per_layer_config), which decoder structure "
                               "pruning does not change consistently yet.")
    if len(layers) == 0:
        raise NotPrunableError(f"{what} has no decoder layers.")
