"""Bench backends, one module each: every module here registers its Runner in runners.BACKENDS (importing this
package registers them all). A new backend is one new module."""
from __future__ import annotations

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
