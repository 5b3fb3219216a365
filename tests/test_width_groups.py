"""The report's widths plot for deep models: layers grouped by module-name prefix (app/width_groups.py), at most
max_groups bars in the order of the model, right channel totals and kept fractions, a bounded readable figure."""
from __future__ import annotations

import struct

import pytest

from compressor.app.report import _Figures, _is_norm, _plot_widths, write_plots
from compressor.app.width_groups import group_widths, is_grouped


def _yolo_like() -> dict[str, int]:
    """A YOLO11n wrapped twice (model.model.): convs, C3k2 / SPPF / C2PSA blocks and a Detect head, with their
    batch norms; layers 11, 12, 14, 15, 18, 21 (upsample, concat) hold no conv."""
    names: list[str] = []
    for i in range(24):
        p = f"model.model.{i}"
        if i in (0, 1, 3, 5, 7, 17, 20):
            names += [f"{p}.conv", f"{p}.bn"]
        elif i in (2, 4, 13, 16, 19):
            names += [f"{p}.cv1.conv", f"{p}.cv1.bn", f"{p}.cv2.conv", f"{p}.m.0.cv1.conv", f"{p}.m.0.cv2.conv"]
        elif i in (6, 8, 22):
            names += [f"{p}.cv1.conv", f"{p}.cv2.conv", f"{p}.m.0.cv1.conv", f"{p}.m.0.cv2.conv", f"{p}.m.0.cv3.conv",
                      f"{p}.m.0.m.0.cv1.conv", f"{p}.m.0.m.0.cv2.conv", f"{p}.m.0.m.1.cv1.conv"]
        elif i == 9:
            names += [f"{p}.cv1.conv", f"{p}.cv2.conv"]
        elif i == 10:
            names += [f"{p}.cv1.conv", f"{p}.cv2.conv", f"{p}.m.0.attn.qkv.conv", f"{p}.m.0.attn.proj.conv",
                      f"{p}.m.0.ffn.0.conv", f"{p}.m.0.ffn.1.conv"]
        elif i == 23:
            names += [f"{p}.{head}.{k}.{j}" + (".conv" if j < 2 else "") for head in ("cv2", "cv3")
                      for k in range(3) for j in range(3)] + [f"{p}.dfl.conv"]
    return {n: 16 * (1 + len(n) % 4) for n in names}


YOLO_LAYERS = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "13", "16", "17", "19", "20", "22", "23"]


def _torchvision_like() -> dict[str, int]:
    """A Faster R-CNN ResNet-50 FPN: backbone.body stages of bottlenecks, fpn, rpn and roi heads."""
    names = ["backbone.body.conv1", "backbone.body.bn1"]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f"backbone.body.layer{stage}.{b}"
            names += [f"{p}.conv1", f"{p}.bn1", f"{p}.conv2", f"{p}.bn2", f"{p}.conv3", f"{p}.bn3"]
            if b == 0:
                names += [f"{p}.downsample.0", f"{p}.downsample.1"]
    names += [f"backbone.fpn.{kind}.{k}.0.0" for kind in ("inner_blocks", "layer_blocks") for k in range(4)]
    names += ["rpn.head.conv.0.0", "rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_head.fc6",
              "roi_heads.box_head.fc7", "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"]
    return {n: 64 * (1 + len(n) % 3) for n in names}


def _timm_like() -> dict[str, int]:
    """300 conv / linear layers: a stem, 7 stages of inverted-residual blocks with squeeze-excite, a head."""
    names = ["conv_stem", "bn1"]
    for stage, blocks in enumerate((2, 4, 8, 10, 10, 12, 13)):
        for b in range(blocks):
            p = f"blocks.{stage}.{b}"
            names += [f"{p}.conv_pw", f"{p}.bn1", f"{p}.conv_dw", f"{p}.bn2", f"{p}.se.conv_reduce",
                      f"{p}.se.conv_expand", f"{p}.conv_pwl", f"{p}.bn3"]
    names += ["blocks.7.0.conv", "conv_head", "pre_logits.fc", "classifier"]
    widths = {n: 8 * (1 + i % 7) for i, n in enumerate(names)}
    assert len([n for n in widths if not _is_norm(n)]) == 300
    return widths


def _pruned(dense: dict[str, int]) -> dict[str, int]:
    return {n: max(1, w * (1 + i % 4) // 4) for i, (n, w) in enumerate(dense.items())}


def _check_totals(groups, dense: dict[str, int], compressed: dict[str, int]) -> None:
    """Every layer (norms excepted) in exactly one group, groups in the order of their first layer, the channel
    totals and the kept fractions those of their layers."""
    layers = [n for n in dense if not _is_norm(n)]
    members = [n for g in groups for n in g.members]
    assert sorted(members) == sorted(layers)
    firsts = [layers.index(g.members[0]) for g in groups]
    assert firsts == sorted(firsts)
    for g in groups:
        assert g.dense == sum(dense[n] for n in g.members)
        assert g.compressed == sum(compressed[n] for n in g.members)
        assert g.kept == pytest.approx(g.compressed / g.dense)
        fractions = [compressed[n] / dense[n] for n in g.members]
        assert (g.kept_min, g.kept_max) == (pytest.approx(min(fractions)), pytest.approx(max(fractions)))
        assert g.kept_min <= g.kept <= g.kept_max


def test_a_yolo_wrapper_is_grouped_by_its_numbered_layers():
    dense = _yolo_like()
    compressed = _pruned(dense)
    groups = group_widths(dense, compressed)
    assert [g.label for g in groups] == YOLO_LAYERS  # "model.model." left out of the labels
    assert is_grouped(groups)
    _check_totals(groups, dense, compressed)
    detect = groups[-1]
    assert len(detect.members) == 19 and detect.members[-1] == "model.model.23.dfl.conv"
    assert "model.model.0.bn" not in groups[0].members


def test_a_torchvision_detector_is_grouped_by_backbone_stages_fpn_and_heads():
    dense = _torchvision_like()
    compressed = _pruned(dense)
    groups = group_widths(dense, compressed)
    assert [g.label for g in groups] == ["backbone.body.conv1", "backbone.body.layer1", "backbone.body.layer2",
                                         "backbone.body.layer3", "backbone.body.layer4", "backbone.fpn", "rpn",
                                         "roi_heads"]
    # layer3: six bottlenecks of three convs, and the downsample's conv and batch norm (named by index, so the
    # report's name test keeps it, as its per-layer table does)
    assert len(groups[3].members) == 6 * 3 + 2
    _check_totals(groups, dense, compressed)


def test_a_300_layer_timm_model_is_grouped_by_blocks():
    dense = _timm_like()
    compressed = _pruned(dense)
    groups = group_widths(dense, compressed)
    assert [g.label for g in groups] == ["conv_stem", *(f"blocks.{s}" for s in range(8)), "conv_head",
                                         "pre_logits", "classifier"]
    assert len(groups[7].members) == 13 * 5
    _check_totals(groups, dense, compressed)
    # a smaller budget: splitting the blocks would pass it, so the model stays at its top level
    assert [g.label for g in group_widths(dense, compressed, max_groups=5)] == ["conv_stem", "blocks", "conv_head",
                                                                               "pre_logits", "classifier"]
    # asking for more groups splits the largest stages into their blocks, never past max_groups
    finer = group_widths(dense, compressed, max_groups=40, min_groups=30)
    assert 30 <= len(finer) <= 40
    assert "blocks.6.12" in [g.label for g in finer]
    _check_totals(finer, dense, compressed)


def test_a_flat_model_with_too_many_top_level_layers_gets_runs_of_consecutive_layers():
    dense = {f"{i}": 4 + i % 5 for i in range(300)}
    compressed = _pruned(dense)
    groups = group_widths(dense, compressed)
    assert len(groups) == 38  # runs of ceil(300 / 40) = 8
    assert [g.label for g in groups[:2]] == ["0–7", "8–15"] and groups[-1].label == "296–299"
    assert groups[0].members == tuple(str(i) for i in range(8))
    _check_totals(groups, dense, compressed)


def test_a_model_with_few_layers_keeps_one_bar_per_layer_under_its_full_name():
    dense = {f"model.features.{i}.conv": 8 * (i + 1) for i in range(10)} | {"model.features.0.bn": 8}
    compressed = {n: w // 2 for n, w in dense.items()}
    groups = group_widths(dense, compressed)
    assert [g.label for g in groups] == [f"model.features.{i}.conv" for i in range(10)]
    assert not is_grouped(groups)
    assert [g.kept for g in groups] == [0.5] * 10
    # without a dense model (deploy() without one): the compressed widths, no fractions
    alone = group_widths({}, compressed)
    assert [g.compressed for g in alone] == [4 * (i + 1) for i in range(10)]
    assert all(g.kept is None and g.kept_min is None and g.dense == 0 for g in alone)


def test_head_counts_sit_with_their_attention_layer_and_apart_from_channels():
    dense = {f"blocks.{b}.attn:heads": 4 for b in range(12)}  # layer_widths lists the head counts first
    dense["patch_embed.proj"] = 192
    for b in range(12):
        dense |= {f"blocks.{b}.attn.qkv": 576, f"blocks.{b}.attn.proj": 192, f"blocks.{b}.mlp.fc1": 768,
                  f"blocks.{b}.mlp.fc2": 192}
    dense["head"] = 10
    compressed = dict(dense) | {"blocks.3.attn:heads": 2, "blocks.3.attn.qkv": 288, "blocks.3.mlp.fc1": 384}
    groups = group_widths(dense, compressed)
    assert [g.label for g in groups] == ["patch_embed", *(f"blocks.{b}" for b in range(12)), "head"]
    block = groups[4]
    assert block.members[0] == "blocks.3.attn:heads"
    assert (block.dense, block.compressed) == (576 + 192 + 768 + 192, 288 + 192 + 384 + 192)
    assert (block.dense_heads, block.compressed_heads) == (4, 2)
    assert (block.kept_min, block.kept_max) == (0.5, 1.0)
    with pytest.raises(ValueError, match="max_groups must be at least 1"):
        group_widths(dense, compressed, max_groups=0)


@pytest.fixture(scope="module")
def ghostnet_widths() -> dict[str, int]:
    timm = pytest.importorskip("timm")
    from compressor.models.slim import layer_widths

    return layer_widths(timm.create_model("ghostnet_100", pretrained=False))


def test_real_ghostnet_and_yolo11n_widths_give_at_most_40_groups(ghostnet_widths):
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    from compressor.models.slim import layer_widths

    groups = group_widths(ghostnet_widths, _pruned(ghostnet_widths))
    assert len([n for n in ghostnet_widths if not _is_norm(n)]) > 150
    assert 8 <= len(groups) <= 40
    assert [g.label for g in groups][:3] == ["conv_stem", "blocks.0", "blocks.1"]
    _check_totals(groups, ghostnet_widths, _pruned(ghostnet_widths))

    yolo = layer_widths(tasks.DetectionModel("yolo11n.yaml", nc=10, verbose=False))
    groups = group_widths(yolo, _pruned(yolo))
    assert len(groups) <= 40
    assert [g.label for g in groups] == YOLO_LAYERS  # the wrapper's "model." left out
    _check_totals(groups, yolo, _pruned(yolo))


def _tick_labels(fig):
    return [t for ax in fig.axes for t in (*ax.get_xticklabels(which="both"), *ax.get_yticklabels(which="both"))]


def test_the_ghostnet_widths_figure_is_bounded_and_readable(ghostnet_widths):
    compressed = _pruned(ghostnet_widths)
    fig = _plot_widths(_Figures(), {"dense": {"widths": ghostnet_widths}, "compressed": {"widths": compressed}})
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 1600 and height <= 800
    assert all(t.get_fontsize() >= 7 for t in _tick_labels(fig))
    kept_ax, channels_ax = fig.axes
    labels = [t.get_text() for t in channels_ax.get_xticklabels()]
    groups = group_widths(ghostnet_widths, compressed)
    assert labels == [g.label for g in groups]
    assert 45 <= channels_ax.get_xticklabels()[0].get_rotation() <= 60
    assert "grouped by block" in fig._suptitle.get_text()
    kept_bars = [p.get_height() for p in kept_ax.patches]
    assert kept_bars == pytest.approx([g.kept for g in groups])


def test_a_figure_of_300_layers_without_a_dense_model_is_bounded_and_written(tmp_path):
    compressed = _timm_like()
    fig = _plot_widths(_Figures(), {"dense": None, "compressed": {"widths": compressed}})
    assert len(fig.axes) == 1  # no kept fractions without a dense model: the compressed totals per group
    assert (fig.get_size_inches() * fig.dpi)[0] <= 1600
    assert [p.get_height() for p in fig.axes[0].patches] == [g.compressed for g in group_widths({}, compressed)]
    assert fig._suptitle.get_text().startswith("Compressed widths, grouped by block")
    # the flat 300-layer model through write_plots: one PNG, its width bounded
    dense = {f"{i}": 16 for i in range(300)}
    written = write_plots({"recipe": {"prune": {"method": "dpm"}}, "dense": {"widths": dense},
                           "compressed": {"widths": _pruned(dense)}}, tmp_path)
    png = (tmp_path / "plot_widths.png").read_bytes()
    assert written["widths"] == str(tmp_path / "plot_widths.png")
    assert struct.unpack(">I", png[16:20])[0] <= 16 * 110 + 100  # the PNG's width at the report's 110 dpi


def test_a_small_model_keeps_the_per_layer_title():
    dense = {"0": 16, "4": 16, "8": 4}
    fig = _plot_widths(_Figures(), {"dense": {"widths": dense}, "compressed": {"widths": {"0": 8, "4": 12, "8": 4}}})
    assert fig._suptitle.get_text() == "Per-layer widths before and after pruning"
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["0", "4", "8"]
    assert [p.get_height() for p in fig.axes[0].patches] == [0.5, 0.75, 1.0]
