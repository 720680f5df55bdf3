"""Interim: replaced by the full server optimizer library."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from pollinate.types import Arrays


class ServerOptimizer(ABC):
    name: str = ""

    @abstractmethod
    def step(self, arrays: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Arrays: ...

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class Plain(ServerOptimizer):
    name = "plain"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def step(self, arrays: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Arrays:
        out = []
        for w, d in zip(arrays, delta):
            if w.dtype.kind in "fc":
                out.append((w.astype(np.float64) + self.server_lr * d).astype(w.dtype))
            else:
                out.append((w + np.rint(d)).astype(w.dtype))
        return out
