"""Distributed training under torchrun with the gloo backend (CPU): identical ranks, only rank 0 writes. Each test
reads its case (the `ddp` mark: tests/ddp_worker.py's arguments) from the session's one two-rank launch."""
from __future__ import annotations

import pytest


@pytest.mark.ddp("none")
def test_two_rank_gloo_run_gives_identical_weights_and_rank0_writes(ddp):
    out, ranks = ddp
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["val_top1"] == ranks[1]["val_top1"]  # evaluation is sharded and all-reduced
    assert ranks[0]["writes"] == [str(out / "ckpt.pt")] * 2  # one checkpoint per epoch, rank 0 only
    assert ranks[1]["writes"] == []
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "ranks.json"]


@pytest.mark.ddp("dpm")
def test_two_rank_dpm_takes_identical_decisions(ddp):
    _, ranks = ddp
    first, second = (r["decisions"] for r in ranks)
    assert first["totals"]["released"] > 0 and first["totals"]["removed"] > 0  # SR really acted
    assert first == second  # same events, releases, backfills, removals and decay traces on both ranks
    assert ranks[0]["digest"] == ranks[1]["digest"]


@pytest.mark.ddp("dpm", "heads")
def test_two_rank_dpm_takes_identical_head_decisions(ddp):
    _, ranks = ddp
    first, second = (r["decisions"] for r in ranks)
    assert first == second and ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["widths"] == ranks[1]["widths"]
    packed = [shape[0] for name, shape in ranks[0]["widths"].items() if name.endswith("self_attention.in_proj_weight")]
    assert len(packed) == 2 and sum(packed) < 2 * 3 * 32, packed  # heads were removed (4 heads of 8 each, dense)



@pytest.mark.ddp("compress")
def test_two_rank_compress_measures_and_writes_on_rank_0_only(ddp):
    """round_to: auto and a latency target's loop run once, on rank 0, before training; rank 1 adopts the results
    and writes nothing (the process group starts before the run directory is prepared)."""
    _, (first, second) = ddp
    assert first["timed"] > 0 and second["timed"] == 0  # round_to candidates timed on rank 0 alone
    assert first["loops"] == 1 and second["loops"] == 0
    assert second["written"] == []
    assert first["written"].count("round_to.json") == 1 and first["written"].count("latency_target.json") == 1
    assert first["written"].count("recipe.yaml") == 1
    assert first["round_to"] == 1 and first["status"] == "ok"  # the worker times every candidate alike
    assert first["loop_macs"] == second["loop_macs"] == first["record_macs"] == second["record_macs"] == 0.6
