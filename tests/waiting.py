"""Waiting in tests that start servers, clients and processes, on a machine shared with other
work: wait on an event or poll a condition, and bound the wait by a deadline scaled to the
load of the cores, never by a fixed wall-clock time that a busy machine can overrun."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

WAIT = 60.0  # bound on things that take milliseconds on an idle machine: never a timing assertion


def load_scale() -> float:
    """How much slower than an idle machine to expect now: load average per core, at least 1."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # not available on this platform
        return 1.0
    return max(1.0, load)


def patience(seconds: float) -> float:
    """``seconds`` on an idle machine, scaled by how busy the cores are now."""
    return seconds * load_scale()


def wait_until(
    predicate: Callable[[], object],
    what: str,
    timeout: float = WAIT,
    *,
    poll_s: float = 0.01,
    alive: tuple[subprocess.Popen[str], ...] = (),
) -> None:
    """Poll ``predicate`` until it holds. Fails after ``patience(timeout)``, re-measured while
    waiting so a load that rises meanwhile extends it, or at once when a process in ``alive``
    has exited (it would never make the predicate true)."""
    start = time.monotonic()
    while not predicate():
        for proc in alive:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: {proc.args!r} exited with {proc.returncode}")
        if time.monotonic() - start > patience(timeout):
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)
