"""Interim: replaced by the full selection policy library."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pollinate.types import ClientId, Metrics


def sample_size(fraction: float, available: int, minimum: int) -> int:
    return min(available, max(minimum, math.ceil(round(fraction * available, 6))))


class SelectionPolicy(ABC):
    name: str = ""

    @abstractmethod
    def select(
        self,
        round_number: int,
        clients: Sequence[ClientId],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> list[ClientId]: ...

    def observe(
        self, round_number: int, results: Mapping[ClientId, Metrics], failed: Mapping[ClientId, str]
    ) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class Uniform(SelectionPolicy):
    name = "uniform"

    def select(self, round_number, clients, fraction, minimum, rng):  # type: ignore[no-untyped-def]
        available = len(clients)
        if fraction <= 0:
            return []
        k = sample_size(fraction, available, minimum)
        if k == available:
            return list(clients)
        picked = np.sort(rng.choice(available, size=k, replace=False))
        return [clients[int(i)] for i in picked]


class Poisson(SelectionPolicy):
    name = "poisson"

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def select(self, round_number, clients, fraction, minimum, rng):  # type: ignore[no-untyped-def]
        available = len(clients)
        k = int(rng.binomial(available, self.rate))
        picked = np.sort(rng.choice(available, size=k, replace=False))
        return [clients[int(i)] for i in picked]


def make_policy(name: str, **params: Any) -> SelectionPolicy:
    if name == "uniform":
        return Uniform()
    if name == "poisson":
        return Poisson(**params)
    raise ValueError(name)
