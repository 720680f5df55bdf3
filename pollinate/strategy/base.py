"""The Strategy interface: who takes part in a round and how results become the next model."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pollinate.types import Arrays, ClientId, EvaluateIns, Metrics, Outcome, TrainIns

log = logging.getLogger("pollinate")


@dataclass(frozen=True)
class Failure:
    """A client task that did not count: what it was, and why."""

    client_id: ClientId
    task: str
    reason: str
    kind: str = "error"  # error | timeout | rejected


@dataclass(frozen=True)
class TrainSummary:
    """What aggregating one round's training produced."""

    arrays: Arrays
    metrics: Metrics
    clients: int
    failures: list[Failure] = field(default_factory=list)
    per_client: dict[ClientId, tuple[int, Metrics]] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # ε, δ … when a DP wrapper produced the model


@dataclass(frozen=True)
class EvaluateSummary:
    """What aggregating one round's federated evaluation produced."""

    loss: float
    metrics: Metrics
    clients: int
    failures: list[Failure] = field(default_factory=list)
    per_client: dict[ClientId, tuple[float, Metrics]] = field(default_factory=dict)


class Strategy(ABC):
    """Decides who trains and evaluates each round, and how their results are combined."""

    #: seconds a round's tasks may take before stragglers are dropped
    round_timeout_s: float = 600.0

    @abstractmethod
    def configure_train(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, TrainIns]]:
        """Sample clients and say what each trains with."""

    @abstractmethod
    def aggregate_train(
        self, round_number: int, arrays: Arrays, outcomes: Iterable[Outcome]
    ) -> TrainSummary:
        """Fold training outcomes, as they arrive, into the next global model."""

    @abstractmethod
    def configure_evaluate(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, EvaluateIns]]:
        """Sample clients for federated evaluation (an empty list skips it)."""

    @abstractmethod
    def aggregate_evaluate(
        self, round_number: int, outcomes: Iterable[Outcome]
    ) -> EvaluateSummary | None:
        """Combine federated evaluation outcomes (None when nobody evaluated)."""

    def evaluate(self, round_number: int, arrays: Arrays) -> tuple[float, Metrics] | None:
        """Centralized evaluation on server-side data (None when there is none)."""
        return None

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        """Take up a resumed run: rebuild state kept between rounds from the completed
        rounds' history records (nothing to rebuild by default)."""


class StrategyWrapper(Strategy):
    """A strategy around another one (privacy wraps, it does not fork): every step is the
    wrapped strategy's until a subclass overrides it."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.round_timeout_s = strategy.round_timeout_s

    def configure_train(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, TrainIns]]:
        return self.strategy.configure_train(round_number, arrays, clients)

    def aggregate_train(
        self, round_number: int, arrays: Arrays, outcomes: Iterable[Outcome]
    ) -> TrainSummary:
        return self.strategy.aggregate_train(round_number, arrays, outcomes)

    def configure_evaluate(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, EvaluateIns]]:
        return self.strategy.configure_evaluate(round_number, arrays, clients)

    def aggregate_evaluate(
        self, round_number: int, outcomes: Iterable[Outcome]
    ) -> EvaluateSummary | None:
        return self.strategy.aggregate_evaluate(round_number, outcomes)

    def evaluate(self, round_number: int, arrays: Arrays) -> tuple[float, Metrics] | None:
        return self.strategy.evaluate(round_number, arrays)

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        self.strategy.restore(records)
