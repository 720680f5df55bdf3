"""``simulate()``: a whole federated run with virtual clients on this machine or on Ray."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate.asynchronous import refuse_with_fedbuff, run_async
from pollinate.client import ClientFn, MemoryStateStore, StateStore, task_seed
from pollinate.errors import ConfigError
from pollinate.server import Callback, History, RunResult, SecureAggregator, in_order, run
from pollinate.simulation.backends.base import Backend
from pollinate.strategy.base import Strategy
from pollinate.strategy.fedbuff import FedBuff
from pollinate.types import Arrays, ClientId, Instructions, Outcome, Task, TaskKind

if TYPE_CHECKING:
    from pollinate.attacks import Attack
    from pollinate.simulation.environment import Environment

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
        keyed = [(round_number, cid, ins) for cid, ins in plan]
        return in_order(self._stream(round_number, kind, keyed, deadline), self.deterministic)

    def submit_tasks(
        self,
        kind: TaskKind,
        tasks: Sequence[tuple[int, ClientId, Instructions]],
        timeout_s: float,
        hold_state: Collection[ClientId] = (),
    ) -> Iterator[Outcome]:
        """Tasks that are not one round's: ``(number, client, instructions)``, each seeded
        by its own ``number`` in place of a round (the asynchronous loop's dispatches).
        Outcomes stream as they finish. The state of the clients in ``hold_state`` is not
        saved: the caller saves ``outcome.state`` if it keeps the outcome."""
        deadline = time.monotonic() + timeout_s
        return self._stream(0, kind, tasks, deadline, frozenset(hold_state))

    def _stream(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[int, ClientId, Instructions]],
        deadline: float,
        hold_state: frozenset[ClientId] = frozenset(),
    ) -> Iterator[Outcome]:
        # clients given the same arrays object (the usual case) share one broadcast
        groups: dict[int, tuple[Arrays, list[Task]]] = {}
        for number, cid, ins in plan:
            config = {**ins.config, "seed": task_seed(self.seed, number, cid)}
            cost = self.cost_fn(cid, kind) if self.cost_fn else 1.0
            task = Task(cid, kind, config, cost, self.state_store.get(cid))
            groups.setdefault(id(ins.arrays), (ins.arrays, []))[1].append(task)
        # one traceback per distinct error; clients failing alike are counted (the history
        # names every failed client and its reason)
        alike: dict[str, list[ClientId]] = {}
        where = f"round {round_number}" if round_number else "tasks"
        for arrays, tasks in groups.values():
            for outcome in self.backend.run(arrays, tasks, deadline):
                if outcome.traceback:
                    seen = alike.setdefault(outcome.error or "", [])
                    if not seen:
                        log.warning(
                            "%s: client %s failed in %s:\n%s",
                            where,
                            outcome.client_id,
                            kind,
                            outcome.traceback.rstrip(),
                        )
                    seen.append(outcome.client_id)
                held = outcome.client_id in hold_state
                if outcome.ok and outcome.state is not None and not held:
                    self.state_store.put(outcome.client_id, outcome.state)
                yield outcome
        for error, cids in alike.items():
            if len(cids) > 1:
                log.warning(
                    "%s: %d more clients failed in %s with the same error (%s), e.g. clients %s",
                    where,
                    len(cids) - 1,
                    kind,
                    error,
                    ", ".join(str(c) for c in cids[1:6]),
                )


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
    start_round: int = 1,
    environment: Environment | None = None,
    deadline_s: float | None = None,
    attack: Attack | None = None,
    output: str | Path | None = None,
) -> RunResult:
    """Run rounds ``start_round..rounds`` of federated learning over ``num_clients`` virtual
    clients (``start_round > 1``: resuming, with ``initial_arrays`` the model after round
    ``start_round − 1``). ``environment`` (``pollinate.simulation.environment``) puts the
    clients on a virtual clock with device and network profiles: tasks are judged against
    ``deadline_s`` (default: the strategy's round timeout) in simulated time, and each
    round's record gains its simulated time, bytes sent and per-client durations. ``attack``
    (``pollinate.attacks``) makes some clients malicious, for robustness testing (label
    flipping happens in the data: see ``pollinate.attacks.flip_labels``).

    ``client_fn(context)`` builds the client for one task (see ``pollinate.client``); for the
    ``process`` and ``ray`` backends it must be picklable (a module-level function or an
    instance of a module-level class). Clients are the ids ``0..num_clients-1``; memory does
    not grow with clients that are not sampled. ``secure`` (a
    ``pollinate.privacy.SecureAggregation``) runs training through secure aggregation.

    ``output`` (a folder, e.g. ``"runs/my-run"``) writes the run folder as ``pollinate run``
    does, through a :class:`~pollinate.callbacks.RunFolderWriter` placed before
    ``callbacks`` (so trackers among them log its files): history.json and metrics.csv after
    every round, checkpoints/last.npz and best.npz, and at the end the plots and
    report.html. The folder is locked while the run writes it (``pollinate.runlock``).

    A ``FedBuff`` strategy (``pollinate.strategy.fedbuff``) runs asynchronously instead
    (``pollinate.asynchronous``): ``rounds`` counts server steps, each a history record,
    on the virtual clock of ``environment`` (without one, ``uniform_environment``: 1 ms per
    example and epoch, an instant network), with ``deadline_s`` as each client task's
    simulated timeout (default: the strategy's ``round_timeout_s``).
    """
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    if not 1 <= start_round <= rounds:
        raise ConfigError(f"start_round must be in 1..rounds={rounds}, got {start_round}")
    lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if output is not None:
        from pollinate.callbacks import RunFolderWriter
        from pollinate.runlock import RunLock

        lock = RunLock(output)  # one writer per run folder, held for the whole run
        history = history if history is not None else History()
        callbacks = [RunFolderWriter(output, history, strategy=strategy), *callbacks]
    engine = (
        make_backend(backend, workers, threads_per_worker, ray_address, gpus_per_worker)
        if isinstance(backend, str)
        else backend
    )
    executor: Any = SimulationExecutor(
        engine, seed=seed, cost_fn=cost_fn, state_store=state_store, deterministic=deterministic
    )
    if isinstance(strategy, FedBuff):
        refuse_with_fedbuff(secure=secure, attack=attack, start_round=start_round)
        from pollinate.simulation.async_clock import AsyncClock, uniform_environment

        env = environment or uniform_environment(num_clients, seed)
        timeout = deadline_s if deadline_s is not None else strategy.round_timeout_s
        clock = AsyncClock(executor, env, timeout)
        clock.wall_timeout_s = max(strategy.round_timeout_s, 1.0)
        with lock:
            try:
                engine.start(client_fn)
                return run_async(
                    strategy,
                    clock,
                    range(num_clients),
                    initial_arrays,
                    rounds,
                    callbacks=callbacks,
                    history=history,
                    clock=lambda: clock.now,
                )
            finally:
                engine.close()
    if attack is not None:
        from pollinate.attacks import AttackingExecutor

        executor = AttackingExecutor(executor, attack, attack.attackers(num_clients))
    if environment is not None:
        from pollinate.simulation.clock import ClockRecorder, VirtualClockExecutor

        executor = VirtualClockExecutor(executor, environment, deadline_s)
        callbacks = [ClockRecorder(executor), *callbacks]  # first: the writers see its stats
    with lock:
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
                start_round=start_round,
                secure=secure,
            )
        finally:
            engine.close()
