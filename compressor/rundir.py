"""Run directory layout and atomic writes: a file is complete or absent, never half-written."""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from compressor.errors import UsageError

CHECKPOINT = "checkpoints/last.pt"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on failure removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_error(path: Path, exc: OSError) -> UsageError:
    reason = exc.strerror or str(exc)
    if path.is_dir():
        reason = "it is a directory"
    return UsageError(f"cannot write {path}: {reason}.", hint="Choose another output path.")


def _check_ancestors(folder: Path, option: str, target: Path) -> None:
    """The nearest existing ancestor of `folder` (itself included) must be a writable directory."""
    for parent in (folder, *folder.parents):
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise UsageError(f"{option} {target}: {parent} is a file, not a folder, so nothing can be written "
                             "below it; choose another path.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {target}: the folder {parent} is not writable; choose another path.")
        return


def check_output_file(path: str | Path, option: str, example: str = "result.json") -> None:
    """Before any work: UsageError naming `option` when `path` cannot be written as a file (it is a directory, or
    one of its parents is a file or not writable); `example` is the file name suggested inside a directory."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file path, e.g. {path / example}.")
    _check_ancestors(path.parent, option, path)


def check_output_dir(path: str | Path, option: str) -> None:
    """Before any work: UsageError naming `option` when `path` cannot be a folder to write into (it is a file, or
    one of its parents is a file or not writable)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder; give a new or existing folder for the run.")
    _check_ancestors(path, option, path)


def publish(path: str | Path) -> None:
    """Give a finished file the mode a plain `open()` would have (0644 under umask 022): mkstemp makes files 0600,
    which a serving process running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int = 2) -> Path:
    """Strict JSON: a non-finite float (an infinite speedup, a NaN loss) is written as null, never as the
    `Infinity` / `NaN` that JSON parsers other than Python's refuse."""
    return write_text(path, to_json(data, indent))


def to_json(data: Any, indent: int = 2) -> str:
    return json.dumps(_finite(data), indent=indent, default=lambda value: _finite(_jsonable(value)),
                      allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def save_torch(obj: Any, path: str | Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors of any size
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
