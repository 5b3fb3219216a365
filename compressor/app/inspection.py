"""`compressor inspect`: what a model offers to prune before any time is spent on it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from compressor.app.recipe import Recipe
from compressor.models.config import ModelConfig
from compressor.models.loading import example_inputs, load_model
from compressor.prune.decoder_snapshot import is_decoder_model
from compressor.prune.op_count import count_ops
from compressor.prune import graph as dg

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Inspection:
    model: str
    input_shape: list[int]
    macs: int
    params: int
    layers: list[dict[str, Any]]
    groups: list[dg.GroupInfo]
    ignored: list[str]
    unprunable: dict[str, str]
    prediction: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)  # attention layer -> heads, head_dim or reason
    num_classes: Optional[int] = None  # the model section's (without a recipe: an hf:DIR model's own num_labels)
    # a decoder LM (prune.decoder): its structures by kind, and every layer's widths (groups lists its sites)
    decoder: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_table(model: nn.Module, example: torch.Tensor) -> tuple[int, int, list[dict[str, Any]]]:
    """Total MACs and params, and one row per parametrised leaf layer (name, type, MACs, params)."""
    macs, params, layer_macs, layer_params = count_ops(model, example, layer_wise=True)
    rows = []
    for name, module in model.named_modules():
        if not name or list(module.children()) or not any(True for _ in module.parameters(recurse=False)):
            continue
        rows.append({"name": name, "type": type(module).__name__, "macs": int(layer_macs.get(module) or 0),
                     "params": int(layer_params.get(module) or sum(p.numel() for p in module.parameters(recurse=False)))})
    return int(macs), int(params), rows


def inspect_model(model: nn.Module, model_cfg: ModelConfig, label: str = "model") -> Inspection:
    """Per-layer costs, prunable groups, ignored and unprunable layers of a model (of a decoder LM: its decoder
    structures, without tracing it: decoder_inspection)."""
    model = model.cpu().eval()
    example = example_inputs(model_cfg)
    if is_decoder_model(model):  # no op counter: it works on a deep copy (twice the weights' memory), and the
        # planner's MACs of a decoder LM are the analytic count anyway
        return decoder_inspection(model, model_cfg, example, parameter_rows(model), label)
    macs, params, rows = layer_table(model, example)
    ignored = dg.resolve_ignored(model, model_cfg.ignore, example)
    graph = dg.build_graph(model, example, ignored)
    groups = dg.prunable_groups(graph, ignored)
    names = dg.module_names(model)
    infos = [dg.describe_group(g, names) for g in groups]
    unprunable = dg.unprunable_layers(model, graph, groups, ignored)
    notes = []
    if not groups:
        notes.append("no prunable group: compress would stop with NotPrunableError")
    return Inspection(model=label, input_shape=list(model_cfg.input_shape), macs=macs, params=params, layers=rows,
                      groups=infos, ignored=[names[m] for m in ignored], unprunable=unprunable, notes=notes,
                      heads=attention_heads(model, tuple(ignored)), num_classes=model_cfg.num_classes)


def parameter_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One row per parametrised leaf layer with its parameters, MACs left at 0 (not counted)."""
    return [{"name": name, "type": type(module).__name__, "macs": 0,
             "params": sum(p.numel() for p in module.parameters(recurse=False))}
            for name, module in model.named_modules()
            if name and not list(module.children()) and any(True for _ in module.parameters(recurse=False))]


def decoder_inspection(model: nn.Module, model_cfg: ModelConfig, example: torch.Tensor,
                       rows: list[dict[str, Any]], label: str) -> Inspection:
    """A decoder LM's structures (models/decoder sites of every kind: root, width, MACs of one structure at
    model.input_shape's sequence length) and per-layer widths; MACs are the analytic count the planner uses."""
    from compressor.models.decoder import KINDS, decoder_sites, layer_widths
    from compressor.prune.decoder_snapshot import KIND_NAMES, decoder_model_macs

    seq_len = int(example.shape[-1])
    sites = decoder_sites(model, KINDS, prunable=False)
    groups = [dg.GroupInfo(root=s.root, width=s.width, coupled=[f"{KIND_NAMES[s.kind]}, {_fmt(s.macs(seq_len)[0])} "
                                                                 "MACs each"]) for s in sites]
    macs = decoder_model_macs(model, example)[0]
    widths = layer_widths(model)
    hidden = next(s.width for s in sites if s.kind == "hidden")
    notes = [f"decoder language model: prune.decoder.kinds picks among layers ({len(widths)}), kv_groups, mlp and "
             f"hidden ({hidden}); MACs are the analytic count of {seq_len} tokens (models/decoder.decoder_macs)"]
    params = sum(p.numel() for p in model.parameters())
    return Inspection(model=label, input_shape=list(model_cfg.input_shape), macs=int(macs), params=params, layers=rows,
                      groups=groups, ignored=[], unprunable={}, notes=notes, num_classes=model_cfg.num_classes,
                      decoder={"layers": len(widths), "hidden": hidden, "per_layer": widths})


def attention_heads(model: nn.Module, ignored: tuple[nn.Module, ...]) -> dict[str, dict[str, Any]]:
    """Every attention layer: its heads and head width when prune.attention.heads can remove them, else why not."""
    from compressor.prune import heads

    found: dict[str, dict[str, Any]] = {name: {"reason": reason} for name, reason in heads.unsupported_sites(model).items()}
    for site in heads.head_sites(model, prunable=False):
        found[site.name] = {"heads": site.num_heads, "head_dim": site.head_dim,
                            **({"reason": "in model.ignore"} if site.module in ignored else {})}
    return found


def inspect_checkpoint(checkpoint: str, recipe: Optional[Recipe], *, trust_checkpoint: bool = False) -> Inspection:
    model_cfg = recipe.model if recipe is not None else _model_without_recipe(str(checkpoint))
    model = load_model(checkpoint, model_cfg, trust_checkpoint=trust_checkpoint)
    report = inspect_model(model, model_cfg, label=str(checkpoint))
    if recipe is not None and recipe.prune.method != "none":
        report.prediction = predict_target(model, recipe)
    return report


def _model_without_recipe(checkpoint: str) -> ModelConfig:
    """The model section when no recipe gives one: the defaults, or for hf:DIR the model's own labels, channels and
    input size (config.json)."""
    if checkpoint.startswith("hf:"):
        from compressor.models.hf import model_section

        return ModelConfig(**model_section(checkpoint[len("hf:"):]))
    return ModelConfig()


def predict_target(model: nn.Module, recipe: Recipe) -> Optional[dict[str, Any]]:
    """What the recipe's target gives on this model (search on a copy), when the pruning hosts are installed."""
    try:
        from compressor.prune.methods.hosts import predict_pruning
    except ImportError:
        return None
    return predict_pruning(model, recipe)


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render_inspection(report: Inspection, console: Console, *, show_layers: bool = True) -> None:
    from rich.table import Table

    console.print(f"[bold]{report.model}[/]  input {report.input_shape}  classes {report.num_classes}  "
                  f"MACs {_fmt(report.macs)}  params {_fmt(report.params)}")
    if show_layers:
        table = Table("layer", "type", "MACs", "% MACs", "params", title="layers")
        for row in report.layers:  # a decoder LM's layers are not op-counted: its structures' MACs are below
            counted = not report.decoder
            table.add_row(row["name"], row["type"], _fmt(row["macs"]) if counted else "-",
                          f"{100 * row['macs'] / max(report.macs, 1):.1f}" if counted else "-", _fmt(row["params"]))
        console.print(table)
    if report.decoder:
        groups = Table("root", "width", "structures", title=f"{len(report.groups)} decoder structure sites "
                                                            "(prune.decoder)")
        widths = Table("layer", "query heads", "key/value groups", "head dim", "MLP width",
                       title=f"{report.decoder['layers']} decoder layers, hidden size {report.decoder['hidden']}")
        for i, w in enumerate(report.decoder["per_layer"]):
            widths.add_row(str(i), str(w["heads"]), str(w["kv_heads"]), str(w["head_dim"]), str(w["intermediate"]))
        console.print(widths)
    else:
        groups = Table("root layer", "width", "coupled layers", title=f"{len(report.groups)} prunable dependency groups")
    for g in report.groups:
        groups.add_row(g.root, str(g.width), ", ".join(g.coupled))
    console.print(groups)
    console.print(f"ignored (never pruned): {', '.join(report.ignored) or 'none'}")
    if report.heads:
        table = Table("attention layer", "heads", "head dim", "heads removable (prune.attention.heads)",
                      title="attention heads")
        for name, info in report.heads.items():
            table.add_row(name, str(info.get("heads", "-")), str(info.get("head_dim", "-")),
                          "no: " + info["reason"] if "reason" in info else "yes")
        console.print(table)
    if report.unprunable:
        table = Table("layer", "reason", title="layers torch-pruning cannot prune")
        for name, reason in report.unprunable.items():
            table.add_row(name, reason)
        console.print(table)
    else:
        console.print("unprunable layers: none")
    if report.prediction:
        p = report.prediction
        console.print(f"recipe target: {p.get('asked')} -> achieved MACs {p.get('macs_ratio', 0):.3f} of dense, "
                      f"params {p.get('params_ratio', 0):.3f}")
        after = p.get("decoder_widths")
        if after:
            kept = sorted({(w["heads"], w["kv_heads"], w["intermediate"]) for w in after["per_layer"]})
            console.print(f"  decoder after pruning: {after['layers']} layers, hidden {after['hidden']}, per layer "
                          + "; ".join(f"{q} query heads in {kv} key/value groups, MLP {i}" for q, kv, i in kept))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")


def render_compatibility(compat, console: Console) -> None:
    """The TensorRT compatibility check of an ONNX file: verdict, op counts and every finding with its node."""
    from rich.table import Table

    from compressor.deploy.trt_compat import TRT_MAJOR

    verdict = "[green]compatible[/]" if compat.compatible else "[red]not compatible[/]"
    console.print(f"[bold]{compat.path}[/]: opset {compat.opset}, TensorRT {TRT_MAJOR} ONNX parser: {verdict}")
    console.print("ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(compat.ops.items())))
    if compat.findings:
        table = Table("node", "op", "domain", "level", "reason", title="TensorRT findings")
        for f in compat.findings:
            table.add_row(f.node, f.op, f.domain, f.level, f.reason)
        console.print(table)
