"""prune.target latency / latency_speedup: the target's validation, the next-try rule of the measure-prune loop,
the loop converging on a runtime whose speedup follows the MACs with a realised exponent, and compress end to end
(the loop saved, reused on resume, the final speedup measured)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compressor.app.recipe import recipe_from_dict
from compressor.errors import RecipeError
from compressor.prune import latency_target as lt
from compressor.prune.config import TargetConfig
from tests.conftest import tiny_recipe


def test_latency_targets_validate_and_count_as_mac_guesses():
    t = TargetConfig(latency=0.5)
    assert t.is_latency and t.asked_latency_speedup() == 2.0 and t.remaining_macs() == 0.5
    assert TargetConfig(latency_speedup=3.0, backend="ort-cpu", batch=8).remaining_macs() == pytest.approx(1 / 3)
    assert TargetConfig(macs=0.4).asked_latency_speedup() is None
    with pytest.raises(ValueError, match="exactly one of"):
        TargetConfig(latency=0.5, macs=0.5)
    with pytest.raises(ValueError, match="belong to a latency target"):
        TargetConfig(macs=0.5, batch=8)


@pytest.mark.parametrize("target, bench, field", [
    ({"latency_speedup": 2.0, "backend": "torch"}, {"backends": ["ort-cpu"]}, "prune.target.backend 'torch'"),
    ({"latency_speedup": 2.0, "batch": 4}, {"batch_sizes": [1, 8]}, "prune.target.batch 4"),
    ({"latency": 0.5}, {"backends": []}, "bench.backends is empty"),
])
def test_latency_targets_must_be_measured_where_the_bench_measures(target, bench, field):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": target}, bench=bench))
    assert field in err.value.render() and err.value.exit_code == 2


def test_next_macs_from_one_point_uses_its_realised_exponent():
    r = math.log(1.5) / math.log(2)  # x1.5 measured at half the MACs
    assert lt.next_macs([(0.5, 1.5)], 2.0) == pytest.approx(2.0 ** (-1 / r))


def test_next_macs_interpolates_between_the_bracketing_points():
    pts = [(0.5, 1.5), (0.25, 2.6), (0.6, 1.3)]
    (m1, s1), (m2, s2) = (0.5, 1.5), (0.25, 2.6)  # the bracket around x2, not the nearest two
    expected = math.exp(math.log(m1) + (math.log(m2) - math.log(m1)) / (math.log(s2) - math.log(s1))
                        * (math.log(2.0) - math.log(s1)))
    assert lt.next_macs(pts, 2.0) == pytest.approx(expected) and 0.25 < expected < 0.5


def test_next_macs_stays_in_range_when_nothing_is_faster():
    assert lt.next_macs([(0.5, 0.9)], 3.0) == 0.25  # not faster when pruned: remove twice as much
    assert lt.next_macs([(0.03, 0.9)], 3.0) == lt.MAC_RANGE[0]
    assert lt.MAC_RANGE[0] <= lt.next_macs([(0.3, 1.0), (0.2, 1.0)], 2.0) <= lt.MAC_RANGE[1]


class FakeRunner:
    """Stands in for a bench runner: carries the MAC fraction the fake timing turns into milliseconds."""

    def __init__(self, macs: float, planner: str = "") -> None:
        self.macs, self.planner = macs, planner

    def close(self) -> None:
        """Nothing to release (the loop closes every runner it makes)."""


def _fake_runtime(monkeypatch, exponent: float, fastest: dict[str, float] | None = None, asked: float = 2.0,
                  **sections):
    """A recipe asking x`asked` (x2; `sections` override the tiny recipe's) and a stand-in runtime whose latency is
    MACs^exponent of the dense model's; `fastest` caps the speedup of one planner's plans (a layout step its widths
    cannot get past, or a runtime whose fixed costs stay)."""
    from compressor.deploy import timing
    from compressor.models.loading import example_inputs
    from compressor.prune import round_to
    from compressor.prune.op_count import snapshot_macs

    recipe = recipe_from_dict(tiny_recipe(**{"bench": {"backends": ["ort-cpu"]}, **sections,
                                             "prune": {"method": "oneshot", "target": {"latency_speedup": asked},
                                                       **sections.get("prune", {})}}))
    example = example_inputs(recipe.model)
    dense_macs = []

    def fake_runner(model, recipe, backend, path):
        macs = snapshot_macs(model, example)[0]
        dense_macs.append(macs) if not dense_macs else None
        return FakeRunner(macs / dense_macs[0], Path(path).stem.split("-")[0])  # the loop names "<planner>-try<i>"

    real_timing = timing.measure_round_robin

    def fake_timing(runners, batch, *args):
        if not all(isinstance(r, FakeRunner) for r in runners):  # the per-layer probes of the chosen plan
            return real_timing(runners, batch, *args)
        return [[1e-3 * max(r.macs ** exponent, 1 / (fastest or {}).get(r.planner, math.inf))] * 5 for r in runners]

    monkeypatch.setattr(round_to, "timing_runner", fake_runner)
    monkeypatch.setattr(timing, "measure_round_robin", fake_timing)
    return recipe


def test_the_loop_converges_on_a_runtime_with_a_realised_exponent(monkeypatch):
    """Latency ~ MACs^0.6 (a runtime that turns 60% of the MAC reduction into time, in log terms): x2 needs
    about 0.315 of the MACs, not 0.5; the loop finds it within its tolerance."""
    from compressor.models.loading import build_arch

    recipe = _fake_runtime(monkeypatch, 0.6)
    record = lt.measure_latency_target(build_arch("zoo:resnet20", 4, 1), recipe)
    assert record["met"] and abs(record["measured_speedup"] / 2.0 - 1) <= lt.TOLERANCE
    assert 1 < len(record["tries"]) <= lt.MAX_TRIES and record["tries"][0]["asked_macs"] == 0.5
    assert record["tries"][0]["speedup"] == pytest.approx(record["tries"][0]["macs"] ** -0.6)
    assert record["achieved_macs"] == pytest.approx(0.5 ** (1 / 0.6), abs=0.05)
    resolved = lt.with_mac_target(recipe, record["macs"])
    assert resolved.prune.target.macs == record["macs"] and resolved.prune._latency_target.latency_speedup == 2.0


def test_compress_to_a_latency_target_saves_the_loop_and_measures_the_result(tmp_path, monkeypatch):
    """compress with a latency target: the loop's tries timed on the stand-in runtime (latency ~ MACs^0.6; what is
    checked is where the loop's result goes, not this machine's speed: real tries take 2 s each), then training,
    export and the final bench measured for real."""
    from compressor.app.pipeline import compress

    r = _fake_runtime(monkeypatch, 0.6, asked=1.3, finetune={"epochs": 1},
                      bench={"backends": ["ort-cpu"], "batch_sizes": [8], "min_runs": 5, "min_seconds": 0,
                             "warmup_ms": 20})
    report = compress("zoo:resnet20", r, tmp_path / "run")
    t = report["target"]["latency"]
    assert t["met"] and abs(t["measured_speedup"] / 1.3 - 1) <= lt.TOLERANCE  # the loop's own measurements
    saved = json.loads((tmp_path / "run" / lt.STATE_FILE).read_text())
    assert saved["macs"] == t["macs"] and (t["backend"], t["batch"]) == ("ort-cpu", 8)
    assert 1 <= len(t["tries"]) <= lt.MAX_TRIES and t["final_speedup"] == report["latency"][0]["speedup"]
    assert report["target"]["asked"] == {"latency_speedup": 1.3}
    assert report["target"]["asked_macs_ratio"] == pytest.approx(t["macs"])
    assert abs(report["compressed"]["macs"] / report["dense"]["macs"] - t["achieved_macs"]) < 0.02
    assert "## Latency target: x1.30 on ort-cpu batch 8" in (tmp_path / "run" / "report.md").read_text()


def test_inspect_says_a_latency_target_is_estimated_until_compress_measures_it():
    from compressor.models.loading import build_arch
    from compressor.prune.methods.hosts import predict_pruning

    r = recipe_from_dict(tiny_recipe(prune={"method": "oneshot", "target": {"latency_speedup": 2.0}}))
    p = predict_pruning(build_arch("zoo:resnet20", 4, 1), r)
    assert p["asked"].startswith("latency speedup x2.00 (estimated as macs 0.500")
    assert p["macs_ratio"] == pytest.approx(0.5, abs=0.02)


def test_a_repeated_secant_bisects_the_bracket_instead(monkeypatch):
    """Speedup is a noisy step function of the widths: when the secant proposes a fraction already tried, the next
    try is the log-midpoint of the tightest bracket (0.457 too slow, 0.416 fast enough), and with no untried
    fraction inside the bracket the loop stops."""
    pts = [(0.5, 1.73), (0.416, 2.54), (0.457, 1.88)]
    monkeypatch.setattr(lt, "next_macs", lambda points, asked: 0.457)
    assert lt.next_try(pts, 2.0) == pytest.approx(math.sqrt(0.457 * 0.416))
    assert lt.next_try([(0.457, 1.9), (0.4565, 2.1)], 2.0) is None  # bracket narrower than the resolution
    assert lt.next_try([(0.457, 1.88), (0.5, 1.7)], 2.0) is None  # nothing fast enough yet: no bracket
    assert lt.next_try([(0.4, 1.9), (0.457, 2.1)], 2.0) is None  # contradicting measurements: keep the best
    monkeypatch.setattr(lt, "next_macs", lambda points, asked: 0.43)
    assert lt.next_try(pts, 2.0) == 0.43  # an untried proposal is taken as it is


def test_the_loop_aims_inside_the_band_while_it_has_time(monkeypatch):
    """A first try 4% off meets the target but the loop tries again for the middle of the band (the final bench
    re-measures); once AIM_SECONDS are spent, a try within the tolerance ends it."""
    from compressor.models.loading import build_arch

    recipe = _fake_runtime(monkeypatch, 0.94)  # speedup = MACs^-0.94: x1.92 (4% slow) at the first try's 0.5
    record = lt.measure_latency_target(build_arch("zoo:resnet20", 4, 1), recipe)
    first = record["tries"][0]["speedup"]
    assert lt.AIM < abs(first / 2.0 - 1) <= lt.TOLERANCE
    assert len(record["tries"]) > 1 and abs(record["measured_speedup"] / 2.0 - 1) < abs(first / 2.0 - 1)

    monkeypatch.setattr(lt, "AIM_SECONDS", 0.0)  # no time left to aim: the first try within the band is taken
    record = lt.measure_latency_target(build_arch("zoo:resnet20", 4, 1), recipe)
    assert len(record["tries"]) == 1 and record["met"]


def test_of_the_tries_inside_the_band_the_one_keeping_most_macs_is_taken():
    """The aim band is 2% fast to 1% slow; inside it the try keeping the most MACs wins, outside it the nearest; a
    try more than 1% fast does not settle the loop (a fraction nearer the asked speedup keeps more)."""
    def tries(*pairs):
        return [{"macs": m, "speedup": s} for m, s in pairs]

    fast, near, slow = tries((0.47, 2.035), (0.49, 1.995), (0.51, 1.97))
    assert lt.pick([fast, near, slow], 2.0) is near  # slow is 1.5% slow: outside the band
    assert lt.pick([fast, slow], 2.0) is fast
    assert lt.pick(tries((0.40, 2.3), (0.55, 1.8)), 2.0)["macs"] == 0.55  # none inside: the nearer in log ratio
    assert not lt.settled([fast], 2.0) and not lt.settled([fast, slow], 2.0)
    assert lt.settled([fast, near], 2.0) and lt.settled(tries((0.5, 2.02)), 2.0)
    assert lt.aimed({"speedup": 2.04}, 2.0) and not lt.aimed({"speedup": 2.05}, 2.0)
    assert lt.aimed({"speedup": 1.98}, 2.0) and not lt.aimed({"speedup": 1.97}, 2.0)


def test_a_try_inside_the_band_but_fast_is_followed_by_one_keeping_more(monkeypatch):
    """A first try 1.5% faster than asked is inside the band; the loop measures a larger fraction, nearer the
    asked speedup, and takes it: the model keeps more of its MACs at the speed asked."""
    from compressor.models.loading import build_arch

    recipe = _fake_runtime(monkeypatch, 1.0)
    monkeypatch.setattr(lt, "AIM_SECONDS", 0.0)
    first = lt.measure_latency_target(build_arch("zoo:resnet20", 4, 1), recipe)["tries"][0]["macs"]
    exponent = math.log(2.03) / -math.log(first)  # the first try (same plan) now measures x2.03
    recipe = _fake_runtime(monkeypatch, exponent)
    monkeypatch.setattr(lt, "AIM_SECONDS", 60.0)
    record = lt.measure_latency_target(build_arch("zoo:resnet20", 4, 1), recipe)
    assert record["tries"][0]["speedup"] == pytest.approx(2.03)
    assert len(record["tries"]) > 1 and record["achieved_macs"] > first
    assert lt.aimed({"speedup": record["measured_speedup"]}, 2.0) and record["met"]


def test_an_unreachable_target_stops_before_training_with_what_the_loop_measured(tmp_path, monkeypatch):
    """x40 asked where the runtime's fixed costs cap every plan at x2.5 (the Fashion-MNIST sample measured x2.5 at
    most): compress exits 2 before training, naming the fastest measured speedup, its MACs and widths (the
    planner's floor under max_layer_ratio 0.8) and the fix; latency_target.json keeps the tries, no report is
    written, and --resume stops the same way without measuring again."""
    from compressor.app import pipeline
    from compressor.prune import round_to

    recipe = _fake_runtime(monkeypatch, 1.0, fastest={"macs": 2.5}, asked=40.0, finetune={"epochs": 1})
    monkeypatch.setattr(pipeline, "fit", lambda *a, **k: pytest.fail("trained towards an unreachable target"))
    with pytest.raises(RecipeError) as err:
        pipeline.compress("zoo:resnet20", recipe, tmp_path / "run")
    text, run = err.value.render(), tmp_path / "run"
    assert err.value.exit_code == 2
    assert "speedup of x40.00 on ort-cpu batch 1, but the fastest plan the measure-prune loop timed ran x2.50" in text
    assert "group widths 4 of 16, 7 of 32, 13 of 64; 1 try)" in text and "nothing was trained" in text
    assert "That plan is the planner's floor" in text and "prune.max_layer_ratio 0.8 keeps at least 20%" in text
    assert "Lower prune.target.latency_speedup to at most 2.50" in text and "relax prune.max_layer_ratio" in text
    saved = json.loads((run / lt.STATE_FILE).read_text())
    assert saved["unreachable"]["at_floor"] and saved["unreachable"]["speedup"] == pytest.approx(2.5)
    assert saved["unreachable"]["macs"] == saved["tries"][0]["macs"] < 0.06
    assert not (run / "report.json").exists() and not (run / "report.md").exists()

    monkeypatch.setattr(round_to, "timing_runner", lambda *a: pytest.fail("measured again on --resume"))
    with pytest.raises(RecipeError, match="ran x2.50"):
        pipeline.compress("zoo:resnet20", recipe, run, resume=True)


def test_the_loop_stops_at_the_planner_floor_and_a_target_within_the_tolerance_is_met(monkeypatch):
    """A runtime whose speedup barely follows the MACs (MACs^-0.1) is led by the secant to the planner's floor,
    measures x1.34 there and ends (nothing faster to plan), recording the target as unreachable with the floor's
    widths; capped at x1.94, 3% short of x2, it meets the target as before."""
    from compressor.models.loading import build_arch

    monkeypatch.setattr(lt, "AIM_SECONDS", 0.0)
    record = lt.measure_latency_target(build_arch("zoo:resnet20", 4, 1), _fake_runtime(monkeypatch, 0.1))
    assert [t.get("at_floor", False) for t in record["tries"]] == [False, True]
    u = record["unreachable"]
    assert u["at_floor"] and u["speedup"] == pytest.approx(u["macs"] ** -0.1) and u["floor_speedup"] == u["speedup"]
    assert u["widths"] == [[4, 16], [7, 32], [13, 64]]
    assert u["floor_without_limits"] < u["floor_without_round_to"] == u["floor_macs"]

    record = lt.measure_latency_target(build_arch("zoo:resnet20", 4, 1), _fake_runtime(monkeypatch, 1.0,
                                                                                      fastest={"macs": 1.94}))
    assert record["met"] and "unreachable" not in record and record["measured_speedup"] == pytest.approx(1.94)


def test_the_unreachable_message_names_each_limit_that_holds_the_floor():
    record = {"asked_speedup": 40.0, "backend": "ort-cpu", "batch": 8, "tolerance": lt.TOLERANCE,
              "tries": [{}, {}, {}],
              "unreachable": {"speedup": 2.5, "macs": 0.121, "planner": "macs", "at_floor": False,
                              "floor_speedup": None, "widths": [[8, 16], [8, 32], [8, 64]], "floor_macs": 0.11,
                              "floor_without_round_to": 0.021, "floor_without_limits": 0.007, "round_to": 8,
                              "max_layer_ratio": 0.9, "ignore": ["fc"]}}
    text = lt.unreachable_error(record, Path("run/latency_target.json")).render()
    assert "The planner's floor, the fewest MACs it can keep, is 0.110 (not measured): prune.round_to" in text
    assert "prune.round_to 8 keeps every width on its multiple (without it the floor is 0.021)" in text
    assert "prune.max_layer_ratio 0.9 keeps at least 10% of every group's channels (at 1.0 the floor is 0.007)" in text
    assert "model.ignore: fc" in text and "the MACs alone would give x8.3" in text and "3 tries" in text
    assert "The tries are in run/latency_target.json." in text
    assert text.endswith("or relax prune.round_to / prune.max_layer_ratio so the planner can keep fewer MACs.")
    record["unreachable"].update(floor_speedup=2.4, floor_without_round_to=0.11, ignore=[])
    text = lt.unreachable_error(record).render()
    assert "(0.110), measured x2.40" in text and "prune.round_to" not in text and "model.ignore" not in text


@pytest.mark.parametrize("floor_exponent, unreachable", [(1.0, False), (0.2, True)])
def test_a_loop_ending_short_above_the_floor_measures_the_floor_before_calling_it_unreachable(
        monkeypatch, floor_exponent, unreachable):
    """A loop stopped above the planner's floor with every try short (out of tries, or contradicting measurements
    on a loaded machine) measures the floor once more: fast enough there (x18), the target is not out of reach
    and the run trains as before; short there too (x1.79), it is, with the floor as the fastest try."""
    from compressor.deploy import timing
    from compressor.models.loading import build_arch

    recipe = _fake_runtime(monkeypatch, 0.2)

    def fake_timing(runners, batch, *args):
        return [[1e-3 * r.macs ** (floor_exponent if r.macs < 0.06 else 0.2)] * 5 for r in runners]

    monkeypatch.setattr(timing, "measure_round_robin", fake_timing)
    monkeypatch.setattr(lt, "next_try", lambda points, asked: None)  # the loop stops after its first try
    record = lt.measure_latency_target(build_arch("zoo:resnet20", 4, 1), recipe)
    first, floor = record["tries"]
    assert first["asked_macs"] == 0.5 and lt.short(first, 2.0) and not first.get("at_floor")
    assert floor["at_floor"] and floor["asked_macs"] < floor["macs"] < 0.06
    assert floor["speedup"] == pytest.approx(floor["macs"] ** -floor_exponent)
    assert ("unreachable" in record) is unreachable
    if unreachable:
        assert record["unreachable"]["at_floor"] and record["unreachable"]["speedup"] == floor["speedup"]
