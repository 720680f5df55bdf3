"""The sequential backend: every client in this process, one after another."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pollinate.client import ClientFn
from pollinate.errors import BackendError
from pollinate.simulation.backends.base import (
    Backend,
    execute_task,
    longest_first,
    timeout_outcome,
)
from pollinate.types import Arrays, Outcome, Task


class SequentialBackend(Backend):
    """Runs tasks in this process, longest first; simple, deterministic, easy to debug.

    A task cannot be interrupted here: one that finishes after the deadline is dropped as a
    straggler, and tasks not yet started at the deadline are dropped unstarted.
    """

    name = "sequential"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._client_fn: ClientFn | None = None
        self._worker: dict[str, Any] = {}
        self._threads_before: int | None = None

    def start(self, client_fn: ClientFn) -> None:
        self._client_fn = client_fn
        self._worker = {}
        if self.threads and "torch" in sys.modules:  # restored by close()
            torch = sys.modules["torch"]
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def run(self, arrays: Arrays, tasks: Sequence[Task], deadline: float) -> Iterator[Outcome]:
        if self._client_fn is None:
            raise BackendError("SequentialBackend.run called before start()")
        for task in longest_first(tasks):
            if time.monotonic() >= deadline:
                yield timeout_outcome(task)
                continue
            outcome = execute_task(self._client_fn, task, arrays, self._worker)
            if time.monotonic() > deadline:
                yield timeout_outcome(
                    task, f"finished after the round deadline ({outcome.seconds:.1f} s)"
                )
            else:
                yield outcome

    def close(self) -> None:
        self._worker = {}
        self._client_fn = None
        if self._threads_before is not None:
            sys.modules["torch"].set_num_threads(self._threads_before)
            self._threads_before = None
