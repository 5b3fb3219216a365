"""ONNX export of a Hugging Face causal language model with its key/value cache as explicit inputs and outputs,
optional weight-only int8/int4 quantization of its MatMuls, and a parity check of the cached decode against PyTorch.

Two exporters write the same graph contract (lm_session.py):
- "genai": onnxruntime-genai's model builder (the `llm` extra), from a save_pretrained folder. Its graph runs
  attention as onnxruntime's fused GroupQueryAttention (rotary embedding inside), the fastest on ORT. It knows the
  architectures in GENAI_ARCHITECTURES (Llama, Mistral, Qwen2/3, Phi-3 ...) and reads every width from the config,
  so it needs a model whose layers all match its config (uniform pruning). The builder finds the LM head as the
  Linear whose out_features equal the vocabulary size: an MLP exactly as wide as the vocabulary confuses it
  (checked here).
- "torch": torch.onnx.export (dynamo) of a small wrapper that takes the flat past tensors, builds the model's
  DynamicCache inside forward and returns the logits and the present tensors. It takes any module shapes, so it is
  the path for per-layer widths (layers that differ from the config) and for architectures the builder lacks
  (GPT-2); attention is exported as plain ops (slower on ORT than the builder's fused kernel: compare dense and
  pruned models exported by the same exporter; the bench reports each file's exporter).
- optimum's exporter was tried and is not used: optimum-onnx 0.1.0 requires transformers<4.58 and fails to import
  with 5.x (ImportError: cannot import name 'get_parameter_dtype' from 'transformers.modeling_utils').

`method="auto"` takes genai when the architecture is known to the builder, the layers match the config and the
builder is installed, torch otherwise.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import inspect
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from compressor.deploy.lm_session import EXPORTER_KEY, KV_SHAPES_KEY, LMSession
from compressor.errors import ExportError, ModelLoadError, ParityError, RecipeError
from compressor.extras import require

GENAI_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                 "Phi3ForCausalLM"})
METHODS = ("auto", "genai", "torch")
QUANTIZE = (None, "int8", "int4")
TORCH_OPSET = 18
GRAPH_NAME = "model.onnx"


@dataclass(frozen=True)
class LMExport:
    """What export_causal_lm wrote: `path` is the file to deploy (the quantized one when asked), `fp32_path` the
    float graph it came from; `kv_shapes` each layer's (key/value heads, head dim)."""

    path: Path
    fp32_path: Path
    method: str
    exporter: str
    quantize: Optional[str]
    opset: int
    kv_shapes: list[tuple[int, int]] = field(default_factory=list)
    note: Optional[str] = None  # why method "auto" took torch.onnx instead of the model builder

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "fp32_path": str(self.fp32_path), "method": self.method,
                "exporter": self.exporter, "quantize": self.quantize, "opset": self.opset,
                "kv_shapes": [list(s) for s in self.kv_shapes], "note": self.note}


# ---------------------------------------------------------------------------------------------- the model
def _transformers():
    return require("transformers", "hf", "Exporting a Hugging Face causal language model")


def load_causal_lm(model_or_dir: Any) -> nn.Module:
    """The model itself, or AutoModelForCausalLM.from_pretrained of a folder (ModelLoadError naming it)."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir
    folder = Path(model_or_dir)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{str(folder)!r} is not a Hugging Face model folder (no config.json).",
                             hint="Give a folder written by save_pretrained, or the model object.")
    try:
        return _transformers().AutoModelForCausalLM.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{str(folder)!r} does not load as a causal language model ({exc}).",
                             hint="Save it with save_pretrained of a *ForCausalLM model.") from exc


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5 names the cache argument `cache`; 4.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _flat(cache: Any) -> list[torch.Tensor]:
    """[key 0, value 0, key 1, value 1, ...] of a transformers Cache."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@torch.no_grad()
def cache_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Each layer's (key/value heads, head dim) as a two-token forward fills the cache: the model's real shapes,
    per-layer widths included. ExportError when the config's layer count disagrees with the model's layers."""
    model = model.eval()
    out = model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=_device(model)), use_cache=True)
    keys = [k for k in _flat(_cache_of(out))[::2] if k is not None]  # a cache built from the config has a slot
    shapes = [(int(k.shape[1]), int(k.shape[3])) for k in keys]       # for every layer it names, filled or not
    layers = getattr(model.config, "num_hidden_layers", len(shapes))
    if layers != len(shapes):
        raise ExportError(f"the model's config says num_hidden_layers={layers}, but its forward fills a key/value "
                          f"cache for {len(shapes)} layers.",
                          hint="After removing decoder layers, set config.num_hidden_layers to the number kept and "
                               "renumber each attention's layer_idx 0..N-1.")
    return shapes


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def matches_config(model: nn.Module) -> bool:
    """Whether every parameter has the shape the model's config gives it (a uniform model: save_pretrained reloads
    it with from_pretrained, and the model builder can read it); False for per-layer widths."""
    with torch.device("meta"):
        reference = type(model)(copy.deepcopy(model.config))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    return ours == theirs


def _architecture(model: nn.Module) -> str:
    return type(model).__name__


def _vocab_wide_mlp(model: nn.Module) -> Optional[str]:
    """The name of a Linear other than the LM head whose out_features equal the vocabulary size (the model builder
    would take it for the LM head), or None."""
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0])
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and module.out_features == vocab:
            return name
    return None


def _genai_installed() -> bool:
    try:
        importlib.metadata.version("onnxruntime-genai")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(folder: Optional[Path]) -> bool:
    """Whether a save_pretrained folder holds a tokenizer (the model builder loads one)."""
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES)


GQA_HEAD_MULTIPLE = 16  # ONNX Runtime 1.32's CPU GroupQueryAttention: "head_size shall be a multiple of 16"


def _head_width(model: nn.Module) -> Optional[int]:
    """The attention head width of the model's config (head_dim, else hidden_size / num_attention_heads)."""
    config = getattr(getattr(model, "hf", model), "config", None)
    width = getattr(config, "head_dim", None)
    if not width and getattr(config, "hidden_size", None) and getattr(config, "num_attention_heads", None):
        width = config.hidden_size // config.num_attention_heads
    return int(width) if width else None


def choose_method(model: nn.Module, method: str = "auto", *, tokenizer: bool = True) -> tuple[str, Optional[str]]:
    """("genai" or "torch", why not genai) for `model` (see the module docstring); `tokenizer`: whether one comes
    with the model (the model builder needs it). RecipeError for a method that can not take the model."""
    if method not in METHODS:
        raise RecipeError(f"export method {method!r} is not one of {', '.join(METHODS)}.")
    if method == "torch":
        return method, None
    reasons = []
    if _architecture(model) not in GENAI_ARCHITECTURES:
        reasons.append(f"its architecture {_architecture(model)} is not one the model builder is used for here "
                       f"({', '.join(sorted(GENAI_ARCHITECTURES))})")
    elif not matches_config(model):
        reasons.append("its layers do not all match its config (per-layer widths); the builder reads every width "
                       "from the config")
    elif (name := _vocab_wide_mlp(model)) is not None:
        reasons.append(f"{name} is exactly as wide as the vocabulary, and the builder would take it for the LM head")
    elif (width := _head_width(model)) is not None and width % GQA_HEAD_MULTIPLE:
        reasons.append(f"its head width {width} is not a multiple of {GQA_HEAD_MULTIPLE}, which ONNX Runtime's "
                       "GroupQueryAttention kernel (the builder's attention) requires: the file would build and then "
                       "fail at its first run")
    elif not tokenizer:
        reasons.append("no tokenizer comes with the model (pass tokenizer=, or a folder that holds one); the "
                       "builder loads it")
    if method == "genai" and reasons:
        raise RecipeError(f"onnxruntime-genai's model builder can not export this model: {reasons[0]}.",
                          hint='Use method="torch" (torch.onnx with the cache as explicit inputs).')
    if method == "auto" and not reasons and not _genai_installed():
        reasons.append("onnxruntime-genai (the [llm] extra) is not installed")
    if method == "auto" and reasons:
        return "torch", f"exported with torch.onnx, not the model builder: {reasons[0]}"
    return "genai", None


# ---------------------------------------------------------------------------------------------- genai
def _builder_version() -> str:
    return f"onnxruntime-genai {importlib.metadata.version('onnxruntime-genai')}"


def _export_genai(model: nn.Module, source: Optional[Path], out_dir: Path, tokenizer: Any = None) -> Path:
    """The model builder's fp32 CPU graph of `source` (a save_pretrained folder with a tokenizer; `model` and
    `tokenizer` are saved to a temporary one when there is none or a tokenizer is given). Its log goes to
    builder.log in `out_dir`."""
    builder = require("onnxruntime_genai.models.builder", "llm",
                      "Exporting a causal language model with onnxruntime-genai's model builder")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compressor-lm-")))
        if source is None or tokenizer is not None:
            source = work / "hf"
            model.save_pretrained(str(source))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(source))
        log = stack.enter_context(open(out_dir / "builder.log", "w"))
        stack.enter_context(contextlib.redirect_stdout(log))
        stack.enter_context(contextlib.redirect_stderr(log))
        args = (None, str(source), str(out_dir), "fp32", "cpu", str(work / "cache"))
        try:
            options = builder.parse_extra_options(*args, [])
            builder.create_model(*args, **options)
        except Exception as exc:  # noqa: BLE001  the builder refuses a model it does not support with a bare
            # Exception (or its not-implemented error): every failure becomes an ExportError naming its log
            raise ExportError(f"onnxruntime-genai's model builder failed on {_architecture(model)} "
                              f"({type(exc).__name__}: {exc}).",
                              hint=f'Export with method="torch"; the builder\'s log is {out_dir / "builder.log"}.') \
                from exc
    path = out_dir / GRAPH_NAME
    if not path.is_file():
        raise ExportError(f"onnxruntime-genai's model builder wrote no {GRAPH_NAME} in {out_dir}.",
                          hint=f"See {out_dir / 'builder.log'}.")
    return path


# ---------------------------------------------------------------------------------------------- torch
class CacheIO(nn.Module):
    """The model with its cache as flat tensors: forward(input_ids, attention_mask, past key 0, past value 0, ...)
    -> (logits, present key 0, present value 0, ...). A DynamicCache without config holds every position (no
    sliding window), whatever each layer's width."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers, self.keyword = model, layers, _cache_keyword(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache = _transformers().DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{self.keyword: cache})
        return (out.logits, *_flat(_cache_of(out)))


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _export_torch(model: nn.Module, shapes: list[tuple[int, int]], out_dir: Path, opset: int) -> Path:
    """torch.onnx (dynamo) export of CacheIO with dynamic batch, sequence and past axes."""
    import warnings

    path = out_dir / GRAPH_NAME
    names = past_names(len(shapes))
    batch, seq, past = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence"))
    total = torch.export.Dim("total_sequence")
    dev = _device(model)
    ids = torch.zeros((1, 3), dtype=torch.long, device=dev)
    mask = torch.ones((1, 7), dtype=torch.long, device=dev)
    dtype = next(model.parameters()).dtype
    cache = [torch.zeros((1, h, 4, d), dtype=dtype, device=dev) for h, d in shapes for _ in range(2)]
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "past": tuple({0: batch, 2: past} for _ in cache)}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(CacheIO(model, len(shapes)).eval(), (ids, mask, *cache), str(path), dynamo=True,
                              input_names=["input_ids", "attention_mask", *names],
                              output_names=["logits", *(n.replace("past_key_values", "present") for n in names)],
                              dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                              external_data=sum(p.numel() * p.element_size() for p in model.parameters()) > 2 ** 30)
    except Exception as exc:  # the exporter raises many unrelated types; all mean "this model did not export"
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ExportError(f"torch.onnx could not export {_architecture(model)} with its key/value cache "
                          f"({type(exc).__name__}: {first}).",
                          hint="The model's forward must accept a transformers DynamicCache.") from exc
    return path


# ---------------------------------------------------------------------------------------------- metadata
def _stamp(path: Path, shapes: Sequence[tuple[int, int]], exporter: str) -> int:
    """Write the cache shapes and the exporter into the graph's metadata (external data stays where it is);
    returns the graph's default-domain opset."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({KV_SHAPES_KEY: json.dumps([list(s) for s in shapes]), EXPORTER_KEY: exporter})
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# ---------------------------------------------------------------------------------------------- quantization
def quantize_weights(fp32_path: str | Path, out_path: str | Path, bits: int, *, block_size: int = 32,
                     symmetric: bool = True, accuracy_level: Optional[int] = None) -> Path:
    """Weight-only quantization of every MatMul with a constant weight to MatMulNBits (onnxruntime's
    matmul_nbits_quantizer): `bits` 4 or 8, one scale per `block_size` weights along the input axis. Activations
    stay float; `accuracy_level` 4 lets the CPU kernel compute in int8 (faster, a little less exact), None
    onnxruntime's default (float compute). The metadata of the float graph is kept."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    import onnx

    if bits not in (4, 8):
        raise RecipeError(f"weight-only quantization takes 4 or 8 bits, not {bits}.")
    if block_size < 16 or block_size & (block_size - 1):
        raise RecipeError(f"the quantization block size must be a power of two of at least 16, not {block_size}.")
    model = onnx.load(str(fp32_path))
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
                                          bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",),
                                     algo_config=config)
    quantizer.process()
    if not any(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node):
        raise ExportError(f"{Path(fp32_path).name} has no MatMul with a constant weight to quantize.")
    out_path = Path(out_path)
    large = quantizer.model.model.ByteSize() > 2 ** 30
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=large)
    return out_path


# ---------------------------------------------------------------------------------------------- export
def export_causal_lm(model_or_dir: Any, out_dir: str | Path, *, opset: Optional[int] = None,
                     quantize: Optional[str] = None, block_size: int = 32, accuracy_level: Optional[int] = None,
                     method: str = "auto", tokenizer: Any = None) -> LMExport:
    """Export a causal LM (the model, or its save_pretrained folder) to `out_dir`/model.onnx with past key/values
    in and present key/values out (lm_session.py's contract), and with `quantize` "int8" / "int4" also
    model.int8.onnx / model.int4.onnx (weight-only MatMulNBits, see quantize_weights). `opset`: the torch
    exporter's (default 18); the model builder writes its own, and asking it for another is a RecipeError.
    `tokenizer`: the model's (saved beside it for the model builder, which needs one; a folder may hold it)."""
    if quantize not in QUANTIZE:
        raise RecipeError(f"quantize {quantize!r} is not one of none, int8, int4.")
    source = None if isinstance(model_or_dir, nn.Module) else Path(model_or_dir)
    model = load_causal_lm(model_or_dir).eval()
    chosen, note = choose_method(model, method, tokenizer=tokenizer is not None or has_tokenizer(source))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = cache_shapes(model)
    if chosen == "genai":
        path, exporter = _export_genai(model, source, out_dir, tokenizer), _builder_version()
    else:  # in float32 like the builder's graph (a float copy of a bf16 / fp16 model)
        floats = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
        path = _export_torch(floats, shapes, out_dir, opset or TORCH_OPSET)
        exporter = f"torch.onnx {torch.__version__}"
    written = _stamp(path, shapes, exporter)
    if opset is not None and written != opset:
        raise RecipeError(f"onnxruntime-genai's model builder writes opset {written}, not the {opset} asked for.",
                          hint='Leave the opset unset, or export with method="torch".')
    final = path
    if quantize is not None:
        bits = 4 if quantize == "int4" else 8
        final = quantize_weights(path, out_dir / f"model.{quantize}.onnx", bits, block_size=block_size,
                                 accuracy_level=accuracy_level)
    return LMExport(final, path, chosen, exporter, quantize, written, list(shapes), note)


# ---------------------------------------------------------------------------------------------- parity
@torch.no_grad()
def _torch_decode(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[list[np.ndarray], list[int]]:
    """PyTorch's logits of the prefill and of `steps` cached greedy steps, and the tokens it chose."""
    keyword = _cache_keyword(model)
    out = model(input_ids=prompt, use_cache=True)
    logits, tokens = [out.logits.float().cpu().numpy()[0]], []
    for _ in range(steps):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]], device=prompt.device), use_cache=True,
                    **{keyword: _cache_of(out)})
        logits.append(out.logits.float().cpu().numpy()[0])
    return logits, tokens


def _onnx_decode(session: LMSession, prompt: np.ndarray, tokens: Sequence[int]) -> list[np.ndarray]:
    """The ONNX graph's logits for the same prefill and the same tokens, one cached step each."""
    logits, cache = session.run(prompt, session.empty_cache(1))
    runs = [logits[0]]
    for token in tokens:
        logits, cache = session.run(np.array([[token]]), cache)
        runs.append(logits[0])
    return runs


def verify_kv_parity(torch_model: nn.Module, onnx_path: str | Path, *, prompt_lengths: Sequence[int] = (8, 32),
                     steps: int = 4, rtol: float = 1e-3, atol: float = 1e-5, seed: int = 0,
                     backend: str = "ort-cpu") -> dict[str, Any]:
    """Prefill + `steps` cached decode steps on ONNX Runtime against PyTorch, at every prompt length (seeded random
    token ids): the ONNX graph is fed the tokens PyTorch chose greedily, and every position's logits are compared.
    Passes when max |difference| <= atol + rtol x max |PyTorch logits| at every length; ParityError otherwise.
    Returns the max abs / relative difference, the top-1 agreement of all compared positions and whether greedy
    decoding on ONNX would choose PyTorch's tokens, per length and overall."""
    if not prompt_lengths or min(prompt_lengths) < 1 or steps < 0:
        raise RecipeError("verify_kv_parity needs prompt lengths of at least 1 token and steps >= 0.")
    model = torch_model.eval()
    session = LMSession.open(onnx_path, backend)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    rng = np.random.default_rng(seed)
    per_length = []
    try:
        for length in prompt_lengths:
            prompt = rng.integers(0, vocab, (1, int(length)))
            reference, tokens = _torch_decode(model, torch.as_tensor(prompt, device=_device(model)), steps)
            candidate = _onnx_decode(session, prompt, tokens)
            ref, cand = np.concatenate(reference), np.concatenate(candidate).astype(np.float64)
            diff = np.abs(ref - cand)
            scale = float(np.abs(ref).max())
            worst = int(diff.max(axis=1).argmax())
            per_length.append({
                "prompt_length": int(length), "steps": steps, "max_abs_diff": float(diff.max()),
                "max_abs_reference": scale, "relative_diff": float(diff.max()) / scale if scale > 0 else None,
                "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
                "same_greedy_tokens": bool(all(int(c[-1].argmax()) == t for c, t in zip(candidate, tokens))),
                "worst_position": "prefill" if worst < length else f"decode step {worst - int(length) + 1}",
                "allowed_abs_diff": atol + rtol * scale})
    finally:
        session.close()
    worst = max(per_length, key=lambda r: r["max_abs_diff"] / r["allowed_abs_diff"])
    result = {**{k: worst[k] for k in ("max_abs_diff", "relative_diff", "max_abs_reference", "allowed_abs_diff")},
              "top1_agreement": min(r["top1_agreement"] for r in per_length),
              "same_greedy_tokens": all(r["same_greedy_tokens"] for r in per_length),
              "rtol": rtol, "atol": atol, "exporter": session.exporter, "artifact": Path(onnx_path).name,
              "per_length": per_length}
    result["passed"] = all(r["max_abs_diff"] <= r["allowed_abs_diff"] for r in per_length)
    if not result["passed"]:
        raise ParityError(
            f"{Path(onnx_path).name} disagrees with the PyTorch model when decoding with its key/value cache: at "
            f"prompt length {worst['prompt_length']} ({worst['worst_position']}) the logits differ by up to "
            f"{worst['max_abs_diff']:.3g} (allowed {worst['allowed_abs_diff']:.3g} = atol {atol:g} + rtol {rtol:g} x "
            f"max |logit| {worst['max_abs_reference']:.3g}).",
            hint="The export is not verified; a quantized file needs a looser rtol, a float one points at an "
                 "exporter problem (compare method=\"torch\" with method=\"genai\").")
    return result
