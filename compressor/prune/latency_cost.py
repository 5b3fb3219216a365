"""A latency table (`compressor latency-table`, deploy/latency_table.py) as the planner's cost model
(docs/planning.md, "Planning from a latency table").

Every conv / linear layer of the torch model is matched to a table row by what its latency depends on: operator,
input shape, weight shape and attributes (stride, padding, dilation, groups). Layers with the same signature have
the same latency curve, so matching by signature instead of by name makes a table valid for every checkpoint of
one architecture and refuses one made for another (a layer the table has no row for is a usage error).

The predicted latency of a plan is the sum over matched layers of curve(kept outputs) x kept inputs / dense inputs
(a depthwise conv's inputs are its outputs: prune/layer_cost.py, the rule the MAC planner uses too), plus the rest
of the model (the table's end-to-end dense measurement minus its layers: activations, pooling, layout conversions),
held fixed. The planner then
- reads a MAC budget fraction f as f x the predicted dense latency (so every method's schedule works unchanged),
- ranks channels by importance per millisecond. A channel's importance is its group-normalised score times the
  MACs it carries (summed over the layers its group narrows): normalised scores only rank channels within a
  group, and a residual-stream channel that feeds seven convolutions carries more of the network than one inside
  a block. Its cost is the milliseconds it takes (the curve's slope over its lower half, summed over the same
  layers, inputs included). Where latency follows MACs the ranking is the MAC planner's; it departs from it where
  the table says a layer's time does not. Removing the lowest ratios first is the greedy solution of the knapsack
  "keep the most importance within the budget", optimal for its linear relaxation and within one width step of
  one group of the integer optimum, a step the closed measure-prune loop corrects,
- lets each group keep only the widths where its latency steps down (the Pareto front of the curve: a width whose
  latency is within STEP_EPS of a wider one's buys nothing), instead of a fixed round_to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

from compressor.deploy.latency_table import layer_factors, probe_ms
from compressor.errors import UsageError
from compressor.prune.heads import is_head_root
from compressor.prune.layer_cost import LayerDims, channel_share, input_factor

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compressor.prune.snapshot import Plan, Snapshot

STEP_EPS = 0.02  # a narrower width must be at least 2% faster than the next wider kept one to be worth keeping


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def row_signature(row: dict[str, Any]) -> tuple:
    """What a table row's latency depends on, in the form layer_signatures gives a torch layer."""
    attributes = row.get("attributes", {})
    shape, weight = _ints(row["input_shape"]), _ints(row["weight_shape"])
    if row["op"] == "Conv":
        k = len(weight) - 2
        pads = _ints(attributes.get("pads", [0] * 2 * k))
        return ("conv", shape, weight, _ints(attributes.get("strides", [1] * k)), pads,
                _ints(attributes.get("dilations", [1] * k)), int(attributes.get("group", 1)))
    if row["op"] == "Gemm" and int(attributes.get("transB", 0)):
        weight = (weight[1], weight[0])
    return ("linear", shape, weight)  # (in, out)


def _module_signature(module: "nn.Module", input_shape: tuple[int, ...]) -> Optional[tuple]:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return None  # 'same' / reflect padding export as other nodes
        pads = _ints(module.padding) * 2  # onnx: all begins, then all ends
        return ("conv", input_shape, _ints(module.weight.shape), _ints(module.stride), pads,
                _ints(module.dilation), int(module.groups))
    if isinstance(module, nn.Linear):
        return ("linear", input_shape, (module.in_features, module.out_features))
    return None


def layer_signatures(model: "nn.Module", example: "torch.Tensor") -> dict[str, tuple]:
    """{module name: signature} of every conv / linear layer the example's forward runs (input shape without batch)."""
    import torch
    from compressor.prune import graph as dg

    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        def hook(_m, inputs, _name=name):
            if inputs and isinstance(inputs[0], torch.Tensor):
                shapes.setdefault(_name, tuple(inputs[0].shape[1:]))
        if _module_signature(module, (0,)) is not None:
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with dg.quiet_eval(model), torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    return {name: sig for name, shape in shapes.items() if (sig := _module_signature(modules[name], shape))}


def describe(signature: tuple) -> str:
    if signature[0] == "conv":
        _, shape, weight, stride, _, _, groups = signature
        kernel = "x".join(map(str, weight[2:]))
        return (f"conv {weight[1] * groups}->{weight[0]} {kernel} stride {','.join(map(str, stride))}"
                f"{f' groups {groups}' if groups > 1 else ''} on {'x'.join(map(str, shape))}")
    return f"linear {signature[2][0]}->{signature[2][1]} on {'x'.join(map(str, signature[1]))}"


@dataclass
class Curve:
    """One layer's measured latency (ms) at sampled output widths, with its dense widths."""

    widths: list[int]
    ms: list[float]
    out: int
    inputs: int
    depthwise: bool

    def at(self, width: float) -> float:
        """Latency at `width` kept outputs: linear between samples, proportional below the smallest."""
        w, t = self.widths, self.ms
        if width <= 0:
            return 0.0
        if width <= w[0]:
            return t[0] * width / w[0]
        for (w0, t0), (w1, t1) in zip(zip(w, t), zip(w[1:], t[1:])):
            if width <= w1:
                return t0 + (t1 - t0) * (width - w0) / (w1 - w0)
        return t[-1] * width / w[-1]

    @property
    def dims(self) -> LayerDims:
        """The layer's dense widths (prune/layer_cost.py)."""
        return LayerDims(self.out, self.inputs, self.depthwise)

    def cost(self, kept_out: float, kept_in: float) -> float:
        return self.at(kept_out) * input_factor(self.dims, kept_in)


@dataclass
class LatencyCost:
    """The cost model of the module docstring, for one model, runtime and batch size."""

    curves: dict[str, Curve]
    fixed_ms: float  # the model's time outside the tabled layers (never negative)
    dense_macs: float
    kept_widths: dict[str, set[int]] = field(default_factory=dict)  # group root -> widths it may keep
    source: dict[str, Any] = field(default_factory=dict)  # the table's path, backend, batch, environment

    @property
    def dense_ms(self) -> float:
        return self.fixed_ms + sum(c.at(c.out) for c in self.curves.values())

    def budget(self, fraction: float) -> float:
        return fraction * self.dense_ms

    def per_layer(self, snap: "Snapshot", plan: "Plan") -> dict[str, float]:
        """Predicted ms of every tabled layer after `plan` (from the snapshot's current widths)."""
        removed = snap.removed_after(plan)
        result = {}
        for name, curve in self.curves.items():
            out_now, in_now, _ = snap.layer_dims.get(name, (curve.out, curve.inputs, curve.depthwise))
            result[name] = curve.cost(out_now - removed.get((name, "out"), 0), in_now - removed.get((name, "in"), 0))
        return result

    def predict(self, snap: "Snapshot", plan: "Plan") -> float:
        return self.fixed_ms + sum(self.per_layer(snap, plan).values())

    def channel_ms(self, snap: "Snapshot", cand) -> float:
        """Milliseconds one channel of `cand` costs now, over every tabled layer it narrows."""
        total = 0.0
        for layer, side, _roots, count in cand.members:
            curve = self.curves.get(layer)
            if curve is None:
                continue
            out_now, in_now, _ = snap.layer_dims.get(layer, (curve.out, curve.inputs, curve.depthwise))
            share = count / max(cand.width, 1)
            if side == "out":
                low = out_now / 2
                total += share * (curve.cost(out_now, in_now) - curve.cost(low, in_now)) / max(out_now - low, 1e-9)
            else:  # an input channel: its share of the layer's time at the current outputs
                total += share * curve.at(out_now) * channel_share(curve.dims, "in")
        return total

    def weighted(self, snap: "Snapshot") -> "Snapshot":
        """The snapshot with every group's scores turned into importance per millisecond: x the MACs one of its
        channels carries, / the milliseconds it costs (see the module docstring)."""
        floor = 1e-6 * max(self.dense_ms, 1e-9)  # a channel that costs nothing measurable is removed last
        candidates = [replace(c, scores=c.scores * channel_macs(snap, c) / max(self.channel_ms(snap, c), floor))
                      for c in snap.candidates]
        return replace(snap, candidates=candidates)


def channel_macs(snap: "Snapshot", cand) -> float:
    """MACs one channel of `cand` carries now, over every layer it narrows (the MAC planner's cost per channel)."""
    total = 0.0
    for layer, side, _roots, count in cand.members:
        if layer not in snap.layer_macs:
            continue
        total += count / max(cand.width, 1) * snap.layer_macs[layer] * channel_share(snap.layer_dims[layer], side)
    return max(total, 1e-12)


def group_widths(snap: "Snapshot", cand, curves: dict[str, Curve]) -> Optional[set[int]]:
    """The widths a group may keep: its dense width and each sampled width at which the group's predicted latency
    (all the layers it narrows) is at least STEP_EPS below that of the next wider kept width; None when the
    group's root layer has no curve (round_to applies)."""
    root = curves.get(cand.root)
    if root is None:
        return None

    def group_ms(width: int) -> float:
        total = 0.0
        for layer, side, _roots, count in cand.members:
            curve = curves.get(layer)
            if curve is None:
                continue
            if side == "out":
                total += curve.cost(width * count / max(cand.width, 1), curve.inputs)
            elif channel_share(curve.dims, "in"):  # else the layer's output side prices it
                total += curve.cost(curve.out, curve.inputs - (cand.width - width) * count / max(cand.width, 1))
        return total

    samples = sorted({w for w in root.widths if w < cand.width}, reverse=True)
    kept, last = {cand.width}, group_ms(cand.width)
    for w in samples:
        t = group_ms(w)
        if t < last * (1 - STEP_EPS):
            kept.add(w)
            last = t
    return kept


def build_cost(table: dict[str, Any], model: "nn.Module", example: "torch.Tensor", snap: "Snapshot", batch: int,
               *, source: str = "lut.json") -> LatencyCost:
    """The cost model of `table` (checked by deploy.latency_table.read_table) for `model` at `batch`; UsageError
    (exit 2) when a prunable layer of the model has no row: the table was measured for another architecture."""
    rows: dict[tuple, dict[str, Any]] = {}
    factors: dict[tuple, float] = {}
    key = str(batch)
    for i, row in enumerate(table["layers"]):
        try:
            times = [float(t) for t in row["p50_ms"][key]]
            if len(times) != len(row["widths"]) or not all(t > 0 and math.isfinite(t) for t in times):
                raise ValueError("p50_ms and widths differ in length or hold a non-positive time")
            rows.setdefault(row_signature(row), row)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"latency table {source}: layer {i} ({row.get('name') if isinstance(row, dict) else row!r}"
                             f") is malformed ({type(exc).__name__}: {exc}).",
                             hint="Measure the table again with `compressor latency-table`.") from None
    for row, factor in zip(table["layers"], _factors(table, batch, source)):
        factors.setdefault(row_signature(row), factor)
    signatures = layer_signatures(model, example)
    prunable = {layer for cand in snap.candidates for layer, *_ in cand.members}
    missing = [name for name, sig in signatures.items() if name in prunable and sig not in rows]
    if missing:
        shown = "; ".join(f"{n} ({describe(signatures[n])})" for n in missing[:3])
        raise UsageError(f"latency table {source}: it has no row for {len(missing)} of this model's "
                         f"{len(prunable & set(signatures))} prunable layers ({shown}{'; ...' if len(missing) > 3 else ''})"
                         f": it was measured for another model ({(table.get('model') or {}).get('path')}) or input shape.",
                         hint="Export this model (`compressor export CHECKPOINT --recipe R.yaml`) and measure its table "
                              "on the target device: `compressor latency-table model.onnx --out lut.json`.")
    curves = {}
    for name, sig in signatures.items():
        row = rows.get(sig)
        if row is None or name not in snap.layer_dims:
            continue
        out, inputs, depthwise = snap.layer_dims[name]
        factor = factors[sig]  # the probe's boundary costs (layout conversions) taken out: in-context time
        pairs = sorted(zip((int(w) for w in row["widths"]), (factor * t for t in probe_ms(row, key))))
        curves[name] = Curve([w for w, _ in pairs], [t for _, t in pairs], out, inputs,
                             bool(row.get("depthwise", depthwise)))
    layers_ms = sum(c.at(c.out) for c in curves.values())
    whole = (table.get("model_p50_ms") or {}).get(key)
    fixed = max(0.0, float(whole) - layers_ms) if whole is not None else 0.0
    head_layers = {layer for cand in snap.candidates if is_head_root(cand.root) for layer, *_ in cand.members}
    priced = _mac_priced(snap, curves, head_layers, fixed)
    curves.update(priced)
    fixed = max(0.0, fixed - sum(c.at(c.out) for c in priced.values()))
    cost = LatencyCost(curves, fixed, snap.total_macs, source={
        "path": source, "backend": table["backend"], "batch": batch, "cpu": (table.get("environment") or {}).get("cpu"),
        "environment": table.get("environment") or {}, "model_p50_ms": whole, "layers_ms": layers_ms,
        "layers": len(curves) - len(priced), "mac_priced": sorted(priced),
        "sha256": (table.get("model") or {}).get("sha256"),
        "context": (table.get("context") or {}).get(key)})
    for cand in snap.candidates:
        widths = group_widths(snap, cand, curves)
        if widths is not None:
            cost.kept_widths[cand.root] = widths
    return cost


def _mac_priced(snap: "Snapshot", curves: dict[str, Curve], layers: set[str], fixed_ms: float) -> dict[str, Curve]:
    """Curves for the attention layers whose heads the table cannot time (torchvision's MultiheadAttention, which
    the op counter counts as one layer and the table has no row for: its time is in the model's time outside the
    tabled layers; `layers`: the members of the head candidates, of which those without a curve): their
    MACs at the tabled layers' milliseconds per MAC, linear in the kept width, so removing a head saves time in the
    planner as it does on the device instead of costing nothing. Scaled down, all alike, where they would exceed the
    untabled time the table measured."""
    tabled_macs = sum(snap.layer_macs.get(name, 0.0) for name in curves)
    if not curves or tabled_macs <= 0:
        return {}
    ms_per_mac = sum(c.at(c.out) for c in curves.values()) / tabled_macs
    names = [n for n in sorted(layers - set(curves))
             if snap.layer_macs.get(n, 0.0) > 0 and n in snap.layer_dims and snap.layer_dims[n][0] > 0]
    wanted = {n: ms_per_mac * snap.layer_macs[n] for n in names}
    scale = min(1.0, fixed_ms / sum(wanted.values())) if wanted else 1.0
    priced = {}
    for name, ms in wanted.items():
        out, inputs, depthwise = snap.layer_dims[name]
        if ms * scale > 0:
            priced[name] = Curve([out], [ms * scale], out, inputs, depthwise)
    return priced


def _factors(table: dict[str, Any], batch: int, source: str) -> list[float]:
    try:
        return layer_factors(table, batch)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise UsageError(f"latency table {source}: its context times are malformed ({type(exc).__name__}: {exc}).",
                         hint="Measure the table again with `compressor latency-table`.") from None


def predicted_speedup(cost: LatencyCost, snap: "Snapshot", plan: "Plan") -> Optional[float]:
    """Dense over predicted milliseconds; None where the table prices the plan (or the dense model) at no time,
    which has no finite speedup."""
    predicted = cost.predict(snap, plan)
    return cost.dense_ms / predicted if predicted > 0 and cost.dense_ms > 0 else None
