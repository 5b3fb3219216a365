"""A detector's ONNX file with its post-processing in the graph: model.onnx's raw head tensors -> box decode,
one class per anchor, class-wise NonMaxSuppression (the standard ONNX op, which ONNX Runtime runs on every
provider), at most `max_det` detections per image in a fixed-size output.

The outputs are the layout TensorRT's EfficientNMS_TRT plugin produces, so one consumer reads both:
- num_dets (N, 1) int32: how many rows of the three below are detections, per image;
- det_boxes (N, max_det, 4) float32: x0, y0, x1, y1 in input pixels, clipped to the image;
- det_scores (N, max_det) float32: the class probability, highest first;
- det_classes (N, max_det) int32: 0-based class ids.
Rows past num_dets are padding: boxes and scores 0, classes -1. The input is model.onnx's, unchanged (name, dtype,
dynamic batch): the graph is model.onnx's with nodes appended, built with the `onnx` package (no torch here).
The pieces before NonMaxSuppression (open_raw, decode, one_class_per_anchor, finish) also build the TensorRT file
whose NMS is the EfficientNMS_TRT plugin (compressor/deploy/trt_nms.py).

The decisions are compressor's own postprocess (compressor/tasks/boxes.py) at the given conf / iou / max_det:
an anchor is a candidate when its best class probability is above `conf` (strictly, as ORT's NonMaxSuppression
filters), boxes are clipped to the image before NMS, NMS runs within each class and drops a box whose IoU with a
kept one is above `iou`, and the `max_det` highest-scoring survivors over all classes are kept. One difference:
postprocess feeds at most 30000 candidates per image into NMS; this graph feeds all (the same unless more than
30000 anchors pass `conf`). EfficientNMS_TRT itself keeps only the top 4096 candidates before NMS.

Two raw layouts (compressor/tasks/boxes.py): "yolo", one output (N, 4 + C, A) of cx, cy, w, h and probabilities;
"boxes_scores", outputs (boxes (N, A, 4) xyxy, scores (N, A, C) probabilities).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from compressor.errors import ExportError
from compressor.rundir import publish

OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
LAYOUTS = ("yolo", "boxes_scores")
PAD_CLASS = -1  # det_classes past num_dets
PREFIX = "nms/"  # every name this module adds to a graph


class _Graph:
    """Appends nodes and constants to an ONNX graph under unique `nms/` names, in the default domain's opset."""

    def __init__(self, graph: Any, opset: int) -> None:
        self.graph, self.opset, self.count = graph, opset, 0
        taken = {n for node in graph.node for n in [*node.input, *node.output]}
        taken |= {t.name for t in graph.initializer} | {v.name for v in [*graph.input, *graph.output]}
        if any(name.startswith(PREFIX) for name in taken) or taken & set(OUTPUTS):
            raise ExportError(f"the ONNX graph already holds names starting with {PREFIX!r} or named like the NMS "
                              f"outputs ({', '.join(OUTPUTS)}): it was post-processed before.",
                              hint="Add NMS to the raw model.onnx, not to a .nms.onnx file.")

    def name(self, what: str) -> str:
        self.count += 1
        return f"{PREFIX}{what}_{self.count}"

    def const(self, what: str, value: Any, dtype: Any) -> str:
        from onnx import numpy_helper

        name = self.name(what)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], what: str, outputs: int = 1, *, out: Optional[str] = None,
           **attrs: Any):
        """Append one node; its output names are new unless `out` names its one output (a graph output)."""
        from onnx import helper

        names = [out] if out is not None else [self.name(what) for _ in range(outputs)]
        self.graph.node.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def reduce_sum(self, data: str, axis: int, out: str) -> str:
        """ReduceSum over one axis, keeping it: `axes` is an attribute before opset 13, an input from 13 on."""
        if self.opset < 13:
            return self.op("ReduceSum", [data], out, out=out, axes=[axis], keepdims=1)
        return self.op("ReduceSum", [data, self.const("axes", [axis], np.int64)], out, out=out, keepdims=1)


def open_raw(source: str | Path, *, layout: str, conf: float, iou: float, max_det: int) -> tuple[Any, _Graph, str,
                                                                                                   list[str]]:
    """The raw detector `source` loaded for appending post-processing, after checking the settings, the opset (11 or
    newer) and the layout's inputs and outputs: (model, its _Graph, the image input's name, the raw output names)."""
    import onnx

    if layout not in LAYOUTS:
        raise ExportError(f"unknown detection output layout {layout!r}; NMS in the graph knows {', '.join(LAYOUTS)}.")
    if not 0.0 <= conf < 1.0 or not 0.0 <= iou <= 1.0 or max_det < 1:
        raise ExportError(f"NMS settings out of range: conf {conf} (0 <= conf < 1), iou {iou} (0..1), max_det "
                          f"{max_det} (>= 1).", hint="Check export.nms in the recipe.")
    source = Path(source)
    if source.with_name(source.name + ".data").is_file():
        raise ExportError(f"{source.name} keeps its tensors in an external data file (over 2 GB); NMS in the graph "
                          "is written for detectors whose ONNX is one file.", hint="Set export.nms.enabled: false.")
    model = onnx.load(str(source))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise ExportError(f"{source.name} has opset {opset}; NMS in the graph needs opset 11 or newer.",
                          hint="Export with export.onnx.opset 11 or newer (17 is the default).")
    g = _Graph(graph, opset)  # refuses a graph that holds NMS already
    raw = [o.name for o in graph.output]
    want = 1 if layout == "yolo" else 2
    if len(graph.input) != 1 or len(raw) != want:
        raise ExportError(f"{source.name} has {len(graph.input)} inputs and {len(raw)} outputs; a {layout!r} detector "
                          f"has one image input and {want} raw output{'s' if want > 1 else ''}.")
    return model, g, graph.input[0].name, raw


def decode(g: _Graph, layout: str, raw: list[str], image: str, *, classes_last: bool = False) -> tuple[str, str, str]:
    """Nodes from the raw head to boxes (N, A, 4) x0, y0, x1, y1 clipped to the image (x to [0, W], y to [0, H], as
    postprocess clips) and class probabilities (N, C, A), or (N, A, C) with `classes_last`; returns the names of
    boxes, scores and the image's runtime shape (N, 3, H, W)."""
    from onnx import TensorProto

    if layout == "yolo":
        head = raw[0]
        axis = g.const("axes", [1], np.int64)

        def rows(start: int, end: int, what: str) -> str:
            return g.op("Slice", [head, g.const("start", [start], np.int64), g.const("end", [end], np.int64), axis],
                        what)

        centre, size = rows(0, 2, "centre"), rows(2, 4, "size")  # (N, 2, A) each
        scores = rows(4, np.iinfo(np.int64).max, "scores")  # (N, C, A)
        half = g.op("Div", [size, g.const("two", 2.0, np.float32)], "half")  # as cxcywh_to_xyxy: c - s / 2, c + s / 2
        corners = g.op("Concat", [g.op("Sub", [centre, half], "x0y0"), g.op("Add", [centre, half], "x1y1")],
                       "corners", axis=1)
        boxes = g.op("Transpose", [corners], "boxes", perm=[0, 2, 1])
        if classes_last:
            scores = g.op("Transpose", [scores], "scores_last", perm=[0, 2, 1])
    else:
        boxes = raw[0]
        scores = raw[1] if classes_last else g.op("Transpose", [raw[1]], "scores", perm=[0, 2, 1])

    shape = g.op("Shape", [image], "image_shape")
    limits = g.op("Cast", [g.op("Gather", [shape, g.const("whwh", [3, 2, 3, 2], np.int64)], "whwh")], "limits",
                  to=TensorProto.FLOAT)
    boxes = g.op("Min", [g.op("Max", [boxes, g.const("zero", 0.0, np.float32)], "above_zero"), limits], "clipped")
    return boxes, scores, shape


def one_class_per_anchor(g: _Graph, scores: str, axis: int) -> str:
    """Scores with only each anchor's best class left: its best probability stays in its best class (the first of
    equal ones, as postprocess's max), every other class gets -1 (never above conf), so a class-wise NMS sees each
    anchor once, under the label postprocess gives it. `axis`: the class axis of `scores` (1: (N, C, A), 2: (N, A,
    C))."""
    best = g.op("TopK", [scores, g.const("one", [1], np.int64)], "best", outputs=2, axis=axis, largest=1, sorted=1)[1]
    classes = g.op("Gather", [g.op("Shape", [scores], "scores_shape"), g.const("i", axis, np.int64)], "classes")
    class_ids = g.op("Range", [g.const("zero", 0, np.int64), classes, g.const("step", 1, np.int64)], "class_ids")
    column = [1, -1, 1] if axis == 1 else [1, 1, -1]
    class_ids = g.op("Reshape", [class_ids, g.const("shape", column, np.int64)], "class_column")
    chosen = g.op("Equal", [best, class_ids], "chosen")  # the anchor's first best class
    return g.op("Where", [chosen, scores, g.const("none", -1.0, np.float32)], "masked")


def add_nms(source: str | Path, dest: str | Path, *, layout: str, conf: float, iou: float,
            max_det: int) -> dict[str, Any]:
    """Write `dest`: the raw detector `source` (model.onnx) with NMS appended (see the module docstring), checked
    with onnx.checker, written atomically. Returns what the report records of it."""
    from onnx import TensorProto

    model, g, image, raw = open_raw(source, layout=layout, conf=conf, iou=iou, max_det=max_det)
    boxes, scores, shape = decode(g, layout, raw, image)  # scores (N, C, A), the layout NonMaxSuppression takes
    masked = one_class_per_anchor(g, scores, axis=1)

    selected = g.op("NonMaxSuppression", [boxes, masked, g.const("per_class", max_det, np.int64),
                                          g.const("iou", iou, np.float32), g.const("conf", conf, np.float32)],
                    "selected", center_point_box=0)  # (K, 3): image, class, anchor
    image_of = g.op("Gather", [selected, g.const("i", 0, np.int64)], "image_of", axis=1)  # (K,)
    class_of = g.op("Gather", [selected, g.const("i", 1, np.int64)], "class_of", axis=1)
    anchor = g.op("Gather", [selected, g.const("i", [0, 2], np.int64)], "image_anchor", axis=1)  # (K, 2)
    kept_scores = g.op("GatherND", [masked, selected], "kept_scores")  # (K,)
    kept_boxes = g.op("GatherND", [boxes, anchor], "kept_boxes")  # (K, 4)

    # per image, the max_det best: a (N, K + max_det) score table, -1 where a detection belongs to another image,
    # then max_det columns of -1 so TopK always has max_det to take (ties: the lower index first)
    batch = g.op("Gather", [shape, g.const("i", 0, np.int64)], "batch")
    images = g.op("Reshape", [g.op("Range", [g.const("zero", 0, np.int64), batch, g.const("step", 1, np.int64)],
                                   "image_ids"), g.const("shape", [-1, 1], np.int64)], "image_column")
    table = g.op("Where", [g.op("Equal", [images, image_of], "mine"), kept_scores,
                           g.const("none", -1.0, np.float32)], "table")  # (N, K)
    fill_shape = g.op("Concat", [g.op("Reshape", [batch, g.const("shape", [1], np.int64)], "batch_1"),
                                 g.const("max_det", [max_det], np.int64)], "fill_shape", axis=0)
    fill = g.op("Expand", [g.const("none", [[-1.0]], np.float32), fill_shape], "fill")
    table = g.op("Concat", [table, fill], "padded_table", axis=1)
    top, index = g.op("TopK", [table, g.const("max_det", [max_det], np.int64)], "top", outputs=2, axis=1, largest=1,
                      sorted=1)  # (N, max_det)
    valid = g.op("Greater", [top, g.const("half", -0.5, np.float32)], "valid")

    box_rows = g.op("Concat", [kept_boxes, g.const("pad_boxes", np.zeros((max_det, 4)), np.float32)], "box_rows",
                    axis=0)
    class_rows = g.op("Concat", [class_of, g.const("pad_classes", np.full(max_det, PAD_CLASS), np.int64)],
                      "class_rows", axis=0)
    valid_3d = g.op("Reshape", [valid, g.const("shape", [0, 0, 1], np.int64)], "valid_3d")
    g.op("Where", [valid_3d, g.op("Gather", [box_rows, index], "gathered_boxes", axis=0),
                   g.const("zero", 0.0, np.float32)], "det_boxes", out="det_boxes")
    g.op("Where", [valid, top, g.const("zero", 0.0, np.float32)], "det_scores", out="det_scores")
    g.op("Cast", [g.op("Where", [valid, g.op("Gather", [class_rows, index], "gathered_classes", axis=0),
                                 g.const("pad", PAD_CLASS, np.int64)], "classes64")],
         "det_classes", out="det_classes", to=TensorProto.INT32)
    g.reduce_sum(g.op("Cast", [valid], "valid_int", to=TensorProto.INT32), 1, "num_dets")

    finish(model, source, dest, max_det, full_check=True)
    return {"path": str(dest), "source": Path(source).name, "layout": layout, "conf": conf, "iou": iou,
            "max_det": max_det, "outputs": list(OUTPUTS), "input": image, "opset": g.opset,
            "nodes": len(model.graph.node), "bytes": Path(dest).stat().st_size}


def finish(model: Any, source: str | Path, dest: str | Path, max_det: int, *, full_check: bool) -> None:
    """Make the four OUTPUTS (already computed in the graph) the graph's outputs, typed and shaped as EfficientNMS_TRT
    writes them with the input's batch dimension; check the model with onnx.checker (`full_check`: with strict
    shape inference too) and write `dest` atomically."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    batch_dim = _batch_dim(graph.input[0])
    types = [(TensorProto.INT32, [batch_dim, 1]), (TensorProto.FLOAT, [batch_dim, max_det, 4]),
             (TensorProto.FLOAT, [batch_dim, max_det]), (TensorProto.INT32, [batch_dim, max_det])]
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(name, dtype, dims)
                        for name, (dtype, dims) in zip(OUTPUTS, types))
    try:
        onnx.checker.check_model(model, full_check=full_check)
    except Exception as exc:  # the checker raises ValidationError / InferenceError; both mean a malformed graph
        raise ExportError(f"the NMS graph built on {Path(source).name} fails onnx.checker: "
                          f"{' '.join(str(exc).split())}",
                          hint="Report this with the recipe; export.nms.enabled: false keeps the raw model.") from exc
    _save(model, Path(dest))


def _batch_dim(value_info: Any) -> Any:
    """The input's batch dimension as make_tensor_value_info takes it: its symbol ("batch"), its size, or None."""
    dims = value_info.type.tensor_type.shape.dim
    if not dims:
        return None
    first = dims[0]
    return first.dim_param or (first.dim_value if first.HasField("dim_value") else None)


def _save(model: Any, dest: Path) -> None:
    """Written beside `dest` and renamed in, so a reader never sees half a file."""
    import onnx

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        publish(tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_detections(outputs: list[np.ndarray], names: Optional[list[str]] = None) -> list[dict[str, np.ndarray]]:
    """A .nms.onnx file's four outputs (in OUTPUTS order, or named by `names`) as per-image
    {"boxes" (K, 4), "scores" (K,), "labels" (K,) int64}, the first num_dets rows of each image."""
    if names is not None:
        by_name = dict(zip(names, outputs))
        outputs = [by_name[n] for n in OUTPUTS]
    if len(outputs) != len(OUTPUTS):
        raise ValueError(f"an NMS file has {len(OUTPUTS)} outputs ({', '.join(OUTPUTS)}), got {len(outputs)}")
    num, boxes, scores, classes = outputs
    return [{"boxes": np.asarray(boxes[i, :n], np.float32), "scores": np.asarray(scores[i, :n], np.float32),
             "labels": np.asarray(classes[i, :n], np.int64)}
            for i, n in enumerate(np.asarray(num).reshape(-1).astype(int))]
