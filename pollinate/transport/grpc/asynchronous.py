"""The asynchronous loop's executor over gRPC: one task at a time per client, on real time.

``AsyncGrpcTasks`` gives single training tasks to connected clients (``start``) and hands
back each outcome the moment it arrives (``next``), for ``pollinate.asynchronous.run_async``
(``pollinate server`` with ``strategy.name = "fedbuff"``). A task not answered within
``timeout_s`` seconds is cancelled on its client and reported as a timeout, so its slot goes
to another client; a client that is not connected fails at once. Each task carries the same
seed a simulation would give it (``task_seed(run seed, dispatch number, client)``), and the
model of one version is serialized once and sent to every client that starts from it.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from typing import Any

from pollinate.client import task_seed
from pollinate.transport.grpc.codec import Broadcast, broadcast
from pollinate.transport.grpc.connection import Held, Pending, release
from pollinate.transport.grpc.server import FleetServer, GrpcExecutor, give_memory_back
from pollinate.types import ClientId, Outcome, TrainIns


class AsyncGrpcTasks:
    """Training tasks on ``fleet``'s connected clients, outcomes as they arrive.

    ``executor_settings``: ``GrpcExecutor``'s bounds on a result's size
    (``result_size_factor``, ``min_result_bytes``).
    """

    def __init__(
        self,
        fleet: FleetServer,
        *,
        seed: int = 0,
        timeout_s: float = 600.0,
        **executor_settings: Any,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fleet = fleet
        self.seed = seed
        self.timeout_s = float(timeout_s)
        self._limits = GrpcExecutor(fleet, seed=seed, **executor_settings)
        self._sink: queue.Queue[Any] = queue.Queue()
        self._tasks: dict[str, tuple[int, Pending, float]] = {}  # id → (task, pending, deadline)
        self._ready: deque[tuple[int, Outcome]] = deque()
        self._payload: tuple[Any, Broadcast] | None = None  # (arrays, their broadcast)
        self._held: Held | None = None  # the last result's memory, freed at the next call

    def start(self, task: int, client_id: ClientId, ins: TrainIns) -> None:
        """Give ``client_id`` a training task (``task``: the dispatch number)."""
        if self._payload is None or self._payload[0] is not ins.arrays:
            self._payload = (ins.arrays, broadcast(ins.arrays, self.fleet.chunk_bytes))
        payload = self._payload[1]
        step = int(ins.config.get("round", 0))
        self.fleet.round = step
        config = {**ins.config, "seed": task_seed(self.seed, task, client_id)}
        limit = self._limits.expected_result_bytes(payload.size)
        pending = self.fleet._give(client_id, "train", step, config, payload, self._sink, limit)
        if pending is None:
            why = f"client {client_id} is not connected"
            self._ready.append((task, Outcome(client_id, "train", error=why)))
        else:
            self._tasks[pending.task_id] = (task, pending, time.monotonic() + self.timeout_s)

    def next(self) -> tuple[int, Outcome]:
        """The next outcome to arrive (blocks), or the next task past its timeout."""
        release(self._held)
        self._held = None
        while True:
            if self._ready:
                return self._ready.popleft()
            if not self._tasks:
                raise RuntimeError("AsyncGrpcTasks.next called with no task in flight")
            task_id, (task, pending, deadline) = min(
                self._tasks.items(), key=lambda item: item[1][2]
            )
            remaining = deadline - time.monotonic()
            if remaining <= 0 and pending.expire():
                del self._tasks[task_id]
                pending.conn.cancel(task_id, "the task timed out")
                why = f"timeout: no result within {self.timeout_s:g} s (strategy.round_timeout_s)"
                return task, pending.failed(why)
            try:
                got_id, outcome, held = self._sink.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                continue
            entry = self._tasks.pop(got_id, None)
            if entry is None:  # ended already (expired): its memory goes back now
                release(held)
                continue
            self._held = held
            return entry[0], outcome

    def take_stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Cancel the tasks still in flight and free their results' memory."""
        release(self._held)
        self._held = None
        for task_id, (_, pending, _) in self._tasks.items():
            if pending.expire():
                pending.conn.cancel(task_id, "the server stopped waiting for this task")
        self._tasks.clear()
        while not self._sink.empty():
            release(self._sink.get_nowait()[2])
        give_memory_back()
