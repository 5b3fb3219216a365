"""Every Hugging Face image-classification family through `compressor compress hf:DIR`: transformers'
MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, each family's classifier built randomly initialised from a small
config, written with save_pretrained and compressed with prune.attention.heads: true at macs 0.7.

    python benchmarks/hf_vision.py [--families NAME ...] [--macs 0.7] [--timeout 600] [--out runs/hf_vision]

Per family (model_type), in its own process with a time limit: the small config of SMALL (hidden widths 16-64, 1-2
layers per stage, 32x32 inputs where the family takes them; 3 labels), the class AutoModelForImageClassification
builds for it, every parameter plus normal noise (std NOISE: zero-initialised heads, position-bias tables and
scales would make parity prove nothing), save_pretrained to DIR, then `compressor compress hf:DIR` (library call) with a tiny recipe:
synthetic data (16 training, 8 validation samples), oneshot pruning to macs 0.7 with attention heads, one fine-tune
epoch, ONNX export and parity, no latency bench. Status: ok (the ONNX parity and the save_pretrained folder from the
report) / refused: MSG (compressor's own error, with where the run stopped) / build failed: why the small config
did not build (a missing optional package) / traceback: TYPE at FILE:LINE, process died, timeout (defects).
Writes benchmarks/results/hf_vision.md and hf_vision.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# this file's folder goes last on the path: first, benchmarks/transformers.py would shadow the transformers package
sys.path.append(sys.path.pop(0))

from common import RESULTS, failure_fields, print_row, table, write_result  # noqa: E402

STORE = RESULTS / "hf_vision.json"
LABELS = 3
SIZE = 32

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=SIZE,
           patch_size=8)
SWIN = dict(image_size=SIZE, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
                   patch_size=8)
CLIP_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=16)

NOISE = 0.02  # std of the normal noise added to every initialised parameter
SIZES = {"mobilevitv2": 64}  # input side where 32 pools a family's last stage to nothing

# model_type -> small config keyword arguments (besides num_labels, num_channels where it exists)
SMALL: dict[str, dict[str, Any]] = {
    "beit": dict(VIT, use_relative_position_bias=True),
    "bit": dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_groups=4),
    "clip": dict(vision_config=CLIP_VISION, text_config=CLIP_TEXT),
    "convnext": dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=SIZE),
    "convnextv2": dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=SIZE),
    "cvt": dict(embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2],  # transformers indexes depth by stage patch_sizes=[7, 3], patch_stride=[4, 2],
                patch_padding=[2, 1], mlp_ratio=[2.0, 2.0], attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0],
                drop_path_rate=[0.0, 0.0], qkv_bias=[True, True], cls_token=[False, True], qkv_projection_method=
                ["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1], stride_kv=[2, 2], padding_q=[1, 1],
                stride_q=[1, 1]),
    "data2vec-vision": dict(VIT, use_relative_position_bias=True),
    "deit": dict(VIT),
    "dinat": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], kernel_size=3, mlp_ratio=2.0),
    "dinov2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=SIZE,
                   patch_size=8),
    "dinov2_with_registers": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                  image_size=SIZE, patch_size=8, num_register_tokens=2),
    "donut-swin": dict(SWIN),
    "efficientnet": dict(image_size=SIZE, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                         kernel_sizes=[3, 3], in_channels=[32, 16], out_channels=[16, 24], num_block_repeats=[1, 1],
                         expand_ratios=[1, 6], strides=[1, 2], depthwise_padding=[]),
    "focalnet": dict(image_size=SIZE, patch_size=4, embed_dim=16, hidden_sizes=[16, 32], depths=[1, 1],
                     focal_levels=[2, 2], focal_windows=[3, 3]),
    "hgnet_v2": dict(embedding_size=16, depths=[1, 1], hidden_sizes=[32, 64], stem_channels=[3, 16, 16],
                     stage_in_channels=[16, 32], stage_mid_channels=[16, 16], stage_out_channels=[32, 64],
                     stage_num_blocks=[1, 1], stage_downsample=[False, True], stage_downsample_strides=[2, 2],
                     stage_light_block=[False, True], stage_kernel_size=[3, 5], stage_numb_of_layers=[2, 2]),
    "hiera": dict(embed_dim=16, image_size=[SIZE, SIZE], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1],
                  depths=[1, 1], num_heads=[1, 2], masked_unit_size=[4, 4], query_stride=[2, 2],
                  num_query_pool=1, mlp_ratio=2.0),
    "ijepa": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=SIZE,
                  patch_size=8),
    "imagegpt": dict(vocab_size=17, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "levit": dict(image_size=SIZE, patch_size=16, hidden_sizes=[32, 48], num_attention_heads=[2, 3], depths=[1, 1],
                  key_dim=[8, 8], drop_path_rate=0, mlp_ratio=[2, 2], attention_ratio=[2, 2],
                  down_ops=[["Subsample", 8, 2, 4, 2, 2]]),
    "metaclip_2": dict(vision_config=CLIP_VISION, text_config=CLIP_TEXT),
    "mobilenet_v1": dict(image_size=SIZE, depth_multiplier=0.25, min_depth=8),
    "mobilenet_v2": dict(image_size=SIZE, depth_multiplier=0.25, min_depth=8),
    "mobilevit": dict(image_size=SIZE, patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24,
                      32, 64], num_attention_heads=2, mlp_ratio=2.0),
    "mobilevitv2": dict(image_size=64, patch_size=2, width_multiplier=0.25, n_attn_blocks=[1, 1, 1],
                        base_attn_unit_dims=[32, 48, 64]),
    "perceiver": dict(num_latents=8, d_latents=32, d_model=32, num_blocks=1, num_self_attends_per_block=1,
                      num_self_attention_heads=2, num_cross_attention_heads=1, image_size=SIZE),
    "poolformer": dict(hidden_sizes=[16, 32], depths=[1, 1], patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1],
                       num_encoder_blocks=2, mlp_ratio=2.0),
    "pp_lcnet": dict(scale=0.25, stem_channels=16, class_expand=64, block_configs=[[[3, 16, 32, 1, False]],
                     [[3, 32, 64, 2, False]], [[3, 64, 64, 2, False]], [[3, 64, 128, 2, False]],
                     [[5, 128, 256, 2, True]]]),
    "pvt": dict(image_size=SIZE, num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1],
                hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2],
                mlp_ratios=[2, 2]),
    "pvt_v2": dict(image_size=[SIZE, SIZE], num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                   patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    "regnet": dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8),
    "resnet": dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck"),
    "segformer": dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
                      strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32),
    "shieldgemma2": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=SIZE, patch_size=8),
                         text_config=dict(vocab_size=262_208, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                                          head_dim=8), mm_tokens_per_image=4),
    "siglip": dict(vision_config=CLIP_VISION, text_config=CLIP_TEXT),
    "siglip2": dict(vision_config=dict(CLIP_VISION, num_patches=16), text_config=CLIP_TEXT),
    "swiftformer": dict(image_size=SIZE, depths=[1, 1, 1, 1], embed_dims=[16, 16, 32, 32], mlp_ratio=2),
    "swin": dict(SWIN),
    "swinv2": dict(SWIN),
    "textnet": dict(stem_out_channels=16, hidden_sizes=[16, 16, 32, 32, 64], image_size=[SIZE, SIZE]),
    "timm_wrapper": dict(architecture="test_resnet"),
    "vit": dict(VIT),
    "vit_msn": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=SIZE,
                    patch_size=8),
}


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return list(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def build(family: str, folder: Path) -> tuple[str, int]:
    """The family's classifier (the class AutoModelForImageClassification builds) from its small config, randomly
    initialised (seed 0) and saved to `folder`; returns (class name, input size)."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[family]
    name = names[0] if isinstance(names, tuple) else names
    kwargs = dict(SMALL.get(family, {}))
    config = CONFIG_MAPPING[family](**kwargs, num_labels=LABELS)
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).eval()
    with torch.no_grad():  # zero-initialised heads, bias tables and scales would make parity prove nothing
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=NOISE)
    model.save_pretrained(folder)
    return name, SIZES.get(family, SIZE)


def recipe(folder: Path, size: int, macs: float) -> dict[str, Any]:
    return {"name": "hf-vision",
            "model": {"arch": f"hf:{folder}", "num_classes": LABELS, "in_channels": 3, "input_shape": [3, size, size]},
            "data": {"kind": "synthetic", "batch_size": 8, "synthetic": {"train_size": 16, "val_size": 8}},
            "prune": {"method": "oneshot", "target": {"macs": macs}, "attention": {"heads": True}},
            "finetune": {"epochs": 1, "optimizer": {"lr": 0.01}},
            "verify": {"samples": 8},
            "bench": {"backends": []}}


def run_one(family: str, macs: float, out: Path) -> dict[str, Any]:
    import torch

    from compressor.app.pipeline import compress
    from compressor.app.recipe import recipe_from_dict

    torch.set_num_threads(1)
    row: dict[str, Any] = {"family": family}
    start = time.perf_counter()
    folder = out / family / "model"
    try:
        row["class"], row["input"] = build(family, folder)
    except Exception as exc:  # the small config does not build here: not compressor's verdict
        row.update(status="build failed", why=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        return row
    try:
        ref = f"hf:{folder}"
        report = compress(ref, recipe_from_dict(recipe(folder, row["input"], macs)), out / family / "run", overwrite=True)
        widths, dense = report["compressed"]["widths"], report["dense"]["widths"]
        heads = [k for k in dense if k.endswith(":heads")]
        parity = report["parity"]["onnx"]
        row.update(status="ok", macs_kept=report["compressed"]["macs"] / report["dense"]["macs"],
                   heads_kept=sum(widths.get(k, dense[k]) for k in heads), heads_dense=sum(dense[k] for k in heads),
                   parity=parity["max_abs_diff"], parity_rel=parity.get("relative_diff"),
                   parity_uninformative=parity.get("same_output_for_all", False),
                   target_met=report["target"].get("met") is not False,
                   target_note=next((n for n in report.get("notes", []) if n.startswith("MAC target missed")), None),
                   hf_folder=bool(((report.get("exports") or {}).get("hf_pretrained") or {}).get("written")),
                   notes=[n for n in report.get("notes", []) if "save_pretrained" in n],
                   fallback=report["exports"]["onnx"].get("fallback"))
    except Exception as exc:
        row.update(failure_fields(exc))
        status = row["status"]  # compressor's own errors are verdicts: refused, and where the run stopped
        if status.startswith("error: "):
            row["status"] = "refused: " + status[len("error: "):]
        elif status.startswith("not prunable: "):
            row["status"] = "refused: NotPrunableError: " + status[len("not prunable: "):]
        if row["status"].startswith("refused"):
            row["stage"] = stage(exc)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def stage(exc: BaseException) -> str:
    """Where a compress run stopped, from the functions its traceback passes through."""
    names = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
    if "load_inputs" in names:
        return "at load (before training)"
    if "on_train_start" in names:
        return "at the first pruning event (before any training step)"
    if "prune_and_finetune" in names:
        return "during training"
    return "after training"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=None)
    parser.add_argument("--macs", type=float, default=0.7)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per family (torch-pruning's grouping "
                        "gives up after 300 s: FocalNet)")
    parser.add_argument("--out", type=Path, default=Path("runs/hf_vision"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print_row(run_one(args.one, args.macs, args.out))
        return
    rows = json.loads(STORE.read_text()) if STORE.is_file() else {}
    for family in args.families or families():
        cmd = [sys.executable, __file__, "--one", family, "--macs", str(args.macs), "--out", str(args.out)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
            rows[family] = (json.loads(lines[-1][4:]) if lines else
                            {"family": family, "status": f"process died (exit {done.returncode}): "
                             f"{(done.stderr.strip().splitlines() or ['no output'])[-1][:300]}"})
        except subprocess.TimeoutExpired:
            rows[family] = {"family": family, "status": f"timeout after {args.timeout} s"}
        print(f"{family}: {rows[family]['status']}", flush=True)
        STORE.parent.mkdir(parents=True, exist_ok=True)
        STORE.write_text(json.dumps(rows, indent=1) + "\n")
        write_table(rows, args)
    write_table(rows, args)


INTERNAL = ("traceback", "process died", "timeout")  # anything but ok / refused / build failed is a defect


def _lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def write_table(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    import torch
    import transformers

    order = [f for f in families() if f in rows] + [f for f in rows if f not in families()]
    header = ["family", "classifier", "status", "heads kept", "MACs kept", "ONNX parity max diff (relative)",
              "save_pretrained (hf/)", "seconds"]
    lines = []
    for family in order:
        row = rows[family]
        status = row["status"]
        if status.startswith("refused"):
            status = f"refused {row.get('stage', '')}"
        elif status == "build failed":
            status = f"build failed: {row.get('why', '')}"
        elif status.startswith("traceback"):
            status = f"{status}: {row.get('error', '')}"
        ok = row["status"] == "ok"
        if ok and row.get("fallback"):
            status = f"ok; {row['fallback']}"
        heads = f"{row['heads_kept']}/{row['heads_dense']}" if ok and row.get("heads_dense") else "-"
        parity = (f"{row['parity']:.1e}" + (f" ({row['parity_rel']:.0e})" if row.get("parity_rel") is not None else "")
                  + (" (same output for every sample: proves nothing)" if row.get("parity_uninformative") else "")
                  if ok else "-")
        if ok and not row.get("target_met", True):
            status = f"{status}, MAC target not met: {row.get('target_note') or ''}"
        saved = ("written" if row.get("hf_folder") else "not written: " + "; ".join(
            n.removeprefix("no save_pretrained folder: ") for n in row.get("notes", []))) if ok else "-"
        lines.append([family, row.get("class", "-"), _cell(status), heads,
                      f"{row['macs_kept']:.3f}" if ok else "-", parity, _cell(saved), row.get("seconds", "-")])
    counts = {"ok": 0, "refused": 0, "build failed": 0, "internal error": 0}
    for row in rows.values():
        kind = next((k for k in ("ok", "refused", "build failed") if row["status"].startswith(k)), "internal error")
        counts[kind] += 1
    missed = sum(1 for row in rows.values() if row["status"] == "ok" and not row.get("target_met", True))
    refusals = [f"- **{f}** ({rows[f].get('stage', '')}): {_cell(rows[f]['status'][len('refused: '):])}"
                for f in order if rows[f]["status"].startswith("refused")]
    command = "python benchmarks/hf_vision.py" + (f" --macs {args.macs}" if args.macs != 0.7 else "")
    text = (f"# Hugging Face image classifiers through `compress hf:DIR`\n\n"
            f"`nice -n 10 {command}` ({datetime.date.today().isoformat()}; CPU: {_lscpu()} (lscpu), shared with other "
            f"jobs; transformers {transformers.__version__}, torch {torch.__version__.split('+')[0]}).\n\n"
            "Every family of transformers' `MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`: the class "
            "AutoModelForImageClassification builds, randomly initialised (seed 0) from a small config (SMALL in the "
            "script: widths 16-64, 1-2 layers per stage, 3 labels, 32x32 inputs, 64x64 for MobileViTV2), every "
            f"parameter plus normal noise of std {NOISE} (zero-initialised heads and position-bias tables would make "
            "parity prove nothing), written with save_pretrained, then `compressor compress hf:DIR` in its own process: synthetic data (16 "
            "training, 8 validation samples), oneshot to macs 0.7 with `prune.attention.heads: true`, one fine-tune "
            "epoch, ONNX export and parity on 8 samples, no latency bench. ok = the run finished with ONNX parity; "
            "refused = compressor's own error (exit 2) and where it stopped; build failed = the small config does not "
            "build here (not compressor's verdict). save_pretrained (hf/) is written only where config.json can "
            "describe the pruned shapes, else the report's note says why (the slim model reloads every shape).\n\n"
            f"{counts['ok']} ok ({missed} of them with the MAC target missed by more than 2%: the report's note "
            f"says why), {counts['refused']} refused, {counts['build failed']} build failed, "
            f"{counts['internal error']} internal errors, of {len(rows)} families.\n\n"
            + table(header, lines) + "\n## Refusals\n\n" + ("\n".join(refusals) or "none") + "\n")
    write_result("hf_vision.md", text, echo=False)


if __name__ == "__main__":
    main()
