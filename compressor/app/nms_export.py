"""export.nms in compress and deploy: model.nms.onnx and dense.nms.onnx (a detector's raw ONNX with NMS in the graph,
compressor/deploy/nms_graph.py), their parity with compressor's postprocess of the PyTorch outputs
(compressor/tasks/nms_parity.py), the mAP of the file's own detections, model.nms.engine where TensorRT builds
engines (NMS by its EfficientNMS_TRT plugin, compressor/deploy/trt_nms.py; same parity rule), and the real images a
detector is benchmarked on (NMS costs what the content makes it: random noise gives a different number of candidates
than photographs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from compressor.errors import ModelLoadError, ParityError
from compressor.progress import info

if TYPE_CHECKING:
    from compressor.app.pipeline import RunState

MODEL_FILE, DENSE_FILE = "model.nms.onnx", "dense.nms.onnx"
BENCH_POOL = 64  # at most this many distinct validation images are timed; larger batches cycle through them
TENSORRT_NOTE = ("export.nms: model.nms.engine (NMS by TensorRT's EfficientNMS_TRT plugin, outputs num_dets / "
                 "det_boxes / det_scores / det_classes as model.nms.onnx writes them) was not built: {reason}; "
                 "model.engine keeps the raw head outputs")


def nms_stage(state: "RunState") -> None:
    """After the raw exports are verified: with export.nms.enabled, write model.nms.onnx (and dense.nms.onnx when
    there is a dense model), check the file's detections against compressor's postprocess of the PyTorch model on
    the parity samples (ParityError after writing the report), and score its own detections on the whole validation
    set (report["compressed"]["onnx_nms_map50_95"], "onnx_nms_map50")."""
    from compressor.deploy.nms_graph import add_nms
    from compressor.tasks.nms_parity import evaluate_nms_onnx, verify_nms_onnx

    cfg = state.recipe.export.nms
    if not cfg.enabled:
        return
    report, out = state.report, state.out
    layout = detector_layout(state.model)
    settings = {"layout": layout, "conf": cfg.conf, "iou": cfg.iou, "max_det": cfg.max_det}
    info(f"      NMS in the graph: {MODEL_FILE} (conf {cfg.conf}, iou {cfg.iou}, max_det {cfg.max_det})")
    with state.timer("nms"):
        report["exports"]["onnx_nms"] = add_nms(out / "model.onnx", out / MODEL_FILE, **settings)
        report["artifacts"]["onnx_nms"] = str(out / MODEL_FILE)
        if state.dense_model is not None and (out / "dense.onnx").is_file():
            report["exports"]["dense_onnx_nms"] = add_nms(out / "dense.onnx", out / DENSE_FILE, **settings)
        try:
            parity = verify_nms_onnx(state.model, out / MODEL_FILE, state.samples, **settings)
        except ParityError as exc:
            from compressor.app.pipeline import _finish

            report["status"] = "failed: parity"
            report["parity"]["onnx_nms"] = {"passed": False, "error": exc.render()}
            _finish(report, out, state.timer)
            raise
        report["parity"]["onnx_nms"] = parity
        if parity.get("note"):
            state.notes.append(parity["note"])
            info(f"      note: {parity['note']}")
        if state.val_set is not None:  # deploy() without a validation set: parity on its random inputs only
            from compressor.train.data import make_loader

            batches = make_loader(state.val_set, state.eval_batch, shuffle=False, workers=0)
            scored = evaluate_nms_onnx(out / MODEL_FILE, batches, state.task.num_classes)
            report["compressed"]["onnx_nms_map50_95"] = scored["map50_95"]
            report["compressed"]["onnx_nms_map50"] = scored["map50"]
    line = (f"      {MODEL_FILE}: {parity['file_detections']} detections on {parity['samples']} samples, "
            f"{parity['matched']} matched to the PyTorch postprocess ({parity['edge_cases']} on a threshold's edge)")
    if "onnx_nms_map50_95" in report["compressed"]:
        line += (f", mAP50-95 {report['compressed']['onnx_nms_map50_95']:.2f} of its own detections (conf "
                 f"{cfg.conf}, at most {cfg.max_det} per image)")
    info(line)


def nms_engine_stage(state: "RunState") -> None:
    """After model.engine: with export.nms.enabled and a built engine, model.nms.trt.onnx and model.nms.engine
    (NMS by EfficientNMS_TRT, compressor/deploy/trt_nms.py) beside it, the engine's detections checked against
    compressor's postprocess of the PyTorch model on the parity samples like model.nms.onnx's (ParityError after
    writing the report). Without a built engine the report says why this one was not built either (a note when
    export.tensorrt.enabled is true)."""
    cfg = state.recipe.export.nms
    report = state.report
    if not cfg.enabled or "onnx_nms" not in report["exports"]:
        return
    from compressor.deploy.trt_nms import DENSE_CONF, ENGINE_FILE, build_and_verify_nms

    raw = report["exports"].get("tensorrt") or {}
    status, reason = raw.get("status", "skipped"), raw.get("reason")
    if status == "built" and cfg.conf < DENSE_CONF:
        status, reason = "skipped", (f"export.nms.conf {cfg.conf} is below {DENSE_CONF}, where EfficientNMS_TRT "
                                     "switches to a dense kernel that can return boxes under the score threshold")
    if status != "built":
        reason = reason or f"export.tensorrt is {status}"
        report["exports"]["tensorrt_nms"] = {"status": status, "reason": reason}
        report["exports"]["onnx_nms"]["tensorrt"] = TENSORRT_NOTE.format(reason=reason)
        if state.recipe.export.tensorrt.enabled is True:
            state.notes.append(report["exports"]["onnx_nms"]["tensorrt"])
        return

    info(f"      NMS in the engine: {ENGINE_FILE} (EfficientNMS_TRT, conf {cfg.conf}, iou {cfg.iou}, max_det "
         f"{cfg.max_det}, fp32)")
    try:
        with state.timer("tensorrt_nms"):
            built = build_and_verify_nms(state.model, state.out / "model.onnx", state.samples, state.recipe,
                                         layout=detector_layout(state.model))
    except ParityError as exc:
        from compressor.app.pipeline import _finish

        report["status"] = "failed: parity"
        report["parity"]["tensorrt_nms"] = {"passed": False, "error": exc.render()}
        _finish(report, state.out, state.timer)
        raise
    report["exports"]["tensorrt_nms"] = built
    report["parity"]["tensorrt_nms"] = parity = built["parity"]
    report["artifacts"]["tensorrt_nms"] = built["path"]
    report["exports"]["onnx_nms"]["tensorrt"] = (f"export.nms: {ENGINE_FILE} built from {built['onnx']['path']} "
                                                 "(NMS by TensorRT's EfficientNMS_TRT plugin) and verified")
    if parity.get("note"):
        state.notes.append(parity["note"])
    info(f"      {ENGINE_FILE}: {parity['file_detections']} detections on {parity['samples']} samples, "
         f"{parity['matched']} matched to the PyTorch postprocess ({parity['edge_cases']} on a threshold's edge)")


def detector_layout(model: Any) -> str:
    """The detector's raw output layout ("yolo" / "boxes_scores"), or ModelLoadError for a model that names none."""
    bare = getattr(model, "module", model)
    layout = getattr(bare, "output_layout", None)
    if layout is None:
        raise ModelLoadError(f"export.nms needs a detection model that names its output layout; "
                             f"{type(bare).__name__} has no output_layout.",
                             hint="A detection model sets output_layout = 'yolo' or 'boxes_scores' "
                                  "(compressor/tasks/boxes.py).")
    return layout


def bench_pool(state: "RunState") -> Optional[torch.Tensor]:
    """The images a detector's bench draws its batches from: a seeded sample (train.data.sample_batch) of the
    validation set, as many as the largest bench batch up to BENCH_POOL; None (seeded random inputs) for other
    tasks and without a validation set."""
    if state.task.name != "detection" or state.val_set is None or not state.recipe.bench.backends:
        return None
    from compressor.train.data import sample_batch

    return sample_batch(state.val_set, min(max(state.recipe.bench.batch_sizes), BENCH_POOL))[0]


def describe_inputs(pool: Optional[torch.Tensor]) -> dict[str, Any]:
    """What a latency row says it was timed on."""
    from compressor.deploy.runners import SEED
    from compressor.train.data import SUBSET_SEED

    if pool is None:
        return {"kind": "random", "seed": SEED, "description": f"seeded random normal inputs (seed {SEED})"}
    return {"kind": "validation", "images": len(pool), "seed": SUBSET_SEED,
            "description": f"{len(pool)} validation images (a seeded sample, seed {SUBSET_SEED}); a batch takes the "
                           "first ones, cycling when it is larger"}
