"""Pure NumPy reductions: arrays and weights in, arrays out. No I/O, no frameworks.

The running weighted mean folds one update at a time into an O(model) accumulator, so a
round costs the same memory for 10 clients as for 10,000.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pollinate.strategy.check import check_update
from pollinate.types import Arrays, Metrics

__all__ = ["MetricsMean", "WeightedMean", "check_update", "weighted_mean"]


class WeightedMean:
    """Running weighted mean of Arrays: ``add(arrays, weight)`` then ``result()``.

    Sums in ``dtype`` (float64 by default) in place, with one scratch buffer per array, so
    no per-update temporaries are made. Integer arrays are averaged and rounded.
    """

    def __init__(self, template: Sequence[np.ndarray], dtype: str | np.dtype = "float64"):
        self._template = [(a.shape, a.dtype) for a in template]
        self._dtype = np.dtype(dtype)
        self._sums = [np.zeros(a.shape, dtype=self._acc_dtype(a)) for a in template]
        self._scratch = [np.empty_like(s) for s in self._sums]
        self.total_weight = 0.0
        self.count = 0

    def _acc_dtype(self, a: np.ndarray) -> np.dtype:
        return np.dtype(np.complex128) if a.dtype.kind == "c" else self._dtype

    def add(self, arrays: Sequence[np.ndarray], weight: float) -> None:
        """Fold ``arrays`` with ``weight`` into the sum."""
        if weight < 0 or not np.isfinite(weight):
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        for acc, tmp, a in zip(self._sums, self._scratch, arrays):
            # multiply in the accumulator's dtype: float16/uint8 updates must not overflow
            np.multiply(a, weight, out=tmp, dtype=tmp.dtype, casting="unsafe")
            np.add(acc, tmp, out=acc)
        self.total_weight += weight
        self.count += 1

    def result(self) -> Arrays:
        """The weighted mean, in the template's dtypes."""
        if self.total_weight <= 0:
            raise ValueError("no update with positive weight was added")
        out: Arrays = []
        for acc, (shape, dtype) in zip(self._sums, self._template):
            mean = acc / self.total_weight
            if dtype.kind in "iub":
                mean = np.rint(mean)
            out.append(mean.astype(dtype, copy=False).reshape(shape))
        return out


def weighted_mean(updates: Iterable[Sequence[np.ndarray]], weights: Iterable[float]) -> Arrays:
    """The weighted mean of several Arrays (FedAvg's reduction)."""
    acc: WeightedMean | None = None
    for arrays, w in zip(updates, weights):
        acc = acc or WeightedMean(arrays)
        acc.add(arrays, w)
    if acc is None:
        raise ValueError("no updates to average")
    return acc.result()


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
