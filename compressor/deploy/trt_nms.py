"""A detector's ONNX file for TensorRT with NMS done by TensorRT's EfficientNMS_TRT plugin, and the engine built
from it (model.nms.engine), verified with the rule model.nms.onnx is held to (tasks/nms_parity.compare_detections).

The graph is model.onnx's raw head, then the decode model.nms.onnx uses (compressor/deploy/nms_graph.py: boxes
(N, A, 4) x0, y0, x1, y1 in input pixels clipped to the image; probabilities (N, A, C) with only each anchor's best
class left and -1 in the others), then ONE EfficientNMS_TRT node whose four outputs are the graph's outputs, named as
model.nms.onnx names them (num_dets, det_boxes, det_scores, det_classes), so code reading one file reads the other.
The one-class mask is what makes the plugin decide as compressor's postprocess does: the plugin takes every (anchor,
class) score above its threshold as a candidate [README, Process Description], so without it one anchor could come
out once per class. ONNX Runtime has no EfficientNMS_TRT: the file is for TensorRT alone.

Grounded in (nothing here is guessed; where these are silent the behaviour is the plugin's source, named):
[README] NVIDIA/TensorRT, plugin/efficientNMSPlugin/README.md: inputs boxes [batch_size, number_boxes, 4] and scores
    [batch_size, number_boxes, number_classes], float32 or float16 (Standard NMS Mode: two inputs); outputs
    num_detections [batch_size, 1] int32, detection_boxes [batch_size, max_output_boxes, 4] float32 (always
    BoxCorner), detection_scores [batch_size, max_output_boxes], detection_classes [batch_size, max_output_boxes]
    int32; the Parameters table quoted at plugin_attributes; after the score filter only the 4096 highest scores
    go into NMS; below a score threshold of 0.007 a dense kernel (EfficientNMSDenseIndex) is used instead.
[CONFIG] NVIDIA/TensorRT, plugin/efficientNMSPlugin/EfficientNMSPlugin_PluginConfig.yaml: name EfficientNMS_TRT,
    version "1", attribute types (score_threshold, iou_threshold float32; max_output_boxes, background_class,
    score_activation, class_agnostic, box_coding int32), allowed values (score_threshold >= 0, iou_threshold > 0,
    max_output_boxes > 0, score_activation / class_agnostic / box_coding 0 or 1).
[PARSER] TensorRT's ONNX parser (onnx/onnx-tensorrt, docs/faq.md "Custom Layer Support"; onnxOpImporters.cpp
    FallbackPluginImporter): a node whose op_type has no built-in importer is imported as the plugin of that name
    from TensorRT's plugin registry, the version taken from the node's string attribute plugin_version (default "1")
    and the namespace from plugin_namespace (default ""); the node's INT and FLOAT attributes become the creator's
    kINT32 / kFLOAT32 fields, and its outputs take the node's output names, by position. The node's domain plays
    no part in finding the plugin.
[API] TensorRT Python API, tensorrt.init_libnvinfer_plugins(logger, namespace): "Initialize and register all the
    existing TensorRT plugins to the IPluginRegistry with an optional namespace ... should be called once before
    accessing the Plugin Registry"; developer guide, Extending TensorRT with Custom Layers: to use TensorRT's
    standard plugins, libnvinfer_plugin must be loaded and its plugins registered (initLibNvInferPlugins).
[DOMAIN] NVIDIA Model Optimizer, modelopt.onnx.trt_utils.set_trt_plugin_domain: TensorRT plugin nodes go in the
    custom domain "trt.plugins", version 1, added to the model's opset imports. onnx.checker then accepts the node
    (with full_check too: strict shape inference leaves ops of an unknown domain alone); a node of the default
    domain must be a standard op.

Where the plugin decides differently from compressor's postprocess (tasks/boxes.py) and model.nms.onnx, per the plugin's
source (efficientNMSInference.cu): it keeps a score >= score_threshold (postprocess: > conf) and suppresses a box
whose IoU with a kept one of its class is >= iou_threshold (postprocess: > iou), so decisions exactly on a threshold
may flip, which compare_detections counts as edge cases; at most 4096 candidates per image enter NMS (postprocess:
30000), a difference only when more than 4096 anchors pass conf, which the parity check would name; rows past
num_detections are zeros, their class 0 (model.nms.onnx pads classes with -1): read num_dets first. Below a
score_threshold of 0.007 the dense kernel counts every score as selected, those under the threshold set to -32768,
and the NMS kernel takes the top 4096 of them without looking at the threshold again, so an image with fewer
detections than max_det could be padded with below-threshold boxes: conf below DENSE_CONF is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compressor.deploy.nms_graph import OUTPUTS, decode, finish, one_class_per_anchor, open_raw, read_detections
from compressor.errors import ExportError, ParityError

if TYPE_CHECKING:
    import torch
    from torch import nn

PLUGIN = "EfficientNMS_TRT"  # [CONFIG] name
PLUGIN_VERSION = "1"  # [CONFIG] versions: "1"; [PARSER] the plugin_version attribute selects it
DOMAIN, DOMAIN_VERSION = "trt.plugins", 1  # [DOMAIN]
DENSE_CONF = 0.007  # [README] below this score threshold the plugin uses its dense kernel (module docstring)
MAX_CANDIDATES = 4096  # [README] the highest scores that go into NMS, per image
ONNX_FILE, ENGINE_FILE = "model.nms.trt.onnx", "model.nms.engine"


def plugin_attributes(*, conf: float, iou: float, max_det: int) -> dict[str, Any]:
    """The EfficientNMS_TRT node's attributes for compressor's rule at conf / iou / max_det. Python floats and ints
    become ONNX FLOAT and INT attributes, which the parser hands to the creator as kFLOAT32 / kINT32 [PARSER], the
    types [CONFIG] gives. Descriptions quoted from [README]'s Parameters table."""
    return {
        # float: "The scalar threshold for score (low scoring boxes are removed)."
        "score_threshold": float(conf),
        # float: "The scalar threshold for IOU (additional boxes that have high IOU overlap with previously selected
        # boxes are removed)."
        "iou_threshold": float(iou),
        # int: "The maximum number of detections to output per image."
        "max_output_boxes": int(max_det),
        # int: "The label ID for the background class. If there is no background class, set it to -1." compressor's
        # scores have none (SSD's background column is dropped by its wrapper; YOLO, RetinaNet, FCOS have none)
        "background_class": -1,
        # bool (int32 [CONFIG]): "Set to true to apply sigmoid activation to the confidence scores during NMS
        # operation." 0: the decoded scores are probabilities already
        "score_activation": 0,
        # bool (int32 [CONFIG]): "Set to true to do class-independent NMS; otherwise, boxes of different classes
        # would be considered separately during NMS." 0: compressor's NMS runs within each class
        "class_agnostic": 0,
        # int: "Coding type used for boxes (and anchors if applicable), 0 = BoxCorner, 1 = BoxCenterSize." 0: the
        # decoded boxes are x0, y0, x1, y1 ("BoxCorner: [x1, y1, x2, y2]" [README, Box Coding Type])
        "box_coding": 0,
        # [PARSER]: the registered version to create (the parser's default is "1" too; written out to be explicit)
        "plugin_version": PLUGIN_VERSION,
    }


def add_efficient_nms(source: str | Path, dest: str | Path, *, layout: str, conf: float, iou: float,
                      max_det: int) -> dict[str, Any]:
    """Write `dest`: the raw detector `source` (model.onnx) with the shared decode and one EfficientNMS_TRT node
    (module docstring), checked with onnx.checker (full check; the plugin's domain registered), written atomically.
    Returns what the report records of it. ExportError for settings the plugin cannot take or decides differently."""
    from onnx import helper

    if conf < DENSE_CONF:
        raise ExportError(f"export.nms.conf {conf} is below {DENSE_CONF}, where TensorRT's EfficientNMS_TRT switches "
                          "to a dense kernel that can return boxes under the score threshold; compressor builds "
                          "model.nms.engine only for conf >= 0.007.",
                          hint=f"Raise export.nms.conf to {DENSE_CONF} or more (0.25 is the default); model.nms.onnx "
                               "takes any conf.")
    if iou <= 0.0:
        raise ExportError(f"export.nms.iou {iou}: EfficientNMS_TRT takes an IoU threshold above 0.",
                          hint="Set export.nms.iou above 0 (0.45 is the default).")
    model, g, image, raw = open_raw(source, layout=layout, conf=conf, iou=iou, max_det=max_det)
    boxes, scores, _ = decode(g, layout, raw, image, classes_last=True)  # (N, A, 4), (N, A, C): [README] Inputs
    masked = one_class_per_anchor(g, scores, axis=2)
    model.graph.node.append(helper.make_node(PLUGIN, [boxes, masked], list(OUTPUTS), name=g.name(PLUGIN),
                                             domain=DOMAIN, **plugin_attributes(conf=conf, iou=iou, max_det=max_det)))
    model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    finish(model, source, dest, max_det, full_check=True)
    return {"path": str(dest), "source": Path(source).name, "layout": layout, "conf": conf, "iou": iou,
            "max_det": max_det, "outputs": list(OUTPUTS), "input": image, "opset": g.opset, "plugin": PLUGIN,
            "plugin_version": PLUGIN_VERSION, "domain": DOMAIN, "nodes": len(model.graph.node),
            "bytes": Path(dest).stat().st_size}


def engine_detections(engine_path: str | Path, inputs: np.ndarray, max_batch: int) -> list[dict[str, np.ndarray]]:
    """model.nms.engine's detections on `inputs`, per image (the first num_dets rows), inferred in batches of at most
    `max_batch` (the optimisation profile's largest)."""
    from compressor.deploy.tensorrt_runtime import TrtEngine

    engine = TrtEngine(engine_path)  # registers TensorRT's plugins before deserializing
    try:
        missing = [n for n in OUTPUTS if n not in engine.outputs]
        if missing:
            raise ParityError(f"{Path(engine_path).name} lacks the outputs {', '.join(missing)}; an NMS engine has "
                              f"{', '.join(OUTPUTS)}.")
        found: list[dict[str, np.ndarray]] = []
        for i in range(0, len(inputs), max_batch):
            engine.prepare(inputs[i:i + max_batch])
            outputs = engine.run()
            found += read_detections([outputs[n] for n in OUTPUTS])
        return found
    finally:
        engine.close()


def verify_nms_engine(model: nn.Module, engine_path: str | Path, inputs: torch.Tensor, *, layout: str, conf: float,
                      iou: float, max_det: int, max_batch: int) -> dict[str, Any]:
    """The engine's detections on `inputs` against compressor's postprocess of `model`'s raw outputs, by the rule
    model.nms.onnx is held to (compare_detections: ParityError on disagreement)."""
    from compressor.tasks.nms_parity import compare_detections, reference_detections

    candidate = engine_detections(engine_path, inputs.detach().cpu().numpy().astype(np.float32), max_batch)
    reference = reference_detections(model, inputs, layout=layout, conf=conf, iou=iou, max_det=max_det)
    return compare_detections(reference, candidate, conf=conf, iou=iou, max_det=max_det,
                              label=f"TensorRT {Path(engine_path).name}")


def build_and_verify_nms(model: nn.Module, source: str | Path, samples: torch.Tensor, recipe, *,
                         layout: str) -> dict[str, Any]:
    """compress with export.nms where a TensorRT engine is built: ONNX_FILE and ENGINE_FILE beside `source`
    (model.onnx), the engine in fp32 over the recipe's batch profile (the parity rule's tolerances are fp32's; the
    precision flags stay with model.engine), then its detections on the validation `samples` checked against the
    PyTorch postprocess. Returns build_engine's record with "onnx" (add_efficient_nms's) and "parity"."""
    from compressor.deploy.tensorrt_engine import build_engine, settings_from_recipe
    from compressor.deploy.tensorrt_runtime import register_plugins, require_tensorrt

    cfg = recipe.export.nms
    nms = {"layout": layout, "conf": cfg.conf, "iou": cfg.iou, "max_det": cfg.max_det}
    require_tensorrt("a TensorRT engine with EfficientNMS_TRT")
    import tensorrt as trt

    source = Path(source)
    written = add_efficient_nms(source, source.with_name(ONNX_FILE), **nms)

    register_plugins(trt)  # [API]: before the ONNX parser looks the plugin up in the registry
    settings = settings_from_recipe(recipe, fp16=False, int8_calib=0)
    info = build_engine(written["path"], settings, source.with_name(ENGINE_FILE))
    info["onnx"] = written
    info["parity"] = verify_nms_engine(model, info["path"], samples, **nms, max_batch=settings.max_shape[0])
    return info
