"""The asynchronous loop: FedBuff's server steps, in one place, top to bottom.

Where the synchronous loop (``pollinate.server``) waits for a round's clients, this one
keeps ``K = strategy.concurrency`` clients training all the time (Nguyen et al. 2022,
``pollinate.strategy.fedbuff``). In order:

1. every free slot goes to an idle client, picked at random (``strategy.pick``), which starts
   training from the current global model (``strategy.instructions``; ``executor.start``);
2. the executor hands back the next result to arrive (``executor.next``): the earliest on
   the virtual clock in simulation (``pollinate.simulation.async_clock.AsyncClock``), the
   first over the network in deployment (``pollinate.transport.grpc.asynchronous``);
3. the result is checked and folded into the buffer with its staleness weight
   (``strategy.fold``); a failure is counted and its slot refilled in step 1;
4. when the buffer holds ``M = strategy.buffer_size`` results, the server steps
   (``strategy.step``), evaluates centrally every ``strategy.evaluate_every`` steps, and the
   step is recorded in the history and the callbacks see it (as a round: ``"round"`` is the
   step number).

Before waiting in step 2 the loop tells an executor that can train ahead (the simulation's
``prefetch``) which clients its seeded picks will start next from the current model, so that
they train in the same backend batch. The run ends after ``steps`` server steps; the clients
still in flight are abandoned.
Too many failures in a row (``max_failures``, default ``max(100, 10 K)``) without one
accepted result stop the run with ``RoundFailedError``: no client can deliver.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pollinate.errors import ConfigError, RoundFailedError
from pollinate.server import Callback, Clients, History, RunResult, make_record
from pollinate.strategy.base import TrainSummary
from pollinate.strategy.fedbuff import FedBuff
from pollinate.types import Arrays, ClientId, Outcome, TrainIns


class AsyncExecutor(Protocol):
    """Starts single client tasks and hands back their outcomes as they arrive."""

    def start(self, task: int, client_id: ClientId, ins: TrainIns) -> None:
        """Start ``client_id``'s training (``task``: the dispatch number)."""

    def next(self) -> tuple[int, Outcome]:
        """The next outcome to arrive, with its task's dispatch number (blocks)."""

    def take_stats(self) -> dict[str, Any]:
        """What to add to a step's record under ``"environment"`` since the last call
        (``{}``: nothing)."""

    def close(self) -> None:
        """Abandon the tasks in flight."""


def run_async(
    strategy: FedBuff,
    executor: AsyncExecutor,
    clients: Clients,
    arrays: Arrays,
    steps: int,
    *,
    callbacks: Sequence[Callback] = (),
    history: History | None = None,
    clock: Callable[[], float] | None = None,
    max_failures: int | None = None,
) -> RunResult:
    """Run ``steps`` FedBuff server steps from ``arrays``; return the history and the final
    model. ``clients``: the population, or a function returning the clients available now
    (called before each wait for a result). ``clock``: the simulated seconds since the
    start, recorded with each step as ``environment.clock_s`` (None: real time only)."""
    if steps < 1:
        raise ConfigError(f"the number of server steps must be >= 1, got {steps}")
    history = history if history is not None else History()
    max_failures = max_failures or max(100, 10 * strategy.concurrency)
    started = time.monotonic()
    flight: dict[int, tuple[ClientId, int]] = {}  # task → (client, model version it started)
    dispatched = 0
    failures_in_a_row = 0
    step = strategy.version + 1
    last_clock = clock() if clock is not None else 0.0
    for cb in callbacks:
        cb.on_run_start(steps, step)
        cb.on_round_start(step)
    error: BaseException | None = None
    try:
        while step <= steps:
            # 1. every free slot to an idle client, from the current model
            population = clients() if callable(clients) else clients
            while len(flight) < strategy.concurrency:
                busy = (cid for cid, _ in flight.values())
                cid = strategy.pick(dispatched, population, busy)
                if cid is None:
                    break
                executor.start(dispatched, cid, strategy.instructions(arrays))
                flight[dispatched] = (cid, strategy.version)
                dispatched += 1
            if not flight:
                raise RoundFailedError(
                    f"server step {step}: no client to train ({len(population)} available)"
                )
            _prefetch(executor, strategy, arrays, population, flight, dispatched)

            # 2. the next result to arrive
            task, outcome = executor.next()
            _, version = flight.pop(task)

            # 3. check it and fold it into the buffer (a failure frees its slot all the same)
            failure = strategy.fold(outcome, version)
            failures_in_a_row = failures_in_a_row + 1 if failure is not None else 0
            if failures_in_a_row >= max_failures:
                raise RoundFailedError(
                    f"server step {step}: {failures_in_a_row} client tasks failed in a row, the "
                    f"last one: client {outcome.client_id}: "
                    f"{failure.reason if failure else ''}"
                )
            for cb in callbacks:
                cb.on_task_done(step, outcome, strategy.buffered, strategy.buffer_size)
            if not strategy.full:
                continue

            # 4. a full buffer: the server step, evaluation, the record
            arrays, train, staleness = strategy.step(arrays)
            evaluate = step % strategy.evaluate_every == 0 or step == steps
            centralized = strategy.evaluate(step, arrays) if evaluate else None
            record = make_record(step, time.monotonic() - started, train, None, centralized)
            record["async"] = {
                "step": step,
                "applied": train.clients,
                "mean_staleness": round(statistics.fmean(staleness), 6),
                "max_staleness": max(staleness),
                "in_flight": len(flight),
                "dispatched": dispatched,
                "versions_held": strategy.versions_held(),
            }
            if clock is not None:
                now = clock()
                record["environment"] = _on_the_clock(now - last_clock, now, executor, train)
                last_clock = now
            history.rounds.append(record)
            for cb in callbacks:
                cb.on_round_end(record, arrays)
            step += 1
            if step <= steps:
                for cb in callbacks:
                    cb.on_round_start(step)
    except BaseException as exc:
        error = exc
        raise
    finally:
        executor.close()
        for cb in callbacks:
            cb.on_run_end(history, error)
    return RunResult(history, arrays)


def refuse_with_fedbuff(*, secure: Any = None, attack: Any = None, start_round: int = 1) -> None:
    """Refuse what an asynchronous FedBuff run cannot be combined with, naming both parts."""
    if secure is not None:
        raise ConfigError(
            "strategy fedbuff with secure aggregation: SecAgg+ sums a fixed cohort of clients "
            "in one round, while FedBuff applies each result as it arrives; turn one of them off"
        )
    if attack is not None:
        raise ConfigError(
            "strategy fedbuff with [attack]: simulated attacks rewrite a round's results, and "
            "FedBuff has no rounds; use a synchronous strategy for robustness tests"
        )
    if start_round != 1:
        raise ConfigError(
            f"strategy fedbuff cannot resume (start_round = {start_round}): the clients in "
            "flight when the run stopped cannot be restored; start the run afresh"
        )


def _prefetch(
    executor: AsyncExecutor,
    strategy: FedBuff,
    arrays: Arrays,
    population: Sequence[ClientId],
    flight: dict[int, tuple[ClientId, int]],
    dispatched: int,
) -> None:
    """Tell an executor that can train ahead (``prefetch``, the simulation's) which clients
    the next dispatches will pick while the buffer fills, from the current model: the seeded
    picks, with today's busy clients (a guess; a wrong one is dropped, never used)."""
    prefetch = getattr(executor, "prefetch", None)
    ahead = strategy.buffer_size - strategy.buffered - 1
    if prefetch is None or strategy.seed is None or ahead <= 0:
        return
    busy = {cid for cid, _ in flight.values()}
    guesses = []
    for task in range(dispatched, dispatched + ahead):
        cid = strategy.pick(task, population, busy)
        if cid is None:
            break
        busy.add(cid)
        guesses.append((task, cid))
    prefetch(guesses, strategy.peek_instructions(arrays))


def _on_the_clock(
    seconds: float, now: float, executor: AsyncExecutor, train: TrainSummary
) -> dict[str, Any]:
    """A step's ``"environment"`` record: its simulated seconds, the clock, the bytes sent
    and the environment's failures since the previous step (as the synchronous clock's)."""
    stats = executor.take_stats()
    kinds = [f.kind for f in train.failures]
    return {
        "simulated_time_s": round(seconds, 6),
        "clock_s": round(now, 6),
        "bytes_down": stats.get("bytes_down", 0),
        "bytes_up": stats.get("bytes_up", 0),
        "train": {
            **{k: v for k, v in stats.items() if not k.startswith("bytes")},
            "timeouts": kinds.count("timeout"),
        },
    }
