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

import importlib
from types import ModuleType

from compressor.errors import BackendUnavailable


class MissingExtra(BackendUnavailable, ImportError):
    """A framework integration imported without its framework: names the pip extra that installs it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module` (e.g. "transformers"), or raise MissingExtra saying that `what` needs the `[extra]` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{what} needs {module.split('.')[0]}, which is not installed ({exc}).",
                           hint=f"Install the [{extra}] extra: pip install 'compressor[{extra}]' (from a clone: "
                                f"pip install -e '.[{extra}]').") from None
