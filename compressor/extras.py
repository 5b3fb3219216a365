"""Optional dependencies (pip extras): import one, or say which extra installs it (exit 3)."""
from __future__ import annotations

import importlib
from types import ModuleType

from compressor.errors import BackendUnavailable


class MissingExtra(BackendUnavailable, ImportError):
    """An optional dependency that is not installed: names the pip extra that installs it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module` (e.g. "transformers"), or raise MissingExtra saying that `what` needs the `[extra]` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{what} needs {module.split('.')[0]}, which is not installed ({exc}).",
                           hint=f"Install the [{extra}] extra: pip install 'compressor[{extra}]' (from a clone: "
                                f"pip install -e '.[{extra}]').") from None
