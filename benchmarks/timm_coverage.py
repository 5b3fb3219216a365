"""What `compressor compress` handles across timm: one or more models from every timm model family (module of
timm.models), pruned to a MAC target with no fine-tuning, with every miss of the target explained.

    python benchmarks/timm_coverage.py [--models NAME ...] [--macs 0.7] [--timeout 900] [--rerun] [--no-bench]
                                       [--keep-artifacts] [--out runs/timm]

For every model of MODELS (the smallest variant of each family, timm's own test_* models where they exist, and the
models named in issue 14), built as `timm:NAME` with pretrained=False (nothing is downloaded): `compressor
inspect` (dependency groups, unprunable layers with their reasons) and `compressor compress` with the shipped
recipe resnet50-imagenet-latency at macs 0.7 on synthetic data, no fine-tuning, ONNX export, parity against
PyTorch and ORT-CPU latency at batch 1 (1 thread, short). The input is timm's pretrained_cfg input_size, or where
that is over 224 (or the model over 10 GMACs there) the largest of 224, 192, 160, 128, 112, 96, 64, 56 that the
model accepts and that keeps it under 10 GMACs (checked by a forward on the meta device). Every model runs in its own process with a time limit, so a crash, a
timeout or an out-of-memory kill is a row. Status: ok / ok, target not met / not prunable: MSG / error: TYPE: MSG
(compressor's own errors) / traceback: TYPE at FILE:LINE (an exception that escaped compressor: a defect; the
whole traceback is kept in the JSON store). A MAC result more than 2% from the target gets a `why` computed from
the inspection: the fewest MACs pruning can reach under max_layer_ratio / round_to and the share of MACs in layers
whose outputs are fixed (attention widths, grouped convs, custom layers, channel splits, the classifier).
Rows are kept in results/timm_coverage.json (re-run models with --models NAME ... --rerun); the table is
results/timm_coverage.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from common import (RESULTS, bench_overrides, cell, coverage_parser, coverage_row, params_cell, parity_cell,
                    print_meta, print_row, run_isolated, status_counts, sweep, table, write_result, zoo_overrides)

STORE = RESULTS / "timm_coverage.json"
MAC_BUDGET = 10e9  # dense MACs at the chosen input; larger inputs are shrunk where the model accepts it
SIZES = (224, 192, 160, 128, 112, 96, 64, 56)  # 112 and 56 for patch-14 models
HEADER = ["model", "family", "input", "groups", "MACs dense", "MACs kept", "params dense → slim",
          "parity max diff (relative)", "speedup b1", "status", "why (MAC target missed by > 2%)", "seconds"]

# The smallest variant of every family (timm.models module), timm's test_* models, and the models issue 14 names
# (test_nfnet, test_efficientnet_gn, fastvit_t8, cspdarknet53, edgenext_xx_small, ghostnetv2_100, dla34,
# mobilenetv4_conv_small, resnet50d, levit_128s, efficientformerv2_s0, rexnet_100). Families are read from timm.
MODELS = (
    # convolutional: ResNet and its relatives
    "test_resnet", "resnet10t", "resnet50d", "resnetv2_18", "resnetv2_50x1_bit", "legacy_seresnet18",
    "res2net50_48w_2s", "resnest14d", "skresnet18", "tresnet_m", "selecsls42", "haloregnetz_b", "dla34", "dla46_c",
    "dpn48b", "densenet121", "hrnet_w18_small", "vgg11", "repvgg_a0", "test_byobnet", "regnetx_002", "regnety_002",
    "cs3darknet_s", "cspdarknet53", "cspnext_tiny", "ese_vovnet19b_slim_dw", "rdnet_tiny", "test_nfnet",
    "nf_regnet_b0",
    # Inception, Xception, NAS cells
    "inception_v3", "inception_v4", "inception_resnet_v2", "legacy_xception", "xception41", "nasnetalarge",
    "pnasnet5large",
    # mobile convolutional
    "test_efficientnet", "test_efficientnet_gn", "test_efficientnet_ln", "efficientnet_b0", "mixnet_s",
    "mobilenetv3_small_050", "lcnet_050", "mobilenetv4_conv_small", "mobilenetv4_hybrid_medium", "mobilenetv5_base",
    "ghostnet_050", "ghostnetv2_100", "ghostnetv3_050", "repghostnet_050", "rexnet_100", "hardcorenas_a",
    "hgnetv2_b0", "lcnetv2_small", "fasternet_t0", "starnet_s050", "cpubone_nano", "repvit_m0_9", "fastvit_t8",
    "efficientvit_b0", "efficientvit_m0", "efficientvim_m1", "shvit_s1", "lowformer_b0", "iformer_t", "csatv2",
    # ConvNeXt and MetaFormer-style
    "test_convnext", "convnext_atto", "inception_next_atto", "poolformer_s12", "test_mambaout", "convmixer_1024_20_ks9_p14",
    "edgenext_xx_small", "efficientformer_l1", "efficientformerv2_s0", "swiftformer_xs", "focalnet_tiny_srf",
    # vision transformers
    "test_vit", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "test_vit_relpos", "vit_tiny_r_s16_p8_224",
    "eva02_tiny_patch14_224", "beit_base_patch16_224", "samvit_base_patch16", "naflexvit_base_patch16_gap",
    "qwen3_vit_88m", "gemma4_vit_167m", "deepseek_vit_412m", "cait_xxs24_224", "convit_tiny", "crossvit_tiny_240",
    "pit_ti_224", "tnt_s_patch16_224", "xcit_nano_12_p16_224", "volo_d1_224", "vitamin_small_224",
    # hierarchical / hybrid transformers
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_224", "levit_128s", "pvt_v2_b0",
    "twins_svt_small", "coat_lite_tiny", "gcvit_xxtiny", "davit_tiny", "hiera_tiny_224", "sam2_hiera_tiny",
    "mvitv2_tiny", "nest_tiny", "tiny_vit_5m_224", "test_maxvit", "test_coatnet", "mobilevit_xxs", "mobilevitv2_050",
    "nextvit_small", "visformer_tiny",
    # MLPs and recurrent
    "mixer_s32_224", "gmlp_ti16_224", "sequencer2d_s",
)


def families() -> dict[str, str]:
    """{model: timm family}, the family being the timm.models module that registers the model."""
    import timm

    return {model: module for module in timm.list_modules() for model in timm.list_models(module=module)}


def meta_macs(model, size: int) -> float:
    """MACs of one forward at size x size, counted on the meta device (no weights, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2


def pick_input(name: str) -> tuple[int, float | None]:
    """(input size, its MACs by the meta count): timm's pretrained_cfg input_size where it is at most 224 and the
    model stays under MAC_BUDGET there, else the first of SIZES below it that the model accepts and that stays under
    the budget (the smallest accepted when none does; the default when none is accepted)."""
    import warnings

    import timm
    import torch

    default = int(timm.models.get_pretrained_cfg(name).input_size[-1])
    candidates = ([default] if default <= 224 else []) + [s for s in SIZES if s < default]
    candidates += [] if default <= 224 else [default]  # a fixed size over 224 (a Swin V2 window of 8 at 256)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False).eval()
    except Exception:  # the real build in the pipeline says why
        return min(default, 224), None
    accepted = []
    for size in candidates:
        try:
            macs = meta_macs(model, size)
        except Exception:
            continue
        if macs <= MAC_BUDGET:
            return size, macs
        accepted.append((size, macs))
    return min(accepted) if accepted else (default, None)


def one(name: str, macs: float, out: Path, bench: bool = True, keep: bool = False) -> dict:
    """Run inspect + compress on one timm model (in this process) and return its row fields."""
    family = families().get(name, "?")
    size, counted = pick_input(name)
    print_meta({"family": family, "input": size})
    overrides = zoo_overrides(name, size, macs, scheme="timm")
    overrides += bench_overrides(threads=1, seconds=1.0, warmup_ms=300) if bench else ["bench.backends=[]"]
    row = coverage_row(name, "timm", size, overrides, out, keep, threads=1)
    if counted and row.get("macs_dense") and abs(row["macs_dense"] / counted - 1) > 0.2 and "why" in row:
        row["why"] += (f"; dense MACs counted {row['macs_dense'] / 1e9:.3g} G by compressor vs {counted / 1e9:.3g} G by "
                       "torch's FlopCounter (matmuls included)")
    return {"model": name, "family": family, **row, "meta_macs": counted}


def fmt(row: dict) -> list:
    return [row["model"], cell(row, "family"), cell(row, "input"), cell(row, "groups"),
            cell(row, "macs_dense", lambda v: f"{v / 1e9:.2f} G"), cell(row, "macs_kept", lambda v: f"{v:.3f}"),
            params_cell(row), parity_cell(row), cell(row, "speedup", lambda v: f"x{v:.2f}"),
            row["status"].replace("|", "/"), row.get("why", "").replace("|", "/"), cell(row, "seconds")]


def write_table(rows: dict, macs: float, echo: bool = False) -> None:
    done = sorted(rows.values(), key=lambda r: (r.get("family", "?"), r["model"]))
    counts = status_counts(done)
    fams = {r.get("family") for r in done}
    seconds = sum(r.get("seconds") or 0 for r in done)
    missing = sorted(set(families().values()) - fams)
    defects = [r for r in done if r["status"].startswith(("traceback", "process died", "timeout"))]
    misses = [r for r in done if abs(r.get("miss", 0)) > 0.02]
    text = (f"# timm through `compressor compress` (macs {macs}, no fine-tuning)\n\n"
            f"`python benchmarks/timm_coverage.py`: {len(done)} models of {len(fams)} timm families "
            f"({'every family of this timm' if not missing else 'families not covered: ' + ', '.join(missing)}); "
            + ", ".join(f"{n} {k}" for k, n in counts.most_common()) + f"; {seconds / 60:.0f} min in all.\n\n"
            "Models built as `timm:NAME` with pretrained=False (random init; layers initialised to zero are redrawn "
            "so that parity proves something), recipe resnet50-imagenet-latency (uniform per-layer ranking, "
            "round_to 16, max_layer_ratio 0.8, classifier kept) with macs 0.7, no fine-tuning, synthetic data at "
            "timm's input size (over 224, or over 10 GMACs: the largest of 224 down to 56 the model accepts under 10 GMACs); "
            "ORT-CPU 1 thread, batch 1, dense and slim interleaved (short: 10 runs / 1 s, so speedups are rough). "
            "Parity: max abs diff on 4 samples (diff / max |output|). Status `traceback` is an exception that escaped "
            "compressor (a defect: the traceback is in timm_coverage.json); `not prunable` / `error` are compressor's "
            "own messages. The why column explains a MAC result more than 2% from the target from `compressor "
            "inspect`: the floor pruning can reach under max_layer_ratio / round_to, and the share of dense MACs in "
            "layers whose outputs no group can narrow, by inspect's reason.\n\n"
            + table(HEADER, [fmt(r) for r in done]))
    if defects:
        text += "\n## Defects (tracebacks, crashes, timeouts)\n\n" + table(
            ["model", "family", "status", "error", "compressor frame"],
            [[r["model"], r.get("family", "?"), r["status"], (r.get("error") or "").replace("|", "/"),
              r.get("compressor_frame") or "-"] for r in defects])
    if misses:
        text += "\n## MAC target misses over 2%\n\n" + table(
            ["model", "MACs kept", "why"], [[r["model"], f"{r['macs_kept']:.3f}", r["why"]] for r in misses])
    write_result("timm_coverage.md", text, echo=echo)


def main() -> None:
    args = coverage_parser(__doc__, Path("runs/timm"), timeout=900).parse_args()
    if args.one:
        print_row(one(args.one, args.macs, args.out, args.bench, args.keep))
        return
    known = families()
    unknown = [m for m in args.models or () if m not in known]
    if unknown:
        raise SystemExit(f"not timm models: {', '.join(unknown)}")
    missing = sorted(set(known.values()) - {known[m] for m in MODELS if m in known})
    if missing and not args.models:
        print(f"note: MODELS covers no model of these timm families: {', '.join(missing)}")
    family = dict(known)
    sweep(args.models or MODELS, STORE, lambda name: {"family": family[name], **run_isolated(__file__, name, args)},
          lambda rows: write_table(rows, args.macs), rerun=args.rerun,
          show=lambda row: f"{row['status']} {row.get('why', '')}".strip())
    write_table(json.loads(STORE.read_text()), args.macs, echo=True)


if __name__ == "__main__":
    main()
