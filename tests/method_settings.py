"""The recipe each registered method (and DPM around each registered host) runs with in test_method_invariants.py (and its 2-rank worker): a tiny model,
macs 0.5, round_to 8, three epochs with the selections in the first. A method not listed runs with its defaults."""
from __future__ import annotations

from tests.conftest import tiny_recipe

ROUND = 8
METHOD_SETTINGS = {
    "dpm": {"dpm": {"steps": 3, "interval": 2}},
    "fggp": {"fggp": {"granularity": "structured", "interval": 2}},
    "ocsp": {"ocsp": {"latest_prune_epoch": 1}},
}


HOST_SETTINGS = {
    "otov2": {"schedule": {"events": 2, "start_epoch": 1, "end_epoch": 2}, "otov2": {"lmbda": 1.0}},  # HSPG first
}


def invariant_recipe(method: str, host: str = "depgraph") -> dict:
    return tiny_recipe(prune={"method": method, "host": host, "target": {"macs": 0.5}, "round_to": ROUND,
                              "schedule": {"events": 2, "end_epoch": 1}, **METHOD_SETTINGS.get(method, {}),
                              **HOST_SETTINGS.get(host, {})},
                       finetune={"epochs": 3})
