"""Prefill latency and decode tokens per second of ONNX causal language models with a key/value cache
(lm_export.py), batch 1, greedy, timed in turn (A B A B ...) with deploy/timing.py's loop so that machine noise hits
every model alike; the first model is the baseline (the dense one) every ratio is taken against.

Prefill: one run of the prompt on an empty cache (ms, median). Decode: `new_tokens` cached steps after that prefill,
each feeding the previous step's greedy token (tokens/s = new_tokens / median time of the steps together). The
cache grows from the prompt's length, as in generation. numpy + onnxruntime only: this runs on an edge device
without torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from compressor.deploy.bench import environment
from compressor.deploy.lm_session import KVCache, LMSession
from compressor.deploy.runners import SEED, Runner, random_input
from compressor.deploy.timing import Budget, time_in_turn
from compressor.errors import UsageError


class PrefillRunner(Runner):
    """Times the prompt on an empty cache."""

    name = "prefill"

    def __init__(self, lm: LMSession, prompt_tokens: int) -> None:
        self.lm, self.prompt_tokens = lm, prompt_tokens
        self.prompt: Optional[np.ndarray] = None
        self.empty: Optional[KVCache] = None

    def prepare(self, batch_size: int) -> None:
        self.prompt = random_input((batch_size, self.prompt_tokens), np.int64)
        self.empty = self.lm.empty_cache(batch_size)

    def run_once(self) -> None:
        self.lm.run(self.prompt, self.empty)


class DecodeRunner(PrefillRunner):
    """Times `new_tokens` greedy steps after the prompt's cache (filled once, in prepare)."""

    name = "decode"

    def __init__(self, lm: LMSession, prompt_tokens: int, new_tokens: int) -> None:
        super().__init__(lm, prompt_tokens)
        self.new_tokens = new_tokens

    def prepare(self, batch_size: int) -> None:
        super().prepare(batch_size)
        logits, self.cache = self.lm.run(self.prompt, self.empty)
        self.first = logits[:, -1].argmax(-1)[:, None]

    def run_once(self) -> None:
        token, cache = self.first, self.cache
        for _ in range(self.new_tokens):
            logits, cache = self.lm.run(token, cache)
            token = logits[:, -1].argmax(-1)[:, None]


def _check(models: Sequence[Any], prompt_tokens: int, new_tokens: int, min_runs: int, warmup_ms: float,
           min_seconds: float) -> None:
    if not models:
        raise UsageError("the language-model bench needs at least one ONNX model.")
    if prompt_tokens < 1 or new_tokens < 1:
        raise UsageError(f"the prompt length ({prompt_tokens}) and the number of generated tokens ({new_tokens}) "
                         "must both be at least 1.")
    if min_runs < 1 or warmup_ms < 0 or min_seconds < 0:
        raise UsageError("min_runs must be positive; warmup_ms and min_seconds not negative.")


def bench_lms(models: Sequence[str | Path], *, prompt_tokens: int = 128, new_tokens: int = 32,
              backend: str = "ort-cpu", threads: Optional[int] = None, warmup_ms: float = 200.0,
              min_runs: int = 5, min_seconds: float = 1.0) -> dict[str, Any]:
    """Prefill ms and decode tokens/s of every model (timed in turn; at least `min_runs` repeats and
    `min_seconds` each, for prefill and decode alike), with each model's ratios against the first:
    prefill_speedup = first's prefill ms / this one's, decode_speedup = this one's tokens/s / first's."""
    _check(models, prompt_tokens, new_tokens, min_runs, warmup_ms, min_seconds)
    budget = Budget(warmup_ms, min_runs, min_seconds)
    sessions: list[LMSession] = []
    try:
        for path in models:
            sessions.append(LMSession.open(path, backend, threads=threads, spinning=len(models) == 1))
        prefill = time_in_turn([PrefillRunner(s, prompt_tokens) for s in sessions], 1, budget)
        decode = time_in_turn([DecodeRunner(s, prompt_tokens, new_tokens) for s in sessions], 1, budget)
    finally:
        for session in reversed(sessions):
            session.close()
    prefill_ms, decode_ms = prefill.p50_ms, decode.p50_ms
    results = []
    for i, (path, session) in enumerate(zip(models, sessions)):
        tokens_per_second = new_tokens / (decode_ms[i] / 1e3)
        results.append({
            "model": str(path), "exporter": session.exporter, "layers": session.layers,
            "prefill_ms": prefill_ms[i], "decode_tokens_per_second": tokens_per_second,
            "decode_ms_per_token": decode_ms[i] / new_tokens,
            "prefill_speedup": prefill_ms[0] / prefill_ms[i],
            "decode_speedup": tokens_per_second / (new_tokens / (decode_ms[0] / 1e3)),
            "prefill": prefill.measurement(i)["latency"], "decode": decode.measurement(i)["latency"]})
    exporters = {r["exporter"] for r in results}
    report = {"environment": environment(threads),
              "config": {"models": [str(m) for m in models], "backend": backend, "batch_size": 1,
                         "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "decoding": "greedy",
                         "warmup_ms": warmup_ms, "min_runs": min_runs, "min_seconds": min_seconds,
                         "threads": threads, "seed": SEED, "interleaved": len(models) > 1},
              "results": results}
    if len(exporters) > 1:
        report["note"] = ("the models were written by different exporters (" + ", ".join(map(str, exporters)) +
                          "); their ratios mix the pruning with the exporters' attention kernels.")
    return report
