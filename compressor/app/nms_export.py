"""export.nms in compress and deploy: model.nms.onnx and dense.nms.onnx (a detector's raw ONNX with NMS in the graph,
compressor/deploy/nms_graph.py), their parity with compressor's postprocess of the PyTorch outputs
(compressor/tasks/nms_parity.py), the mAP of the file's own detections, and the real images a detector is benchmarked
on (NMS costs what the content makes it: random noise gives a different number of candidates than photographs).
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
TENSORRT_NOTE = ("export.nms: the TensorRT engine is built from model.onnx and keeps its raw head outputs; "
                 "compressor does not put NMS into engines (TensorRT's EfficientNMS_TRT plugin writes the same "
                 "num_dets / det_boxes / det_scores / det_classes layout as model.nms.onnx, so code reading one "
                 "reads the other)")


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
    report["exports"]["onnx_nms"]["tensorrt"] = TENSORRT_NOTE
    if state.recipe.export.tensorrt.enabled is True:
        state.notes.append(TENSORRT_NOTE)


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
