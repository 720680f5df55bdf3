"""The Strategy interface: who takes part in a round and how results become the next model.

The round loop (``pollinate.server``) talks to a strategy through this interface only. A
round's training results reach the strategy either one by one, in the clear
(``aggregate_train``), or as one sum delivered by secure aggregation (``secure_terms`` says
how the clients must weight and noise their updates; ``aggregate_sum`` takes the sum). A
strategy that needs individual updates (a median, Krum) refuses the sum with a
``ConfigError`` when the run is built. ``state``/``load_state`` hold what a strategy keeps
between rounds (server momentum, moments, control variates, the selection policy's memory),
saved with every round so that a resumed run continues exactly.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pollinate.errors import ConfigError
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
    """What aggregating one round's federated evaluation produced (``loss`` None: too few
    clients answered, so there is no federated result, only the failures)."""

    loss: float | None
    metrics: Metrics
    clients: int
    failures: list[Failure] = field(default_factory=list)
    per_client: dict[ClientId, tuple[float, Metrics]] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureTerms:
    """How clients prepare their updates for a secure sum: the weight ``c_k`` of each
    (``min(n_k, weight_cap) / weight_cap``, or 1 when ``weight_cap`` is 0), the standard
    deviation of Gaussian noise each adds (distributed DP), and train metrics summed securely
    instead of sent in the clear."""

    weight_cap: int = 0
    noise_stddev: float = 0.0
    summed_metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecureSum:
    """What secure aggregation delivers: ``Σ_k c_k Δ_k`` over the float arrays (one float64
    vector, in model order), the securely summed metrics, and the survivors' outcomes (their
    example counts and clear metrics; no arrays)."""

    total: np.ndarray
    summed: dict[str, float]
    survivors: list[Outcome]
    weight: float  # Σ_k c_k
    noise_stddev: float = 0.0  # of the Gaussian noise the sum already holds
    failures: list[Failure] = field(default_factory=list)


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

    def state(self) -> dict[str, Any]:
        """What the strategy keeps between rounds, to save with each round: JSON-safe
        values and NumPy arrays (``pollinate.strategy.state`` packs them)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take up a resumed run from ``state()`` as saved after its last round."""

    def secure_terms(self, round_number: int, num_clients: int, weight_cap: int) -> SecureTerms:
        """How the ``num_clients`` clients of a round prepare their updates for a secure sum
        (``weight_cap``: secure aggregation's cap on example-count weights). Raises
        ``ConfigError`` when the strategy needs individual updates."""
        raise ConfigError(
            f"{type(self).__name__} cannot aggregate a secure sum: it needs the individual "
            "updates; turn secure aggregation off or use a sum-based strategy (FedAvg)"
        )

    @property
    def sum_based(self) -> bool:
        """Whether the strategy can work from the weighted sum of the updates alone (so
        under secure aggregation and central DP)."""
        return False

    def aggregate_sum(self, round_number: int, arrays: Arrays, summed: SecureSum) -> TrainSummary:
        """The next global model from a secure sum (see ``secure_terms``)."""
        raise ConfigError(f"{type(self).__name__} cannot aggregate a secure sum")


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

    def state(self) -> dict[str, Any]:
        return self.strategy.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.strategy.load_state(state)

    def secure_terms(self, round_number: int, num_clients: int, weight_cap: int) -> SecureTerms:
        return self.strategy.secure_terms(round_number, num_clients, weight_cap)

    @property
    def sum_based(self) -> bool:
        return self.strategy.sum_based

    def aggregate_sum(self, round_number: int, arrays: Arrays, summed: SecureSum) -> TrainSummary:
        return self.strategy.aggregate_sum(round_number, arrays, summed)
