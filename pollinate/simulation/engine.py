"""``simulate()``: a whole federated run with virtual clients on this machine or on Ray."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

from pollinate.client import ClientFn, MemoryStateStore, StateStore, task_seed
from pollinate.errors import ConfigError
from pollinate.server import Callback, History, RunResult, SecureAggregator, in_order, run
from pollinate.simulation.backends.base import Backend
from pollinate.strategy.base import Strategy
from pollinate.types import Arrays, ClientId, Instructions, Outcome, Task, TaskKind

log = logging.getLogger("pollinate")

BACKENDS = ("sequential", "process", "ray")
CostFn = Callable[[ClientId, TaskKind], float]


def make_backend(
    name: str,
    workers: int = 2,
    threads_per_worker: int = 1,
    ray_address: str = "",
    gpus_per_worker: float = 0.0,
) -> Backend:
    """The backend called ``name`` (sequential | process | ray); ``gpus_per_worker`` > 0 pins
    process workers to GPUs round robin, or is each Ray actor's ``num_gpus``."""
    if name == "sequential":
        from pollinate.simulation.backends.sequential import SequentialBackend

        return SequentialBackend(threads=threads_per_worker)
    if name == "process":
        from pollinate.simulation.backends.process import ProcessBackend

        return ProcessBackend(
            workers=workers, threads_per_worker=threads_per_worker, gpus_per_worker=gpus_per_worker
        )
    if name == "ray":
        from pollinate.simulation.backends.ray import RayBackend

        return RayBackend(
            workers=workers,
            threads_per_worker=threads_per_worker,
            address=ray_address,
            gpus_per_worker=gpus_per_worker,
        )
    raise ConfigError(f"simulation.backend must be one of {', '.join(BACKENDS)}; got {name!r}")


class SimulationExecutor:
    """Turns a strategy's plan into backend tasks: seeds, costs and client state attached.

    With ``deterministic=True`` outcomes are handed on in client-id order (buffered), so the
    aggregate is bit-identical whichever backend ran the clients; otherwise they stream in
    the order they finish.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        seed: int = 0,
        cost_fn: CostFn | None = None,
        state_store: StateStore | None = None,
        deterministic: bool = False,
    ) -> None:
        self.backend = backend
        self.seed = seed
        self.cost_fn = cost_fn
        self.state_store = state_store if state_store is not None else MemoryStateStore()
        self.deterministic = deterministic

    def submit(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        timeout_s: float,
    ) -> Iterator[Outcome]:
        deadline = time.monotonic() + timeout_s
        return in_order(self._stream(round_number, kind, plan, deadline), self.deterministic)

    def _stream(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        deadline: float,
    ) -> Iterator[Outcome]:
        # clients given the same arrays object (the usual case) share one broadcast
        groups: dict[int, tuple[Arrays, list[Task]]] = {}
        for cid, ins in plan:
            config = {**ins.config, "seed": task_seed(self.seed, round_number, cid)}
            cost = self.cost_fn(cid, kind) if self.cost_fn else 1.0
            task = Task(cid, kind, config, cost, self.state_store.get(cid))
            groups.setdefault(id(ins.arrays), (ins.arrays, []))[1].append(task)
        for arrays, tasks in groups.values():
            for outcome in self.backend.run(arrays, tasks, deadline):
                if outcome.traceback:
                    log.warning(
                        "round %d: client %s failed in %s:\n%s",
                        round_number,
                        outcome.client_id,
                        kind,
                        outcome.traceback.rstrip(),
                    )
                if outcome.ok and outcome.state is not None:
                    self.state_store.put(outcome.client_id, outcome.state)
                yield outcome


def simulate(
    client_fn: ClientFn,
    *,
    num_clients: int,
    strategy: Strategy,
    initial_arrays: Arrays,
    rounds: int,
    backend: str | Backend = "process",
    workers: int = 2,
    threads_per_worker: int = 1,
    ray_address: str = "",
    gpus_per_worker: float = 0.0,
    seed: int = 0,
    deterministic: bool = False,
    cost_fn: CostFn | None = None,
    state_store: StateStore | None = None,
    callbacks: Sequence[Callback] = (),
    history: History | None = None,
    secure: SecureAggregator | None = None,
) -> RunResult:
    """Run ``rounds`` rounds of federated learning over ``num_clients`` virtual clients.

    ``client_fn(context)`` builds the client for one task (see ``pollinate.client``); for the
    ``process`` and ``ray`` backends it must be picklable (a module-level function or an
    instance of a module-level class). Clients are the ids ``0..num_clients-1``; memory does
    not grow with clients that are not sampled. ``secure`` (a
    ``pollinate.privacy.SecureAggregation``) runs training through secure aggregation.
    """
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    engine = (
        make_backend(backend, workers, threads_per_worker, ray_address, gpus_per_worker)
        if isinstance(backend, str)
        else backend
    )
    executor = SimulationExecutor(
        engine, seed=seed, cost_fn=cost_fn, state_store=state_store, deterministic=deterministic
    )
    try:
        engine.start(client_fn)  # inside the try: a start that fails half-way is closed too
        return run(
            strategy,
            executor,
            range(num_clients),
            initial_arrays,
            rounds,
            callbacks=callbacks,
            history=history,
            secure=secure,
        )
    finally:
        engine.close()
