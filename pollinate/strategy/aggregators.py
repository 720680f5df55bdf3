"""Interim: replaced by the full aggregator library."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from pollinate.strategy.aggregate import WeightedMean as _Running
from pollinate.types import Arrays


class Accumulator(Protocol):
    count: int
    total_weight: float

    def add(self, update: Sequence[np.ndarray], weight: float) -> None: ...

    def result(self) -> Arrays: ...


class Aggregator(ABC):
    name: str = ""
    sum_based: bool = False

    @abstractmethod
    def start(self, template: Sequence[np.ndarray]) -> Accumulator: ...

    def aggregate(self, updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
        acc = self.start(updates[0])
        for u, w in zip(updates, weights):
            acc.add(u, w)
        return acc.result()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class WeightedMean(Aggregator):
    name = "mean"
    sum_based = True

    def __init__(self, dtype: str = "float64") -> None:
        self.dtype = dtype

    def start(self, template: Sequence[np.ndarray]) -> Accumulator:
        return _Running(template, self.dtype)
