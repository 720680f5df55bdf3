"""The server side: the round loop, in one place, top to bottom.

A round, in order (DESIGN.md):

1. ``strategy.configure_train`` samples clients and says what each trains with;
2. ``executor.submit`` runs ``client.train`` on each of them, with a round deadline
   (a simulation backend, or a network transport);
3. ``strategy.aggregate_train`` folds the results into the next global model as they
   arrive; failures and stragglers are counted, not fatal. With secure aggregation
   (``pollinate.privacy.SecureAggregation``) steps 2 and 3 run its protocol instead, and the
   strategy is handed the sum of the updates, never one update;
4. federated evaluation (``configure_evaluate`` → clients' ``evaluate`` →
   ``aggregate_evaluate``) and centralized evaluation (``strategy.evaluate``);
5. the round is recorded in the history and the callbacks (progress, files, checkpoints)
   see it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from pollinate.limits import clip_strings, clip_text
from pollinate.strategy.base import EvaluateSummary, Failure, Strategy, TrainSummary
from pollinate.types import (
    Arrays,
    ClientId,
    Instructions,
    Metrics,
    Outcome,
    TaskKind,
    TrainIns,
    to_python_scalars,
)


class Executor(Protocol):
    """Runs one kind of client task on the planned clients; yields outcomes as they finish."""

    def submit(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        timeout_s: float,
    ) -> Iterator[Outcome]: ...


def in_order(outcomes: Iterator[Outcome], deterministic: bool) -> Iterator[Outcome]:
    """Outcomes as they finish, or (``deterministic``) buffered and handed on in client-id
    order, so the aggregate is bit-identical whichever way the clients ran."""
    if deterministic:
        return iter(sorted(outcomes, key=lambda o: o.client_id))
    return outcomes


class SecureAggregator(Protocol):
    """Steps 2 and 3 of a round through a secure aggregation protocol: the clients train,
    and the strategy receives only the sum of their updates."""

    def train(
        self,
        round_number: int,
        arrays: Arrays,
        strategy: Strategy,
        executor: Executor,
        plan: Sequence[tuple[ClientId, TrainIns]],
        observe: Callable[[Iterable[Outcome], int], Iterator[Outcome]],
    ) -> TrainSummary: ...


class Callback:
    """Hooks into a run; every method is optional."""

    def on_run_start(self, rounds: int, start_round: int) -> None:
        """Before the first round."""

    def on_round_start(self, round_number: int) -> None:
        """Before a round's sampling."""

    def on_task_done(self, round_number: int, outcome: Outcome, done: int, total: int) -> None:
        """After each client task finishes (or fails)."""

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        """After a round is recorded, with the new global model."""

    def on_run_end(self, history: History, error: BaseException | None) -> None:
        """After the last round, or when the run stops on an error."""


@dataclass
class History:
    """The record of a run: the resolved config and one entry per completed round."""

    config: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rounds": self.rounds}

    def metric(self, section: str, key: str) -> list[float | None]:
        """One metric per round, e.g. ``metric("centralized", "accuracy")`` (None if absent)."""
        return [r.get(section, {}).get(key) for r in self.rounds]

    @property
    def last(self) -> dict[str, Any]:
        return self.rounds[-1] if self.rounds else {}


@dataclass
class RunResult:
    """What a run returns: its history and the final global model."""

    history: History
    arrays: Arrays


Clients = Union[Sequence[ClientId], Callable[[], Sequence[ClientId]]]


def run(
    strategy: Strategy,
    executor: Executor,
    clients: Clients,
    arrays: Arrays,
    rounds: int,
    *,
    callbacks: Sequence[Callback] = (),
    history: History | None = None,
    start_round: int = 1,
    secure: SecureAggregator | None = None,
) -> RunResult:
    """Run rounds ``start_round..rounds`` from ``arrays``; return the history and final model.

    ``clients`` is the population to sample from, or a function returning the clients
    available now (a deployment's connected clients), called once per round. ``secure``
    runs each round's training through secure aggregation.
    """
    history = history if history is not None else History()
    started = time.monotonic()
    for cb in callbacks:
        cb.on_run_start(rounds, start_round)
    error: BaseException | None = None
    try:
        for round_number in range(start_round, rounds + 1):
            arrays, record = run_round(
                round_number, arrays, strategy, executor, clients, callbacks, started, secure
            )
            history.rounds.append(record)
            for cb in callbacks:
                cb.on_round_end(record, arrays)
    except BaseException as exc:
        error = exc
        raise
    finally:
        for cb in callbacks:
            cb.on_run_end(history, error)
    return RunResult(history, arrays)


def run_round(
    round_number: int,
    arrays: Arrays,
    strategy: Strategy,
    executor: Executor,
    clients: Clients,
    callbacks: Sequence[Callback] = (),
    started: float | None = None,
    secure: SecureAggregator | None = None,
) -> tuple[Arrays, dict[str, Any]]:
    """One round of federated training and evaluation; returns the new model and its record."""
    started = time.monotonic() if started is None else started
    for cb in callbacks:
        cb.on_round_start(round_number)
    if callable(clients):
        clients = clients()

    # 1. sample clients and configure their training
    train_plan = strategy.configure_train(round_number, arrays, clients)

    def observe(outcomes: Iterable[Outcome], total: int) -> Iterator[Outcome]:
        return _observed(outcomes, round_number, total, callbacks)

    if secure is None:
        # 2. send the global model: each sampled client trains it, until the round deadline
        outcomes = executor.submit(round_number, "train", train_plan, strategy.round_timeout_s)
        # 3. fold results into the next global model as they arrive
        train = strategy.aggregate_train(round_number, arrays, observe(outcomes, len(train_plan)))
    else:
        # 2.-3. the same through secure aggregation: the strategy is handed only the sum
        train = secure.train(round_number, arrays, strategy, executor, train_plan, observe)
    arrays = train.arrays

    # 4. federated evaluation where the data lives, then centralized evaluation
    federated = None
    evaluate_plan = strategy.configure_evaluate(round_number, arrays, clients)
    if evaluate_plan:
        outcomes = executor.submit(
            round_number, "evaluate", evaluate_plan, strategy.round_timeout_s
        )
        federated = strategy.aggregate_evaluate(round_number, observe(outcomes, len(evaluate_plan)))
    centralized = strategy.evaluate(round_number, arrays)

    # 5. record the round
    record = make_record(round_number, time.monotonic() - started, train, federated, centralized)
    return arrays, record


def _observed(
    outcomes: Iterable[Outcome], round_number: int, total: int, callbacks: Sequence[Callback]
) -> Iterator[Outcome]:
    """Pass outcomes through, telling the callbacks about each one."""
    for done, outcome in enumerate(outcomes, start=1):
        for cb in callbacks:
            cb.on_task_done(round_number, outcome, done, total)
        yield outcome


def _bounded(metrics: Metrics) -> dict[str, Any]:
    """Metrics as history stores them: plain scalars, long strings clipped."""
    return clip_strings(to_python_scalars(metrics))


def make_record(
    round_number: int,
    wall_s: float,
    train: TrainSummary,
    federated: EvaluateSummary | None,
    centralized: tuple[float, Metrics] | None,
) -> dict[str, Any]:
    """One round's entry in ``history.json`` (absent metrics stay absent)."""
    failures: list[Failure] = list(train.failures) + list(federated.failures if federated else [])
    record: dict[str, Any] = {"round": round_number, "wall_s": round(wall_s, 4)}
    if centralized is not None:
        loss, metrics = centralized
        record["centralized"] = {"loss": float(loss), **_bounded(metrics)}
    if federated is not None and federated.loss is not None:
        record["federated"] = {
            "loss": float(federated.loss),
            **_bounded(federated.metrics),
            "clients": federated.clients,
        }
    kinds = [f.kind for f in train.failures]
    record["train"] = {
        "clients": train.clients,
        "failures": len(train.failures),
        "timeouts": kinds.count("timeout"),
        "rejected": kinds.count("rejected"),
        **{k: kinds.count(k) for k in ("offline", "lost", "corrupted") if k in kinds},
        "metrics": _bounded(train.metrics),
    }
    clients: dict[str, dict[str, Any]] = {}
    for cid, (n, metrics) in train.per_client.items():
        clients[str(cid)] = {"num_examples": int(n), "train": _bounded(metrics)}
    if federated is not None:
        for cid, (loss, metrics) in federated.per_client.items():
            entry = clients.setdefault(str(cid), {})
            entry["evaluate"] = {"loss": float(loss), **_bounded(metrics)}
    record["clients"] = clients
    if train.privacy is not None:
        record["privacy"] = to_python_scalars(train.privacy)
    record["failures"] = [
        {"client_id": f.client_id, "task": f.task, "kind": f.kind, "reason": clip_text(f.reason)}
        for f in failures
    ]
    return record
