"""The recipe each registered method runs with in test_method_invariants.py (and its 2-rank worker): a tiny model,
macs 0.5, round_to 8, three epochs with the selections in the first. A method not listed runs with its defaults."""
from __future__ import annotations

from tests.conftest import tiny_recipe

ROUND = 8
METHOD_SETTINGS = {
    "dpm": {"dpm": {"steps": 3, "interval": 2}},
    "fggp": {"fggp": {"granularity": "structured", "interval": 2}},
    "ocsp": {"ocsp": {"latest_prune_epoch": 1}},
}


def invariant_recipe(method: str) -> dict:
    return tiny_recipe(prune={"method": method, "target": {"macs": 0.5}, "round_to": ROUND,
                              "schedule": {"events": 2, "end_epoch": 1}, **METHOD_SETTINGS.get(method, {})},
                       finetune={"epochs": 3})
