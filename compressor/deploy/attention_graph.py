"""Attention in an exported graph, written the way ONNX Runtime's transformer optimizer can fuse it.

Hugging Face attention splits heads with `view(batch, seq, -1, head_size)`; exported with dynamic batch and
sequence axes, that is `Reshape(x, Concat(B, S, -1, head_size))` with B and S read from the input's shape. The
optimizer (onnxruntime.transformers, FusionAttention) reads each layer's head count from that Concat and gives up on
the -1 unless one `num_heads` is passed for the whole model, which a pruned model, whose layers keep different
head counts, does not have. `explicit_heads` replaces the -1 by the count the projection's weight implies
(out_features / head_size), which is the value the -1 resolves to: only where the reshaped tensor is a MatMul
(+ bias) of a constant weight and B and S are entries 0 and 1 of the shape of that MatMul's input, so the
rewrite cannot change what the graph computes (the export's parity check runs on the rewritten file).

Two more spellings of the same attention stand between recent transformers exports and the optimizer's patterns:
the softmax cast to its own dtype and back (`softmax(..., dtype=float32).to(dtype)`, two Casts that change nothing
in a float32 graph), which `noop_casts` removes, and, without an attention mask, scores scaled by `* head_size**-0.5`
where the optimizer's unmasked pattern expects `/ head_size**0.5`: `scale_as_div` writes that Mul as the Div by the
reciprocal (the same value to within one rounding of the scale). `fusable_attention` runs all three and drops the
constants they leave unused.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

_PASS_THROUGH = ("Unsqueeze", "Cast", "Squeeze")


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _projection(name: str, producers: dict, constants: dict) -> Optional[object]:
    """The MatMul with a constant weight whose output (or output + bias) is `name`."""
    node = producers.get(name)
    if node is not None and node.op_type == "Add":
        node = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"), None)
    if node is None or node.op_type != "MatMul" or node.input[1] not in constants:
        return None
    return node if constants[node.input[1]].ndim == 2 else None


def _shape_entry(name: str, producers: dict, constants: dict, tensor: str, index: int) -> bool:
    """Whether `name` is entry `index` of Shape(tensor) (through Unsqueeze / Cast)."""
    node = producers.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Gather" or node.input[0] not in producers:
        return False
    shape, at = producers[node.input[0]], constants.get(node.input[1])
    return (shape.op_type == "Shape" and shape.input[0] == tensor and at is not None and at.size == 1
            and int(at.reshape(-1)[0]) == index and not any(a.name in ("start", "end") for a in shape.attribute))


def explicit_heads(model) -> int:
    """Rewrite `model` (an onnx ModelProto) in place: every head-splitting Reshape gets its head count as a
    constant. Returns how many Reshapes changed."""
    from onnx import numpy_helper

    graph = model.graph
    constants = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    changed = 0
    for reshape in graph.node:
        if reshape.op_type != "Reshape" or reshape.input[1] not in producers:
            continue
        concat = producers[reshape.input[1]]
        if concat.op_type != "Concat" or len(concat.input) < 3 or any(i not in constants for i in concat.input[2:]):
            continue
        tail = np.concatenate([constants[i].reshape(-1) for i in concat.input[2:]])
        if tail.size != 2 or int(tail[0]) != -1 or int(tail[1]) <= 0:
            continue
        matmul = _projection(reshape.input[0], producers, constants)
        if matmul is None:
            continue
        head_size, width = int(tail[1]), int(constants[matmul.input[1]].shape[-1])
        if width % head_size or not all(_shape_entry(concat.input[i], producers, constants, matmul.input[0], i)
                                        for i in (0, 1)):
            continue
        heads, size = f"{concat.name or concat.output[0]}/num_heads", f"{concat.name or concat.output[0]}/head_size"
        graph.initializer.extend([numpy_helper.from_array(np.array([width // head_size], tail.dtype), heads),
                                  numpy_helper.from_array(np.array([head_size], tail.dtype), size)])
        del concat.input[2:]
        concat.input.extend([heads, size])
        changed += 1
    return changed


def noop_casts(model) -> int:
    """Remove every Cast to the type its input already has (types from onnx shape inference); a Cast whose output is
    a graph output stays. Returns how many were removed."""
    import onnx

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}
    keep = []
    for node in graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        source = renamed.get(node.input[0], node.input[0]) if node.op_type == "Cast" else None
        if source is not None and types.get(source) == to and node.output[0] not in outputs:
            renamed[node.output[0]] = source
            continue
        keep.append(node)
    if renamed:
        for node in keep:
            for i, name in enumerate(node.input):
                node.input[i] = renamed.get(name, name)
        del graph.node[:]
        graph.node.extend(keep)
    return len(renamed)


def scale_as_div(model) -> int:
    """On unmasked attention (MatMul -> Mul by a scalar constant -> Softmax -> MatMul), the Mul written as a Div by
    the scalar's reciprocal. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    changed = 0
    for softmax in list(graph.node):
        if softmax.op_type != "Softmax" or not any(c.op_type == "MatMul" for c in consumers.get(softmax.output[0], [])):
            continue
        mul = producers.get(softmax.input[0])
        if mul is None or mul.op_type != "Mul" or len(consumers.get(mul.output[0], [])) != 1:
            continue
        scalar = next((i for i in mul.input if i in constants and constants[i].size == 1), None)
        scores = next((i for i in mul.input if i != scalar), None)
        if scalar is None or scores is None or producers.get(scores) is None or producers[scores].op_type != "MatMul":
            continue
        value = constants[scalar]
        if not np.issubdtype(value.dtype, np.floating) or float(value.reshape(-1)[0]) == 0.0:
            continue
        name = f"{mul.name or mul.output[0]}/reciprocal"
        graph.initializer.append(numpy_helper.from_array((1 / value).astype(value.dtype), name))
        div = helper.make_node("Div", [scores, name], list(mul.output), name=f"{mul.name or mul.output[0]}/as_div")
        graph.node.insert(list(graph.node).index(mul), div)
        graph.node.remove(mul)
        changed += 1
    return changed


def _read_names(graph) -> set[str]:
    """Every tensor name a node of `graph` or of its subgraphs (If / Loop / Scan bodies) reads."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                names |= _read_names(sub)
    return names


def drop_unused_constants(model) -> int:
    """Remove Constant nodes and initializers nothing reads any more. Returns how many went."""
    graph = model.graph
    total = 0
    while True:
        used = _read_names(graph) | {o.name for o in graph.output} | {i.name for i in graph.input}
        dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
        unused = [t for t in graph.initializer if t.name not in used]
        if not dead and not unused:
            return total
        for node in dead:
            graph.node.remove(node)
        for tensor in unused:
            graph.initializer.remove(tensor)
        total += len(dead) + len(unused)


def fusable_attention(model) -> dict[str, int]:
    """Rewrite `model` in place so that ONNX Runtime's transformer optimizer can fuse its attention (module
    docstring); nothing changes in a graph without the head-splitting pattern. Returns what each step changed."""
    heads = explicit_heads(model)
    if not heads:
        return {"head_reshapes": 0, "noop_casts": 0, "scales_as_div": 0}
    counts = {"head_reshapes": heads, "noop_casts": noop_casts(model), "scales_as_div": scale_as_div(model)}
    drop_unused_constants(model)
    return counts
