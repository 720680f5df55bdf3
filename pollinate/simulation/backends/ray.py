"""The Ray backend: one Ray actor per worker, on this machine or across a Ray cluster.

Ray is the engine; this module only feeds it. ``client_fn`` goes to the object store once and
every actor unpickles it once and keeps a per-worker cache, so the model is built once per
actor. A round's global arrays go to the object store once; tasks receive the reference and
each actor copies the arrays out once per round. Tasks are handed out longest first, one at
a time per actor, and results are yielded as they complete (``ray.wait``). At the deadline
busy actors are killed and replaced; an actor that dies fails its task and is replaced. A
replacement takes tasks once it is up, so its start-up is not charged to a client's task.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pollinate.client import ClientFn
from pollinate.errors import BackendError, ConfigError, missing_dependency
from pollinate.simulation.backends.base import (
    Backend,
    check_workers,
    execute_task,
    longest_first,
    timeout_outcome,
)
from pollinate.types import Arrays, Outcome, Task


class _Worker:
    """The actor's body: ``client_fn`` unpickled once, a per-worker cache, one round's arrays."""

    def __init__(self, client_fn: ClientFn) -> None:
        self.client_fn = client_fn
        self.cache: dict[str, Any] = {}
        self.token = -1
        self.arrays: Arrays = []

    def ready(self) -> int:
        return os.getpid()

    def run(self, token: int, arrays_ref: list[Any], task: Task) -> Outcome:
        if token != self.token:  # first task of a round on this actor: fetch the arrays once
            import ray

            self.arrays = [np.array(a) for a in ray.get(arrays_ref[0])]
            self.token = token
        return execute_task(self.client_fn, task, self.arrays, self.cache)


class RayBackend(Backend):
    """``workers`` Ray actors of ``threads_per_worker`` CPUs each.

    ``address=""`` starts a local Ray; any other address (``"auto"``, ``"host:port"``,
    ``"ray://host:port"``) connects to a running cluster. ``close`` undoes what ``start``
    did: it stops the local Ray, or disconnects and leaves the cluster running. A Ray this
    process already had initialized is used as it is and left running. An address where
    nothing listens, or actors not up within ``connect_timeout_s``, raise ``BackendError``.
    """

    name = "ray"

    def __init__(
        self,
        workers: int = 2,
        threads_per_worker: int = 1,
        address: str = "",
        connect_timeout_s: float = 60.0,
        gpus_per_worker: float = 0.0,
    ) -> None:
        check_workers(workers, threads_per_worker)
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.gpus_per_worker = gpus_per_worker  # each actor's num_gpus (Ray pins them)
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self._ray: Any = None
        self._owns_ray = False
        self._actor_cls: Any = None
        self._fn_ref: Any = None
        self._actors: list[Any] = []
        self._starting: dict[Any, Any] = {}  # ready() reference -> replacement actor
        self._token = 0

    def start(self, client_fn: ClientFn) -> None:
        self.close()
        try:
            import ray
        except ImportError:
            raise missing_dependency("ray", "ray") from None
        self._ray = ray
        if not ray.is_initialized():
            self._connect(ray)
            self._owns_ray = True
        try:
            self._fn_ref = ray.put(client_fn)
        except Exception as exc:
            self.close()
            raise ConfigError(f"the ray backend cannot serialize client_fn: {exc}") from exc
        n = str(self.threads_per_worker)
        env = {v: n for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        gpus = {"num_gpus": self.gpus_per_worker} if self.gpus_per_worker > 0 else {}
        self._actor_cls = ray.remote(_Worker).options(  # type: ignore[attr-defined]
            num_cpus=self.threads_per_worker,
            max_concurrency=1,
            runtime_env={"env_vars": env},
            **gpus,
        )
        self._actors = [self._spawn() for _ in range(self.workers)]
        try:  # surface actors that cannot start (too few CPUs, client_fn not importable)
            ray.get([a.ready.remote() for a in self._actors], timeout=self.connect_timeout_s)
        except Exception as exc:
            self.close()
            raise BackendError(
                f"could not start {self.workers} Ray actors of {self.threads_per_worker} CPUs "
                f"each within {self.connect_timeout_s:.0f} s: {exc}. Check that the cluster "
                "has enough CPUs and that client_fn's modules are importable on it."
            ) from exc

    def _connect(self, ray: Any) -> None:
        kwargs: dict[str, Any] = dict(
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,  # clients' output: Ray's log files
            ignore_reinit_error=True,
        )
        if self.address:
            _probe(self.address, self.connect_timeout_s)
            kwargs["address"] = self.address
        else:
            kwargs["num_cpus"] = self.workers * self.threads_per_worker
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:  # not in a helper thread: Ray's object store client breaks when started there
            ray.init(**kwargs)
        except Exception as exc:
            where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray"
            raise BackendError(f"could not start {where}: {exc}") from exc

    def _spawn(self) -> Any:
        return self._actor_cls.remote(self._fn_ref)

    def _replace(self, actor: Any) -> None:
        """Kill ``actor`` and start another in its place; it takes tasks once it is up."""
        self._ray.kill(actor, no_restart=True)
        fresh = self._spawn()
        self._actors[self._actors.index(actor)] = fresh
        self._starting[fresh.ready.remote()] = fresh

    def _started(self, ref: Any) -> Any:
        """The replacement actor whose ``ready()`` is ``ref``, now up."""
        actor = self._starting.pop(ref)
        try:
            self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            raise BackendError(
                f"a replacement Ray actor could not start: {_first_line(exc)}. Check that the "
                "cluster still has the CPUs for it."
            ) from exc
        return actor

    def run(self, arrays: Arrays, tasks: Sequence[Task], deadline: float) -> Iterator[Outcome]:
        if not self._actors:
            raise BackendError("RayBackend.run called before start()")
        ray = self._ray
        arrays_ref = [ray.put(list(arrays))]  # nested: actors fetch it once per round
        self._token += 1
        pending = longest_first(tasks)
        if self._starting:  # replacements that came up since: they take tasks from the start
            up = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=0)[0]
            for ref in up:
                self._started(ref)
        idle = [a for a in self._actors if a not in self._starting.values()]
        busy: dict[Any, tuple[Any, Task]] = {}
        try:
            while pending or busy:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    while idle and pending:
                        actor, task = idle.pop(), pending.pop(0)
                        busy[actor.run.remote(self._token, arrays_ref, task)] = (actor, task)
                    awaited = list(busy) + (list(self._starting) if pending else [])
                    done = ray.wait(awaited, num_returns=1, timeout=remaining)[0]
                if remaining <= 0 or not done:
                    for actor, task in busy.values():
                        self._replace(actor)
                        yield timeout_outcome(task, "still running at the round deadline")
                    busy.clear()
                    for task in pending:
                        yield timeout_outcome(task)
                    return
                if done[0] in self._starting:
                    idle.append(self._started(done[0]))
                    continue
                actor, task = busy.pop(done[0])
                outcome, died = self._receive(done[0], task)
                if died:
                    self._replace(actor)
                else:
                    idle.append(actor)
                yield outcome
        finally:
            for actor, _ in busy.values():  # abandoned mid-round: free the actors
                self._replace(actor)

    def _receive(self, ref: Any, task: Task) -> tuple[Outcome, bool]:
        """The task's outcome, and whether its actor died."""
        ray = self._ray
        try:
            return ray.get(ref), False
        except ray.exceptions.RayActorError as exc:
            why = f"Ray actor died while running this client: {_first_line(exc)}"
            return Outcome(task.client_id, task.kind, error=why), True
        except ray.exceptions.RayError as exc:
            why = f"Ray could not run or return this client's task: {_first_line(exc)}"
            return Outcome(task.client_id, task.kind, error=why, traceback=str(exc)), False

    def close(self) -> None:
        ray = self._ray
        if ray is not None and ray.is_initialized():
            for actor in self._actors:
                ray.kill(actor, no_restart=True)
            if self._owns_ray:
                ray.shutdown()
        self._actors, self._fn_ref, self._owns_ray = [], None, False
        self._starting = {}


def _probe(address: str, timeout: float) -> None:
    """Fail fast when a ``host:port`` address has nothing listening (ray.init would hang)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms: left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 10)).close()
    except OSError as exc:
        raise BackendError(
            f"cannot reach a Ray cluster at {address!r}: {exc}. Start one with "
            '`ray start --head`, or set simulation.ray_address = "" for a local Ray.'
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
