"""The recipe each registered method (and DPM around each registered host) runs with in test_method_invariants.py (and its 2-rank worker): a tiny model,
macs 0.5, round_to 8, three epochs of 4 optimizer steps with selections at steps 0 and 6, so the checkpoint of the first
epoch falls between two events (gradient scores accumulating, HSPG driving channels to zero) and a resume from it
must carry that state. A method not listed runs with its defaults."""
from __future__ import annotations

from tests.conftest import tiny_recipe

ROUND = 8
METHOD_SETTINGS = {
    "dpm": {"dpm": {"steps": 2, "interval": 3}},  # the first event's channels go at step 3, the second's at step 9
    "fggp": {"fggp": {"granularity": "structured", "interval": 2}},
    "ocsp": {"ocsp": {"latest_prune_epoch": 1}},
}


HOST_SETTINGS = {
    "otov2": {"schedule": {"events": 2, "start_epoch": 1, "end_epoch": 2}, "otov2": {"lmbda": 1.0}},  # HSPG first
}


def invariant_recipe(method: str, host: str = "depgraph") -> dict:
    return tiny_recipe(prune={"method": method, "host": host, "target": {"macs": 0.5}, "round_to": ROUND,
                              "schedule": {"events": 2, "end_epoch": 3}, **METHOD_SETTINGS.get(method, {}),
                              **HOST_SETTINGS.get(host, {})},
                       finetune={"epochs": 3})
