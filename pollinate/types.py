"""The vocabulary every part of pollinate shares.

- ``Arrays``: a model's parameters, or any numeric payload: a list of NumPy arrays.
- ``Config``: what the server tells a client (lr, epochs, round …): flat str → scalar.
- ``Metrics``: what a client reports back: flat str → scalar.
- Instructions and results of the client tasks are small frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

Scalar = Union[int, float, str, bool]
Arrays = list[np.ndarray]
Config = dict[str, Scalar]
Metrics = dict[str, Scalar]
ClientId = int
TaskKind = Literal["train", "evaluate", "query"]
TASK_KINDS: tuple[TaskKind, ...] = ("train", "evaluate", "query")


@dataclass(frozen=True)
class TrainIns:
    """What a client receives for local training: the global model and its config."""

    arrays: Arrays
    config: Config = field(default_factory=dict)


@dataclass(frozen=True)
class TrainRes:
    """What local training returns: the updated model, its example count and metrics."""

    arrays: Arrays
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateIns:
    """What a client receives for federated evaluation: the model and its config."""

    arrays: Arrays
    config: Config = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateRes:
    """What federated evaluation returns: loss, example count and metrics (e.g. accuracy)."""

    loss: float
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class QueryIns:
    """What a client receives for federated analytics: the query in its config, and any
    arrays the query needs (usually none)."""

    arrays: Arrays
    config: Config = field(default_factory=dict)


@dataclass(frozen=True)
class QueryRes:
    """What a query returns: local sums as Arrays (the server only ever adds them up), the
    number of rows they rest on, and metrics."""

    arrays: Arrays
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


#: what a task carries to a client, by kind
Instructions = Union[TrainIns, EvaluateIns, QueryIns]
#: the result type each task kind must return
RESULT_TYPES: dict[str, type] = {"train": TrainRes, "evaluate": EvaluateRes, "query": QueryRes}


@dataclass(frozen=True)
class Task:
    """One unit of work for one client, as the engine hands it to a backend."""

    client_id: ClientId
    kind: TaskKind
    config: Config
    cost: float = 1.0  # relative expected cost, for longest-task-first scheduling
    state: dict[str, Any] = field(default_factory=dict)  # the client's saved state


@dataclass(frozen=True)
class Outcome:
    """The end of one task: a result, or the reason it failed."""

    client_id: ClientId
    kind: TaskKind
    result: TrainRes | EvaluateRes | QueryRes | None = None
    error: str | None = None  # short reason; the traceback goes to the log
    seconds: float = 0.0
    state: dict[str, Any] | None = None  # the client's state after the task, to save
    traceback: str | None = None  # the full traceback of a client that raised
    # simulated seconds until the answer arrived (or would have), where a virtual clock
    # judged the task; None elsewhere (then ``seconds`` is the measured wall time)
    duration_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def elapsed_s(self) -> float | None:
        """How long the task took as the round saw it: the simulated duration on a virtual
        clock, else the measured seconds; None when unknown (e.g. an offline client)."""
        if self.duration_s is not None:
            return self.duration_s
        return self.seconds if self.seconds > 0 else None


def check_scalars(values: Mapping[str, object], what: str) -> None:
    """Raise TypeError unless ``values`` is a flat dict of str → int | float | str | bool."""
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be str, got {key!r}")
        if not isinstance(value, (int, float, str, bool, np.integer, np.floating, np.bool_)):
            raise TypeError(
                f"{what}[{key!r}] must be int, float, str or bool, got {type(value).__name__}"
            )


def to_python_scalars(values: Mapping[str, object]) -> dict[str, Scalar]:
    """Return ``values`` with NumPy scalars turned into plain Python ones (JSON-safe)."""
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        out[key] = value.item() if isinstance(value, np.generic) else value  # type: ignore[assignment]
    return out
