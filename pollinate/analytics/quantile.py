"""Federated quantiles by histogram refinement: a bisection over counts, in stages.

No client ever sends a value, only counts. The quantile matched is pandas'
``Series.quantile(q, interpolation="lower")`` (numpy ``method="lower"``): the value at 0-based
position ``floor(q · (n − 1))`` of the sorted values, i.e. the r-th smallest value x₍ᵣ₎ with
rank ``r = floor(q · (n − 1)) + 1``. Values are first clipped to the query's ``bounds``
[lo, hi]; clipping keeps the order, so the result is the quantile of the data clipped to the
bounds (the true quantile whenever it lies inside them).

The search, for every group and every requested q at once:

1. The interval starts as [lo, hi].
2. Each stage the server sends the current interval [a, b) of every (group, q)
   (:meth:`QuantileSearch.request`). Each client splits it into B equal sub-bins
   (``numpy.linspace(a, b, B + 1)``) and returns, per (group, q), the block
   ``[count(x < a), count in each sub-bin, count(x ≥ b)]`` (B + 2 numbers; the interval that
   ends at hi is closed, so hi itself falls in its last sub-bin).
3. The server adds the blocks, reads n from the first stage, and keeps the sub-bin in which
   the running count ``count(x < a) + c₁ + … + cⱼ`` first reaches r: x₍ᵣ₎ lies in it
   (:meth:`QuantileSearch.update`).
4. After S stages the answer is the midpoint of the last interval.

Accuracy: without noise the answer is within ``(hi − lo) / B**S / 2`` of x₍ᵣ₎ (up to the
rounding of the sub-bin edges), exactly, whatever the data: with the defaults B = 16, S = 4,
that is (hi − lo) / 131072, about 7.6e-6 of the range. The cost is S round trips of
``groups · len(quantiles) · (B + 2)`` numbers per client. With noise the counts are
approximate, so the sub-bin chosen may miss x₍ᵣ₎ by a little; each stage is one Gaussian
mechanism (:mod:`pollinate.analytics.dp`), and every row adds 1 to exactly one entry of
each (group, q) block, so a stage's L2 sensitivity is sqrt(len(quantiles)).

Note that the stages reveal, to the server and to the clients that see the next interval,
counts in ever narrower intervals around each quantile: a data holder who needs more than
``min_group_size`` (which applies to each group's row count here) should ask for noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pollinate.analytics.combine import check_total, package, rows_of
from pollinate.analytics.query import Query
from pollinate.errors import ConfigError


def sub_edges(lower: float, upper: float, sub_bins: int) -> np.ndarray:
    """The B + 1 edges of B equal sub-bins of [lower, upper] (both ends exact)."""
    return np.linspace(lower, upper, sub_bins + 1)


def rank(q: float, n: float) -> int:
    """The 1-based rank of pandas' 'lower' q-quantile of n values: floor(q (n - 1)) + 1."""
    return int(math.floor(q * (max(n, 1.0) - 1))) + 1


def parse_stage(query: Query, stage: Any) -> np.ndarray:
    """The (groups, quantiles, 2) intervals of a stage request, checked; ConfigError if not."""
    if query.statistic != "quantile":
        raise ConfigError(f"query {query.name!r} is a {query.statistic}; it takes no stage")
    if not isinstance(stage, dict) or "intervals" not in stage:
        raise ConfigError(
            f"query {query.name!r} is a quantile search: pass the stage request of "
            "QuantileSearch(query).request() to local_sums(..., stage_state=...)"
        )
    step = stage.get("stage")
    if not (isinstance(step, int) and 0 <= step < query.stages):
        raise ConfigError(f"a quantile stage must be 0 .. {query.stages - 1}, got {step!r}")
    try:
        intervals = np.array(stage["intervals"], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError("a quantile stage's intervals must be nested lists of numbers") from None
    shape = (query.num_groups, len(query.quantiles), 2)
    assert query.bounds is not None
    lo, hi = query.bounds
    ok = (
        intervals.shape == shape
        and bool(np.isfinite(intervals).all())
        and bool((intervals[..., 0] < intervals[..., 1]).all())
        and bool((intervals[..., 0] >= lo).all() and (intervals[..., 1] <= hi).all())
    )
    if not ok:
        raise ConfigError(
            f"a stage of quantile query {query.name!r} needs intervals of shape {shape} "
            f"(groups, quantiles, [a, b]) with {lo} <= a < b <= {hi}"
        )
    return intervals


def stage_block(sorted_values: np.ndarray, intervals: np.ndarray, query: Query) -> np.ndarray:
    """One group's block: per q, [count below, B sub-bin counts, count above] (client side).

    ``sorted_values`` are the group's clipped values in increasing order; ``intervals`` its
    (quantiles, 2) array of [a, b].
    """
    assert query.bounds is not None
    hi = query.bounds[1]
    size = query.sub_bins + 2
    block = np.zeros(len(query.quantiles) * size)
    n = len(sorted_values)
    for i, (a, b) in enumerate(intervals):
        edges = sub_edges(a, b, query.sub_bins)
        at = np.searchsorted(sorted_values, edges, side="left")
        if b >= hi:  # the top interval is closed: hi itself is in its last sub-bin
            at[-1] = np.searchsorted(sorted_values, b, side="right")
        out = block[i * size : (i + 1) * size]
        out[0] = at[0]
        out[1:-1] = np.diff(at)
        out[-1] = n - at[-1]
    return block


class QuantileSearch:
    """Server side of a quantile query: ``request`` → clients → sum → ``update``, S times.

    ::

        search = QuantileSearch(query)
        while not search.done:
            stage = search.request()                   # JSON-safe, sent to every client
            total = sum(local_sums(t, query, policy, stage) for t in tables)
            search.update(total)                       # noise the total first when private
        result = search.answer()

    ``noise_multiplier`` is the one each stage's total is noised with (0: exact), recorded in
    the answer. See the module docstring for the method and its accuracy.
    """

    def __init__(self, query: Query, *, noise_multiplier: float = 0.0) -> None:
        if query.statistic != "quantile":
            raise ConfigError(f"QuantileSearch needs a quantile query, got {query.statistic}")
        assert query.bounds is not None
        self.query = query
        self.noise_multiplier = float(noise_multiplier)
        self.stage = 0
        shape = (query.num_groups, len(query.quantiles), 2)
        self.intervals = np.broadcast_to(np.array(query.bounds), shape).copy()
        self.rows = np.zeros(query.num_groups)

    @property
    def done(self) -> bool:
        """Whether all S stages have been run."""
        return self.stage >= self.query.stages

    @property
    def accuracy(self) -> float:
        """The most an exact search's answer can differ from the quantile: (hi-lo)/B^S/2."""
        assert self.query.bounds is not None
        lo, hi = self.query.bounds
        return (hi - lo) / self.query.sub_bins**self.query.stages / 2

    def request(self) -> dict[str, Any]:
        """The stage request every client answers with ``local_sums(..., stage_state=request)``."""
        if self.done:
            raise ConfigError(f"quantile query {self.query.name!r} has run all its stages")
        return {"query": self.query.name, "stage": self.stage, "intervals": self.intervals.tolist()}

    def update(self, total: np.ndarray) -> None:
        """Fold in the summed vectors of this stage and narrow every interval to one sub-bin."""
        if self.done:
            raise ConfigError(f"quantile query {self.query.name!r} has run all its stages")
        query = self.query
        size = query.sub_bins + 2
        k = len(query.quantiles)
        blocks = check_total(query, total).reshape(query.num_groups, k, size)
        if self.stage == 0:  # every (group, q) block sums to the group's n: average them
            self.rows = blocks.sum(axis=2).mean(axis=1)
        for g in range(query.num_groups):
            if self.rows[g] < 1:
                continue
            for i, q in enumerate(query.quantiles):
                below, counts = blocks[g, i, 0], blocks[g, i, 1:-1]
                reached = np.flatnonzero(below + np.cumsum(counts) >= rank(q, self.rows[g]))
                j = int(reached[0]) if reached.size else query.sub_bins - 1
                a, b = self.intervals[g, i]
                edges = sub_edges(a, b, query.sub_bins)
                self.intervals[g, i] = edges[j], edges[j + 1]
        self.stage += 1

    def answer(self) -> dict[str, Any]:
        """The JSON-safe answer: per group, {str(q): value} (None for a group without rows)."""
        if not self.done:
            raise ConfigError(
                f"quantile query {self.query.name!r} has run {self.stage} of its "
                f"{self.query.stages} stages; keep calling request() and update()"
            )
        noised = self.noise_multiplier > 0
        cells: list[tuple[Any, Any, str | None]] = []
        for g in range(self.query.num_groups):
            n = float(self.rows[g])
            if n < 1:
                what = "the noised count" if noised else "the count"
                cells.append((None, rows_of(n, noised), f"{what} is {n:g}; no quantile"))
                continue
            mids = self.intervals[g].mean(axis=1)
            value = {str(q): float(m) for q, m in zip(self.query.quantiles, mids)}
            cells.append((value, rows_of(n, noised), None))
        extra = {"accuracy": self.accuracy, "bounds": list(self.query.bounds or ())}
        return package(self.query, cells, noise_multiplier=self.noise_multiplier, extra=extra)
