"""Training-framework callbacks: prune inside a Hugging Face `Trainer` or a Lightning `Trainer` run.

Each is a thin adapter over `compressor.Pruner`: the framework keeps its model, data, loss, optimizer, scheduler and
loop, and the callback calls the Pruner's hooks at the framework's own points (once per optimizer step, not per
micro-batch, under gradient accumulation), remaps the framework's optimizer across a removal, and saves the
Pruner's state beside the framework's checkpoints so a resumed run prunes as the interrupted one would have.

    compressor.integrations.transformers.PruningCallback   the [hf] extra (transformers, accelerate)
    compressor.integrations.lightning.PruningCallback      the [lightning] extra

Importing this package imports neither framework; importing a submodule without its framework installed raises
`MissingExtra` (an ImportError, and a BackendUnavailable with exit code 3) naming the extra to install.
"""
from __future__ import annotations

from compressor.extras import MissingExtra, require  # noqa: F401 (re-exported: the integrations' import)
