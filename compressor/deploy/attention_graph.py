"""Attention in an exported graph, written the way ONNX Runtime's transformer optimizer can fuse it.

Hugging Face attention splits heads with `view(batch, seq, -1, head_size)`; exported with dynamic batch and
sequence axes, that is `Reshape(x, Concat(B, S, -1, head_size))` with B and S read from the input's shape. The
optimizer (onnxruntime.transformers, FusionAttention) reads each layer's head count from that Concat and gives up on
the -1 unless one `num_heads` is passed for the whole model, which a pruned model, whose layers keep different
head counts, does not have. `explicit_heads` replaces the -1 by the count the projection's weight implies
(out_features / head_size), which is the value the -1 resolves to: only where the reshaped tensor is a MatMul
(+ bias) of a constant weight and B and S are entries 0 and 1 of the shape of that MatMul's input, so the
rewrite cannot change what the graph computes (the export's parity check runs on the rewritten file).
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
