"""The running example-weighted mean of the clients' metrics."""

from __future__ import annotations

import numpy as np

from pollinate.types import Metrics


class MetricsMean:
    """Running example-weighted mean of numeric client metrics; other values are dropped."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: Metrics, weight: float) -> None:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            if not np.isfinite(value):
                continue
            self._sums[key] = self._sums.get(key, 0.0) + float(value) * weight
            self._weights[key] = self._weights.get(key, 0.0) + weight

    def result(self) -> Metrics:
        return {k: self._sums[k] / w for k, w in self._weights.items() if w > 0}
