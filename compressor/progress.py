"""Console output: rich progress bars on a terminal, plain lines otherwise; silent on non-zero DDP ranks."""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Iterator, Optional

# rich.style starts its id counter from Python's global random generator when first imported: the caller's random
# sequence is put back as it was (compressor's modules import rich through this one first)
_random_state = random.getstate()
from rich.console import Console  # noqa: E402
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,  # noqa: E402
                           TimeRemainingColumn)

random.setstate(_random_state)

console = Console(stderr=True, highlight=False)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    """One line to stderr (rank 0 only)."""
    if is_main_process():
        console.print(message, soft_wrap=True)


class Tracker:
    """A bar with a total that advances; on a non-terminal it prints nothing per item (info() lines suffice)."""

    def __init__(self, progress: Optional[Progress], task: Optional[int]) -> None:
        self.progress, self.task = progress, task

    def advance(self, amount: int = 1, **fields: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=amount, **fields)


@contextmanager
def track(description: str, total: int) -> Iterator[Tracker]:
    """A progress bar on a terminal (rank 0), a no-op tracker elsewhere."""
    if not (console.is_terminal and is_main_process()):
        yield Tracker(None, None)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console, transient=True) as progress:
        yield Tracker(progress, progress.add_task(description, total=total, status=""))
