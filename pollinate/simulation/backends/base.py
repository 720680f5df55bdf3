"""The Backend interface: where simulated clients execute, and the task runner they share."""

from __future__ import annotations

import logging
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from pollinate.client import ClientContext, ClientFn
from pollinate.errors import ConfigError
from pollinate.types import Arrays, Outcome, Task

log = logging.getLogger("pollinate")


class Backend(ABC):
    """Runs client tasks and yields their outcomes as they finish.

    ``start`` gets the user's ``client_fn`` once; ``run`` gets one round's global arrays
    and tasks, and must yield exactly one ``Outcome`` per task: a result, an error (the
    client raised or its worker died) or a timeout (not finished by ``deadline``, a
    ``time.monotonic()`` value). A backend never raises for a client's fault.
    """

    name = "backend"

    @abstractmethod
    def start(self, client_fn: ClientFn) -> None:
        """Prepare workers for ``client_fn`` (built once per worker, reused for every task)."""

    @abstractmethod
    def run(self, arrays: Arrays, tasks: Sequence[Task], deadline: float) -> Iterator[Outcome]:
        """Run ``tasks`` on ``arrays``; yield each outcome as soon as it is known."""

    def close(self) -> None:
        """Stop the workers and free what ``start`` took."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_workers(workers: int, threads_per_worker: int) -> None:
    """Refuse worker counts a backend cannot run with."""
    if workers < 1:
        raise ConfigError(f"simulation.workers must be >= 1, got {workers}")
    if threads_per_worker < 1:
        raise ConfigError(f"simulation.threads_per_worker must be >= 1, got {threads_per_worker}")


def longest_first(tasks: Sequence[Task]) -> list[Task]:
    """Tasks ordered by decreasing cost (ties by client id), for longest-task-first scheduling."""
    return sorted(tasks, key=lambda t: (-t.cost, t.client_id))


def timeout_outcome(task: Task, why: str = "not started before the round deadline") -> Outcome:
    """The outcome of a task dropped at the round deadline."""
    return Outcome(task.client_id, task.kind, error=f"timeout: {why}")


def execute_task(
    client_fn: ClientFn, task: Task, arrays: Arrays, worker: dict[str, Any]
) -> Outcome:
    """Build the client for ``task`` and run it; a client that raises becomes a failed outcome."""
    start = time.perf_counter()
    ctx = ClientContext(
        client_id=task.client_id,
        seed=int(task.config.get("seed", 0)),
        state=dict(task.state),
        worker=worker,
    )
    try:
        client = client_fn(ctx)
        if task.kind == "train":
            result: Any = client.train(arrays, task.config)
        elif task.kind == "evaluate":
            result = client.evaluate(arrays, task.config)
        elif task.kind == "query":
            if not callable(getattr(client, "query", None)):
                raise TypeError(
                    f"{type(client).__name__} has no query method: federated analytics needs "
                    "clients that answer queries (see pollinate.analytics)"
                )
            result = client.query(arrays, task.config)
        else:
            raise ValueError(f"unknown task kind {task.kind!r}")
    except Exception as exc:  # a client's fault is recorded, never fatal
        return Outcome(
            task.client_id,
            task.kind,
            error=f"{type(exc).__name__}: {exc}",
            seconds=time.perf_counter() - start,
            traceback=traceback.format_exc(),
        )
    return Outcome(
        task.client_id,
        task.kind,
        result=result,
        seconds=time.perf_counter() - start,
        state=ctx.state if (ctx.state or task.state) else None,
    )
