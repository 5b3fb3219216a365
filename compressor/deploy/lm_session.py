"""A causal language model exported with its key/value cache (compressor/deploy/lm_export.py), run on ONNX Runtime:
a prefill of the prompt, then one token per step that reads the cache the step before wrote. Shared by the parity
check (lm_export.verify_kv_parity) and the tokens-per-second bench (lm_bench.py); numpy + onnxruntime only, so it
runs on a device without torch.

The graph's contract (what onnxruntime-genai's model builder writes, and what lm_export's torch path writes too):
inputs `input_ids` [batch, sequence] and `attention_mask` [batch, past + sequence] (int64), and per layer i
`past_key_values.{i}.key` / `.value` [batch, kv heads, past, head dim]; outputs `logits` [batch, sequence, vocab]
and `present.{i}.key` / `.value` [batch, kv heads, past + sequence, head dim]. The head dim is symbolic in the
builder's graph, so lm_export writes each layer's (kv heads, head dim) into the file's metadata (KV_SHAPES_KEY).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from compressor.deploy.onnx_runtime import ORT_DTYPES
from compressor.deploy.runners import open_onnx_session
from compressor.errors import ModelLoadError

KV_SHAPES_KEY = "compressor.kv_shapes"  # JSON [[kv heads, head dim], ...] per layer
EXPORTER_KEY = "compressor.exporter"  # which exporter wrote the graph ("onnxruntime-genai 0.18.0", "torch.onnx ...")
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


@dataclass
class KVCache:
    """The cache after a run: one array per past input name, and how many positions it holds."""

    arrays: dict[str, np.ndarray]
    length: int


class LMSession:
    """One ONNX causal LM with a KV cache on an ONNX Runtime session (`open` builds it from a file)."""

    def __init__(self, session: Any, source: str, kv_shapes: list[tuple[int, int]], exporter: Optional[str] = None):
        self.session, self.source, self.exporter = session, source, exporter
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        past = sorted((int(m.group(1)), m.group(2)) for m in map(_PAST.fullmatch, inputs) if m)
        layers = len(past) // 2
        expected = {"input_ids", "attention_mask", *(f"past_key_values.{i}.{kind}" for i in range(layers)
                                                      for kind in ("key", "value"))}
        if set(inputs) != expected or "logits" not in outputs or not layers:
            raise ModelLoadError(
                f"{source} is not a causal language model with a key/value cache as compressor runs it: it takes "
                f"{', '.join(inputs)} and gives {', '.join(outputs)}.",
                hint="Export it with compressor.deploy.lm_export.export_causal_lm (input_ids, attention_mask and "
                     "past_key_values.N.key/value in; logits and present.N.key/value out).")
        if len(kv_shapes) != layers:
            raise ModelLoadError(f"{source} has {layers} layers of past key/values, but its metadata "
                                 f"{KV_SHAPES_KEY!r} describes {len(kv_shapes)}.",
                                 hint="Export it again with export_causal_lm.")
        self.layers, self.kv_shapes = layers, [(int(h), int(d)) for h, d in kv_shapes]
        self.ids_dtype = np.dtype(ORT_DTYPES.get(inputs["input_ids"].type, np.int64))
        self.mask_dtype = np.dtype(ORT_DTYPES.get(inputs["attention_mask"].type, np.int64))
        self.past_dtype = np.dtype(ORT_DTYPES.get(inputs["past_key_values.0.key"].type, np.float32))
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        self.output_names = ["logits", *(n.replace("past_key_values", "present") for n in self.past_names)]

    @classmethod
    def open(cls, path: str | Path, backend: str = "ort-cpu", *, threads: Optional[int] = None,
             spinning: bool = True) -> "LMSession":
        """The file's session on `backend` (runners.open_onnx_session: a file that does not load is an error naming
        it) with the cache shapes from its metadata."""
        session = open_onnx_session(path, backend, threads=threads, spinning=spinning)
        meta = session.get_modelmeta().custom_metadata_map
        source = repr(Path(path).name)
        if KV_SHAPES_KEY not in meta:
            raise ModelLoadError(f"{source} has no {KV_SHAPES_KEY!r} metadata (each layer's key/value heads and head "
                                 "dim), so its empty cache can not be built.",
                                 hint="Export it with compressor.deploy.lm_export.export_causal_lm.")
        return cls(session, source, json.loads(meta[KV_SHAPES_KEY]), meta.get(EXPORTER_KEY))

    def empty_cache(self, batch: int = 1) -> KVCache:
        """A cache that holds no position yet (the prefill's past)."""
        arrays = {name: np.zeros((batch, *self._shape(name, 0)), self.past_dtype) for name in self.past_names}
        return KVCache(arrays, 0)

    def _shape(self, name: str, length: int) -> tuple[int, int, int]:
        heads, dim = self.kv_shapes[int(_PAST.fullmatch(name).group(1))]
        return heads, length, dim

    def run(self, ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Logits [batch, len(ids), vocab] for token ids [batch, sequence] after the cached positions, and the
        cache that holds them too."""
        ids = np.ascontiguousarray(ids, dtype=self.ids_dtype)
        total = cache.length + ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), self.mask_dtype), **cache.arrays}
        logits, *present = self.session.run(self.output_names, feed)
        return logits, KVCache(dict(zip(self.past_names, present)), total)

    def close(self) -> None:
        self.session = None
