"""An offline text corpus for the decoder language-model sample (issue 34): the Python standard library's own
sources, which every Python installation ships, copied into train/ and val/ folders.

    python samples/make_corpus.py --out data/pycorpus

Which files: every .py file under the running interpreter's stdlib folder (sysconfig's "stdlib" path), except
site-packages and the test suites (folders named test or tests: half of the bytes, and mostly repetitive fixtures).
The split is by file, decided by a hash of the file's path relative to the stdlib folder (about 1 in 20 files goes to
val/), so it does not depend on the file order, and the same file always lands on the same side. The corpus is
deterministic for one Python release; another release (3.11.7 here) changes a few files. Files are copied under their
relative paths; a MANIFEST.txt lists the Python version, the counts and the bytes of each side.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import shutil
import sysconfig
from pathlib import Path

VAL_EVERY = 20  # about 1 file in VAL_EVERY goes to val/


def stdlib_files(stdlib: Path) -> list[Path]:
    """The stdlib's .py files (relative paths), sorted, without site-packages and the test suites."""
    skip = {"site-packages", "test", "tests"}
    return sorted(f.relative_to(stdlib) for f in stdlib.rglob("*.py")
                  if not skip & set(f.relative_to(stdlib).parts[:-1]))


def side(relative: Path) -> str:
    digest = hashlib.sha1(relative.as_posix().encode()).digest()
    return "val" if int.from_bytes(digest[:4], "big") % VAL_EVERY == 0 else "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/pycorpus"))
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    args = parser.parse_args()
    counts = {"train": [0, 0], "val": [0, 0]}
    for relative in stdlib_files(args.stdlib):
        source = args.stdlib / relative
        try:
            source.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8 (encoding test data)
        where = side(relative)
        target = args.out / where / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        counts[where][0] += 1
        counts[where][1] += source.stat().st_size
    lines = [f"Python {platform.python_version()} standard library ({args.stdlib})"]
    lines += [f"{name}: {n} files, {size} bytes" for name, (n, size) in counts.items()]
    (args.out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
