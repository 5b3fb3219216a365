"""Decode timing of causal language models for a `prune.target.tokens_per_second_speedup` target
(compressor/prune/latency_target.py): each try's model is exported with its key/value cache (lm_export.py) and
its greedy decode after a prompt (lm_bench.DecodeRunner) is timed in turn with the dense model's, at the recipe's
bench.prompt_tokens / bench.new_tokens, batch 1. The measured time ratio of the decode steps is the tokens/s
speedup.

The dense model is exported by the exporter each try's model takes (onnxruntime-genai's model builder for a model
whose layers match its config, torch.onnx for per-layer widths; once per exporter), so a ratio never mixes the
pruning with two attention kernels; the final bench of compress pairs its files the same way (app/lm_deploy.py).
The model builder copies a tokenizer beside its graph: for timing, a one-word stand-in is given (the graph does not
depend on it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from compressor.deploy.lm_bench import DecodeRunner
from compressor.deploy.lm_session import LMSession


class SessionDecode(DecodeRunner):
    """DecodeRunner that owns its session (closed with the runner)."""

    def close(self) -> None:
        self.lm.close()


def stand_in_tokenizer() -> Any:
    """A one-word tokenizer: what the model builder needs beside a model it exports, for a graph only timed."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<unk>")


def _bare(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside compressor's wrapper (models/hf_causal_lm.HFCausalLM), or the model."""
    return getattr(model, "hf", model)


class DecodeTimer:
    """Decode runners of a dense model and of the pruned models a latency loop tries, in `folder`."""

    def __init__(self, dense: nn.Module, folder: Path, *, backend: str = "ort-cpu", prompt_tokens: int = 128,
                 new_tokens: int = 32, threads: Optional[int] = None, tokenizer: Any = None) -> None:
        self.dense, self.folder, self.backend = _bare(dense), Path(folder), backend
        self.prompt_tokens, self.new_tokens, self.threads = prompt_tokens, new_tokens, threads
        self.tokenizer = tokenizer if tokenizer is not None else stand_in_tokenizer()
        self.dense_runners: dict[str, SessionDecode] = {}  # one per exporter method
        self.exporters: dict[str, str] = {}

    def _runner(self, model: nn.Module, name: str, method: str = "auto") -> tuple[SessionDecode, str]:
        from compressor.deploy.lm_export import export_causal_lm

        exported = export_causal_lm(model, self.folder / name, tokenizer=self.tokenizer, method=method)
        self.exporters[exported.method] = exported.exporter
        session = LMSession.open(exported.path, self.backend, threads=self.threads, spinning=False)
        return SessionDecode(session, self.prompt_tokens, self.new_tokens), exported.method

    def pair(self, model: nn.Module, name: str) -> tuple[SessionDecode, SessionDecode]:
        """(the dense model's runner, `model`'s runner), both exported by the method `model` takes. The pruned
        runner is the caller's to close; the dense ones close with close()."""
        pruned, method = self._runner(_bare(model), name)
        if method not in self.dense_runners:
            self.dense_runners[method] = self._runner(self.dense, f"dense-{method}", method)[0]
        return self.dense_runners[method], pruned

    def close(self) -> None:
        for runner in self.dense_runners.values():
            runner.close()
        self.dense_runners.clear()


def decode_timer(dense: nn.Module, recipe: Any, backend: str, folder: Path) -> DecodeTimer:
    """A DecodeTimer at the recipe's bench.prompt_tokens / new_tokens and bench.threads."""
    prompt, new = recipe.bench.lm_lengths
    return DecodeTimer(dense, folder, backend=backend, prompt_tokens=prompt, new_tokens=new,
                       threads=recipe.bench.threads)
