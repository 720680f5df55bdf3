"""The client side: what runs where the data lives.

A *client* answers up to three tasks: ``train`` (local training), ``evaluate`` (federated
evaluation) and, for federated analytics, ``query`` (local sums over its data; see
``AnalyticsClient``). The engine never keeps client
objects between tasks: for every task it calls the user's ``client_fn(context)``, which
builds a light ``Client`` bound to that client's data. Heavy objects (the model) are built
once per worker and reused through ``context.worker``; state that a stateful algorithm keeps
between rounds lives in ``context.state``, which the engine loads from and saves to a
``StateStore`` keyed by client id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pollinate.types import Arrays, ClientId, Config, EvaluateRes, QueryRes, TrainRes


@runtime_checkable
class Client(Protocol):
    """A data holder's answers to the server's tasks."""

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        """Train ``arrays`` locally and return the updated arrays."""
        ...

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        """Evaluate ``arrays`` on local held-out data."""
        ...


@runtime_checkable
class AnalyticsClient(Protocol):
    """A data holder that answers federated analytics queries (``pollinate.analytics``)."""

    def query(self, arrays: Arrays, config: Config) -> QueryRes:
        """Compute local sums for the query in ``config``; raise to refuse it."""
        ...


@dataclass
class ClientContext:
    """What ``client_fn`` gets to build the client for one task."""

    client_id: ClientId
    seed: int  # derived from (run seed, round, client id): same on every backend
    state: dict[str, Any] = field(default_factory=dict)  # saved back after the task
    worker: dict[str, Any] = field(default_factory=dict)  # per-worker cache (build once)


ClientFn = Callable[[ClientContext], Any]  # a Client and/or an AnalyticsClient


def is_client(obj: object) -> bool:
    """Whether ``obj`` is a client object rather than a ``client_fn`` (a class whose
    instances are clients is a ``client_fn``, though it has ``train`` attributes too)."""
    return isinstance(obj, Client) and not isinstance(obj, type)


class StateStore(Protocol):
    """Per-client state kept between rounds, keyed by client id."""

    def get(self, client_id: ClientId) -> dict[str, Any]:
        """The client's saved state (a new empty dict if none)."""
        ...

    def put(self, client_id: ClientId, state: dict[str, Any]) -> None:
        """Save the client's state (an empty state removes the entry)."""
        ...


class MemoryStateStore:
    """A ``StateStore`` in memory: holds entries only for clients that kept state."""

    def __init__(self) -> None:
        self._states: dict[ClientId, dict[str, Any]] = {}

    def get(self, client_id: ClientId) -> dict[str, Any]:
        return dict(self._states.get(client_id, {}))

    def put(self, client_id: ClientId, state: dict[str, Any]) -> None:
        if state:
            self._states[client_id] = dict(state)
        else:
            self._states.pop(client_id, None)

    def __len__(self) -> int:
        return len(self._states)


def task_seed(run_seed: int, round_number: int, client_id: ClientId) -> int:
    """A 63-bit seed for one client's task in one round, identical on every backend."""
    import numpy as np

    seq = np.random.SeedSequence([run_seed, round_number, int(client_id)])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
