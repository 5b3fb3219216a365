"""A time and memory watchdog for third-party code that may not terminate (torch-pruning's grouping)."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

CHECK_EVERY_S = 0.25


class LimitExceeded(Exception):
    """The watched code ran past its time or memory limit; the message says which."""


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_memory_growth() -> int | None:
    """Half of the memory available now, at least 1 GiB: what the watched code may add before it is stopped."""
    free = available_bytes()
    return None if free is None else max(free // 2, 1 << 30)


@contextlib.contextmanager
def limited(seconds: float, memory_growth: int | None = None):
    """Raise LimitExceeded when the block runs longer than `seconds` or this process's resident memory grows by
    more than `memory_growth` bytes. Checked every CHECK_EVERY_S by SIGALRM, so only in the main thread of a POSIX
    process; elsewhere the block runs unwatched."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    start, base = time.monotonic(), rss_bytes()

    def check(signum, frame):
        if time.monotonic() - start >= seconds:
            raise LimitExceeded(f"within {seconds:g} s")
        now = rss_bytes()
        if memory_growth is not None and base is not None and now is not None and now - base > memory_growth:
            raise LimitExceeded(f"within {memory_growth / 2**20:.0f} MiB of added memory")

    previous = signal.signal(signal.SIGALRM, check)
    previous_timer = signal.getitimer(signal.ITIMER_REAL)  # (delay, interval) of a timer the caller had running
    signal.setitimer(signal.ITIMER_REAL, min(CHECK_EVERY_S, seconds), CHECK_EVERY_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if previous_timer[0] > 0:  # the caller's timer runs on, less the time the block took
            signal.setitimer(signal.ITIMER_REAL, max(previous_timer[0] - (time.monotonic() - start), 1e-3),
                             previous_timer[1])
