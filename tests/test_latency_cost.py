"""A latency table as the planner's cost model (prune/latency_cost.py): torch layers matched to table rows by what
their latency depends on, the widths a group may keep (where its curve steps down), importance per millisecond
instead of per channel, refusal of a table made for another model, the open loop for a table from another machine,
and compress end to end from a table."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.app.recipe import recipe_from_dict
from compressor.deploy.latency_table import FORMAT, prunable_layers, sample_widths, write_table
from compressor.errors import UsageError
from compressor.prune import latency_target as lt
from compressor.prune.planning import (Constraints, allowed_removals, constraints_from, plan_for_macs, plan_for_target,
                                       plan_global)
from compressor.prune.removal import remove
from compressor.prune.snapshot import Candidate, Snapshot, snapshot
from compressor.prune.latency_cost import (Curve, LatencyCost, build_cost, group_widths, layer_signatures,
                                           predicted_speedup, row_signature)
from compressor.prune.importance import ImportanceConfig, build_scorer
from tests.conftest import tiny_recipe
from tests.test_latency_table import _net


def _export(model: nn.Module, shape, path: Path) -> Path:
    """The dense export the way compress and `compressor export` write it (BatchNorm folded into the convs)."""
    from compressor.deploy.config import OnnxConfig
    from compressor.deploy.export import export_onnx

    export_onnx(model.eval(), torch.randn(1, *shape), path, OnnxConfig(simplify=False))
    return path


def _synthetic_table(onnx_path: Path, batch: int, step: int = 4, environment: dict | None = None) -> dict:
    """A table whose per-layer times are proportional to each layer's MACs at every width (no timing)."""
    import onnx

    rows = []
    for layer in prunable_layers(onnx.load(str(onnx_path))):
        widths = sample_widths(layer.width, step)
        per_out = float(torch.tensor(layer.weight_shape).prod()) / layer.width * 1e-6
        spatial = float(torch.tensor(layer.input_shape[1:]).prod()) if layer.op == "Conv" else 1.0
        rows.append({**asdict(layer), "width": layer.width, "depthwise": layer.depthwise, "widths": widths,
                     "p50_ms": {str(batch): [w * per_out * spatial + 1e-4 for w in widths]},
                     "overhead_ms": {str(batch): 1e-4}})
    from compressor.deploy.bench import environment as env

    return {"format": FORMAT, "model": {"path": str(onnx_path), "sha256": "0" * 64}, "backend": "ort-cpu",
            "batches": [batch], "step": step, "threads": None, "environment": environment or env(),
            "model_p50_ms": {str(batch): sum(r["p50_ms"][str(batch)][-1] for r in rows) * 1.25}, "layers": rows}


def test_torch_layers_match_the_rows_of_their_own_export(tmp_path):
    model = _net()
    path = _export(model, (3, 16, 16), tmp_path / "net.onnx")
    import onnx

    rows = [row_signature({**asdict(layer)}) for layer in prunable_layers(onnx.load(str(path)))]
    torch_side = layer_signatures(model, torch.randn(1, 3, 16, 16))
    assert sorted(torch_side.values()) == sorted(rows)
    assert torch_side["3"] == ("conv", (24, 8, 8), (24, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 24)
    assert torch_side["8"] == ("linear", (16,), (16, 5))


def test_a_curve_interpolates_and_scales_with_kept_inputs():
    curve = Curve([8, 16, 24], [1.0, 1.0, 3.0], out=24, inputs=12, depthwise=False)
    assert curve.at(24) == 3.0 and curve.at(20) == pytest.approx(2.0) and curve.at(4) == pytest.approx(0.5)
    assert curve.cost(24, 6) == pytest.approx(1.5)  # half the inputs: half the time
    assert Curve([8, 16], [1.0, 2.0], 16, 16, depthwise=True).cost(16, 4) == 2.0  # a depthwise conv's inputs are its outputs


def _two_groups(score_a: float, score_b: float, ms_a: float, ms_b: float):
    """Two independent 16-channel layers a and b with equal MACs, and a cost model giving them ms_a / ms_b per
    4 channels."""
    cands = [Candidate(root, 16, torch.full((16,), s), [(root, "out", list(range(16)), 16)])
             for root, s in (("a", score_a), ("b", score_b))]
    snap = Snapshot(cands, {"a": 100.0, "b": 100.0}, {"a": (16, 1, False), "b": (16, 1, False)}, 0.0, 200.0, 0)
    curves = {root: Curve([4, 8, 12, 16], [ms * k for k in (1, 2, 3, 4)], 16, 1, False)
              for root, ms in (("a", ms_a), ("b", ms_b))}
    cost = LatencyCost(curves, 0.0, 200.0)
    cost.kept_widths = {c.root: group_widths(snap, c, curves) for c in cands}
    return snap, cost


def test_a_plan_the_table_prices_at_no_time_has_no_predicted_speedup(tmp_path):
    """Removing every tabled channel with no time outside the tabled layers predicts 0 ms: no finite speedup, so
    None (null in latency_target.json and report.json; it was inf, written as `Infinity`), shown as n/a."""
    from compressor.app.report import _latency_target_section

    snap, cost = _two_groups(score_a=1.0, score_b=1.0, ms_a=1.0, ms_b=1.0)
    everything = {"a": list(range(16)), "b": list(range(16))}
    assert cost.predict(snap, everything) == 0.0 and predicted_speedup(cost, snap, everything) is None
    assert predicted_speedup(cost, snap, {"a": [0, 1, 2, 3]}) == pytest.approx(8 / 7)  # 8 ms -> 3 + 4 ms
    table = {"path": "lut.json", "cpu": "Some Edge SoC", "layers": 2, "backend": "ort-cpu", "batch": 1,
             "layers_ms": 8.0, "model_p50_ms": 8.0}
    record = {"asked_speedup": 2.0, "backend": "ort-cpu", "batch": 1, "planner": "table", "table": table,
              "macs": 0.0, "achieved_macs": 0.0, "open_loop": True, "tries": [{"predicted_speedup": None}],
              "final_speedup": None, "tolerance": 0.05}
    assert "predicted n/a;" in lt.latency_target_note(record)
    assert "(n/a, 0.000 of the MACs)" in "\n".join(_latency_target_section({"target": {"latency": record}}))


def test_channels_are_ranked_by_importance_per_millisecond():
    """b's channels score lower, so the MAC planner takes them first; a's cost ten times more time each, so per
    millisecond they are the cheaper importance to give up, and the table planner takes a's."""
    snap, cost = _two_groups(score_a=1.2, score_b=1.0, ms_a=1.0, ms_b=0.1)
    by_macs = plan_for_macs(snap, 150.0, Constraints())
    assert set(by_macs) == {"b"}
    by_latency = plan_for_macs(snap, 0.75 * 200.0, Constraints(cost=cost))  # 0.75 of the predicted 4.4 ms
    # the ranking takes 4 of a's (3.4 ms), then the refinement one 4-channel step of b lands on the budget exactly
    assert {root: len(idxs) for root, idxs in by_latency.items()} == {"a": 4, "b": 4}
    assert cost.predict(snap, by_latency) == pytest.approx(3.3)
    by_ranking = plan_global(cost.weighted(snap), 8, Constraints(cost=cost))
    assert {root: len(idxs) for root, idxs in by_ranking.items()} == {"a": 8}


def test_a_probe_bias_that_the_whole_model_contradicts_does_not_move_the_plan(tmp_path):
    """Probes of the 16x16 first stage pay layout conversions the whole model does not: with their times tripled the
    planner cuts that stage differently; with the in-context times (proportional to MACs, as the unbiased table's)
    it plans what the unbiased table plans."""
    import copy

    from compressor.models.loading import build_arch, example_inputs
    from compressor.prune.round_to import magnitude_snapshot

    model = build_arch("zoo:resnet20", 4, 1)
    fair = _synthetic_table(_export(model, (1, 16, 16), tmp_path / "dense.onnx"), 1)
    biased = copy.deepcopy(fair)
    for row in biased["layers"]:
        row["context_ms"] = {"1": row["p50_ms"]["1"][-1] - row["overhead_ms"]["1"]}
        if list(row["input_shape"][1:]) == [16, 16]:
            row["p50_ms"]["1"] = [3 * t for t in row["p50_ms"]["1"]]
    uncalibrated = copy.deepcopy(biased)
    for row in uncalibrated["layers"]:
        del row["context_ms"]
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": {"macs": 0.5}}))
    base, snap = magnitude_snapshot(model, recipe)

    def plan(table):
        cost = build_cost(table, base, example_inputs(recipe.model), snap, 1)
        return cost, plan_for_macs(snap, 0.6 * snap.total_macs, constraints_from(recipe, cost=cost))

    (fair_cost, fair_plan), (cal_cost, cal_plan), (_, raw_plan) = plan(fair), plan(biased), plan(uncalibrated)
    assert {k: len(v) for k, v in cal_plan.items()} == {k: len(v) for k, v in fair_plan.items()}
    assert {k: len(v) for k, v in raw_plan.items()} != {k: len(v) for k, v in fair_plan.items()}
    assert cal_cost.curves["layer1.0.conv1"].at(16) == pytest.approx(fair_cost.curves["layer1.0.conv1"].at(16))


def test_a_group_keeps_only_the_widths_where_its_latency_steps_down():
    cand = Candidate("a", 32, torch.ones(32), [("a", "out", list(range(32)), 32)])
    snap = Snapshot([cand], {"a": 1.0}, {"a": (32, 3, False)}, 0.0, 1.0, 0)
    curves = {"a": Curve([8, 16, 24, 32], [1.0, 1.0, 2.0, 2.0], 32, 3, False)}  # 24 costs what 32 does, 8 what 16 does
    assert group_widths(snap, cand, curves) == {32, 16}
    cost = LatencyCost(curves, 0.0, 1.0, kept_widths={"a": {32, 16}})
    assert allowed_removals(32, Constraints(cost=cost), "a") == [0, 16]  # 8 is below max_layer_ratio 0.8 (6.4)


def test_a_table_for_another_model_is_refused_naming_the_layer(tmp_path):
    from compressor.models.loading import build_arch, example_inputs

    table = _synthetic_table(_export(_net(), (3, 16, 16), tmp_path / "net.onnx"), 8)
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": {"latency_speedup": 1.5}}))
    from compressor.prune.round_to import magnitude_snapshot

    model = build_arch("zoo:resnet20", 4, 1)
    base, snap = magnitude_snapshot(model, recipe)
    with pytest.raises(UsageError, match=r"no row for \d+ of this model's \d+ prunable layers \(conv1 \(conv 1->16 "
                                         r"3x3 stride 1,1 on 1x16x16\)") as info:
        build_cost(table, base, example_inputs(recipe.model), snap, 8, source="lut.json")
    assert info.value.exit_code == 2 and "compressor latency-table model.onnx" in info.value.hint


def _resnet_table(tmp_path, batch: int, **kw) -> tuple[Path, object]:
    from compressor.models.loading import build_arch

    model = build_arch("zoo:resnet20", 4, 1)
    path = tmp_path / "lut.json"
    write_table(_synthetic_table(_export(model, (1, 16, 16), tmp_path / "dense.onnx"), batch, **kw), path)
    return path, model


def test_a_table_from_another_machine_plans_open_loop_without_measuring(tmp_path, monkeypatch):
    from compressor.prune import round_to

    path, model = _resnet_table(tmp_path, 1, environment={"cpu": "Some Edge SoC", "cpu_count": 4, "gpu": None})
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": {"latency_speedup": 1.6,
                                                                                 "table": str(path)}},
                                          bench={"backends": ["ort-cpu"], "batch_sizes": [1]}))

    def no_timing(*args, **kwargs):
        raise AssertionError("the open loop must not measure on this machine")

    monkeypatch.setattr(round_to, "timing_runner", no_timing)
    resolved, record = lt.resolve_latency_target(recipe, model, out=tmp_path)
    assert record["open_loop"] and record["measured_speedup"] is None and record["met"] is None
    assert record["planner"] == "table" and record["table"]["cpu"] == "Some Edge SoC"
    assert record["tries"][0]["predicted_speedup"] == pytest.approx(1.6, rel=0.1)
    assert resolved.prune._latency_cost is not None and resolved.prune.target.macs == pytest.approx(1 / 1.6)
    assert {x["name"] for x in record["layers"]} >= {"conv1", "layer1.0.conv1"}
    assert "not on this machine" in lt.latency_target_note(record)
    assert json.loads((tmp_path / lt.STATE_FILE).read_text())["open_loop"] is True


def test_every_method_plans_with_the_table_once_resolved(tmp_path):
    """The resolved recipe's constraints carry the cost model, so a MAC budget f is read as f of the predicted
    dense latency by the planner every method calls, and only the table's widths are kept."""
    from compressor.models.loading import example_inputs
    from compressor.prune.round_to import magnitude_snapshot

    path, model = _resnet_table(tmp_path, 1)
    recipe = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": {"latency_speedup": 1.6,
                                                                                 "table": str(path)}},
                                          bench={"backends": ["ort-cpu"], "batch_sizes": [1]}))
    base, snap = magnitude_snapshot(model, recipe)
    cost = lt.table_cost(recipe, base, snap)
    resolved = lt.with_mac_target(recipe, 0.6, cost)
    cons = constraints_from(resolved)
    assert cons.cost is cost
    plan = plan_for_target(snap, resolved.prune.target, cons)
    assert cost.predict(snap, plan) == pytest.approx(0.6 * cost.dense_ms, rel=0.08)
    for cand in snap.candidates:
        assert cand.width - len(plan.get(cand.root, ())) in cost.kept_widths[cand.root]
    remove(base, example_inputs(recipe.model), plan)  # torch-pruning can carry the plan out


def test_compress_plans_from_a_table_and_reports_it(tmp_path, monkeypatch):
    """With the MAC ranking's plans counted as missing the speedup, the loop measures the table's plan too and
    plans with it where it reaches the speedup; the report lists both plans' tries and the table's per-layer view.
    What is checked is the plumbing, not this machine's speed: the table is synthetic (measure_table has its own
    tests) and the loop's tries are timed on test_latency_target's stand-in runtime (latency ~ MACs); the chosen
    plan's layers, the final bench and everything else in compress run for real."""
    from compressor.app.pipeline import compress
    from tests.test_latency_target import _fake_runtime

    lut, _ = _resnet_table(tmp_path, 8)
    real = lt.within
    monkeypatch.setattr(lt, "within", lambda measured, asked: measured["planner"] != "macs" and real(measured, asked))
    r = _fake_runtime(monkeypatch, 1.0, asked=1.3, finetune={"epochs": 1},
                      prune={"target": {"latency_speedup": 1.3, "table": str(lut)}},
                      bench={"backends": ["ort-cpu"], "batch_sizes": [8], "min_runs": 5, "min_seconds": 0,
                             "warmup_ms": 20})
    report = compress("zoo:resnet20", r, tmp_path / "run")
    t = report["target"]["latency"]
    assert t["table"]["layers"] == 22 and not t.get("open_loop")
    assert [x["planner"] for x in t["tries"]][0] == "macs" and {x["planner"] for x in t["tries"]} == {"table", "macs"}
    best = {p: min((x for x in t["tries"] if x["planner"] == p), key=lambda x: abs(math.log(x["speedup"] / 1.3)))
            for p in ("table", "macs")}
    assert t["planner"] == lt.choose_planner(best, 1.3)[0] and t["choice"] in lt.latency_target_note(t)
    assert all(x["predicted_speedup"] > 1 for x in t["tries"]) and t["final_speedup"] == report["latency"][0]["speedup"]
    # a latency budget when the table's plan won, a MAC fraction when the MAC ranking's did
    assert (report["target"]["asked_macs_ratio"] is None) == (t["planner"] == "table")
    text = (tmp_path / "run" / "report.md").read_text()
    assert ("Planned from the latency table" if t["planner"] == "table" else "Given the latency table") in text
    assert "| try | planner | budget asked | MACs | predicted |" in text
    assert "Choice of plan: the MAC ranking's plan kept" in text and "Where the time goes" in text
    layers = {x["name"]: x for x in t["layers"]}
    widths = report["compressed"]["widths"]
    assert all(widths[name] == x["kept_out"] for name, x in layers.items())
    assert all(x["measured_ms"] is not None and x["measured_ms"] >= 0 for x in layers.values())
    assert "| layer | width | dense ms | pruned ms predicted | measured |" in text and "All tabled layers: predicted" in text


def test_the_table_plan_is_measured_only_where_the_mac_ranking_misses(tmp_path, monkeypatch):
    """The MAC ranking's plan first: within the tolerance, the table's plan is not measured and the report says
    so; where a layout step keeps the MAC ranking's plans below x1.6, the table's plan is measured and taken. The
    chosen plan's per-layer probes are a stand-in here (test_compress_plans_from_a_table_and_reports_it times them)."""
    from compressor.prune.round_to import magnitude_snapshot
    from tests.test_latency_target import _fake_runtime

    probed = []
    monkeypatch.setattr(lt, "measured_layers", lambda model, recipe, backend, batch, folder: probed.append(batch) or {})

    path, model = _resnet_table(tmp_path, 1)
    with_table = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": {"latency_speedup": 2.0,
                                                                                     "table": str(path)}},
                                              bench={"backends": ["ort-cpu"], "batch_sizes": [1]}))
    base, snap = magnitude_snapshot(model, with_table)
    cost = lt.table_cost(with_table, base, snap)

    recipe = _fake_runtime(monkeypatch, 1.0)
    record = lt.measure_latency_target(model, recipe, cost)
    assert record["planner"] == "macs" and record["met"] and {x["planner"] for x in record["tries"]} == {"macs"}
    assert "so the table's plan was not needed" in record["choice"] and record["layers"]
    assert probed == [1] and all("measured_ms" in x for x in record["layers"])  # the chosen plan's layers probed
    assert lt.with_mac_target(recipe, record["macs"]).prune._latency_cost is None

    recipe = _fake_runtime(monkeypatch, 1.0, fastest={"macs": 1.6})
    record = lt.measure_latency_target(model, recipe, cost)
    assert [x["planner"] for x in record["tries"]][0] == "macs" and record["planner"] == "table" and record["met"]
    assert "the MAC ranking's plan kept" in record["choice"] and "(not within 5%)" in record["choice"]
    assert all(x["speedup"] <= 1.6 + 1e-9 for x in record["tries"] if x["planner"] == "macs")


def test_the_mac_ranking_plan_is_kept_whenever_it_reaches_the_speedup():
    def plan(macs, speedup):
        return {"macs": macs, "speedup": speedup}

    assert lt.choose_planner({"macs": plan(0.5, 1.5)}, 1.5) == ("macs", None)
    # both within 5%: the MAC ranking's, even where the table's keeps more MACs (it fine-tuned worse on the sample)
    both = lt.choose_planner({"table": plan(0.62, 1.58), "macs": plan(0.49, 1.55)}, 1.57)
    assert both[0] == "macs" and "the MAC ranking's plan kept 0.490 of the MACs at x1.55 (within 5%)" in both[1]
    # only the table's within 5%: the table's, whatever it keeps
    only = lt.choose_planner({"table": plan(0.40, 1.56), "macs": plan(0.60, 1.30)}, 1.57)
    assert only[0] == "table" and "x1.30 (not within 5%)" in only[1]
    # neither: the nearer one
    near = lt.choose_planner({"table": plan(0.40, 1.35), "macs": plan(0.60, 1.20)}, 1.57)
    assert near[0] == "table" and near[1].endswith("the nearer")
    assert lt.choose_planner({"table": plan(0.40, 1.10), "macs": plan(0.60, 1.40)}, 1.57)[0] == "macs"


def test_compress_refuses_a_missing_table_and_a_table_without_a_latency_target(tmp_path):
    from tests.conftest import invoke_cli

    missing = invoke_cli("compress", "zoo:resnet20", "--recipe", "resnet20-fmnist-dpm", "--latency-table",
                         str(tmp_path / "lut.json"), "--out", str(tmp_path / "run"))
    assert missing.returncode == 2 and "--latency-table" in missing.stderr and "no such file" in missing.stderr
    (tmp_path / "lut.json").write_text("{}")
    mac_target = invoke_cli("compress", "zoo:resnet20", "--recipe", "resnet20-fmnist-dpm", "--latency-table",
                            str(tmp_path / "lut.json"), "--out", str(tmp_path / "run"))
    assert mac_target.returncode == 2 and "prune.target" in mac_target.stderr
    assert "backend, batch and table belong to a latency target" in mac_target.stderr
    assert "Traceback" not in mac_target.stderr + missing.stderr and not (tmp_path / "run").exists()


def test_attention_heads_the_table_cannot_time_are_priced_by_their_macs(tmp_path):
    """torchvision's MultiheadAttention is one layer to the op counter and no row of the table (its projections are
    not plain Linear layers): its heads cost the tabled layers' milliseconds per MAC, so the planner sees removing
    one save time (before, they cost nothing and were removed last) and the prediction drops by that much."""
    from compressor.models.loading import example_inputs
    from tests.helpers_models import tiny_vit4

    torch.manual_seed(0)
    model = tiny_vit4(num_classes=4).eval()
    recipe = recipe_from_dict(tiny_recipe(
        model={"arch": "python:tests.helpers_models:tiny_vit4", "num_classes": 4, "in_channels": 3,
               "input_shape": [3, 32, 32]},
        prune={"method": "oneshot", "target": {"macs": 0.6}, "attention": {"heads": True}}))
    example = example_inputs(recipe.model)
    snap = snapshot(model, example, [], build_scorer(ImportanceConfig()), heads=True)
    table = _synthetic_table(_export(model, (3, 32, 32), tmp_path / "vit.onnx"), 1)
    table["model_p50_ms"]["1"] *= 4  # time outside the Linear layers: attention, norms, activations
    cost = build_cost(table, model, example, snap, 1)
    layers = ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"]
    assert cost.source["mac_priced"] == layers
    tabled = [n for n in cost.curves if n not in layers]
    per_mac = sum(cost.curves[n].at(cost.curves[n].out) for n in tabled) / sum(snap.layer_macs[n] for n in tabled)
    assert cost.curves[layers[0]].at(cost.curves[layers[0]].out) == pytest.approx(per_mac * snap.layer_macs[layers[0]])
    head = next(c for c in snap.candidates if c.root == f"{layers[0]}:heads")
    assert cost.channel_ms(snap, head) > 0
    saved = cost.predict(snap, {}) - cost.predict(snap, {head.root: [0]})
    assert saved == pytest.approx(per_mac * snap.layer_macs[layers[0]] / 4, rel=1e-6)  # one of its 4 heads
    assert cost.dense_ms == pytest.approx(table["model_p50_ms"]["1"])  # the priced time came out of the fixed part
    table["model_p50_ms"]["1"] = sum(r["p50_ms"]["1"][-1] for r in table["layers"]) + 1e-3  # hardly any time left
    squeezed = build_cost(table, model, example, snap, 1)
    priced = [squeezed.curves[n].at(squeezed.curves[n].out) for n in layers]
    full = [cost.curves[n].at(cost.curves[n].out) for n in layers]
    assert squeezed.fixed_ms == pytest.approx(0.0, abs=1e-9) and squeezed.dense_ms == pytest.approx(
        table["model_p50_ms"]["1"])  # never more priced time than the table left outside its layers
    assert priced[0] / priced[1] == pytest.approx(full[0] / full[1]) and sum(priced) < sum(full)  # scaled alike
