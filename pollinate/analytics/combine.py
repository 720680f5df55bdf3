"""Server side: turn the summed vector of a query into its answer (pure NumPy, no I/O).

:func:`answer` reads the total in the layout :func:`pollinate.analytics.local_sums` writes
(one block per group, see :mod:`pollinate.analytics.local`) and returns a JSON-safe dict::

    {"query": name, "statistic": ..., "value": v, "rows": n}                  # no group_by
    {"query": ..., "groups": [...], "value": {g: v}, "rows": {g: n}}           # group_by

Groups are keyed by :func:`group_key` (a string group as itself, any other value as its JSON
text, since JSON object keys are strings); ``groups`` keeps the values in query order.

- count: the number of matching rows (of non-missing ``column`` values, with a column);
  sum: their sum (0 for no rows, as pandas); mean; var and std are *sample* statistics
  (divisor n - 1, pandas' default ``ddof=1``); cov (ddof = 1) and corr (Pearson) use the rows
  where both columns are present, as pandas ``Series.cov`` / ``Series.corr`` do.
- histogram: ``{"counts": [...], "edges": [...]}``.
- A value that cannot be computed (no rows, one row for var, a constant column for corr, a
  noised count below 1, values that are not finite) is None, with the reason in ``reason``
  (``reasons`` per group): never a crash, never NaN.

A noised total (``noise_multiplier > 0``) is post-processed, which costs no privacy: counts
are clamped at 0, variances at 0 and correlations to [-1, 1]; ``dp`` in the answer records the
noise multiplier and the noise standard deviation of each coordinate of a block.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from pollinate.analytics.dp import noise_std
from pollinate.analytics.query import GroupValue, Query
from pollinate.errors import ConfigError


def group_key(value: GroupValue) -> str:
    """The JSON object key of a group value: a string as itself, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def check_total(query: Query, total: np.ndarray) -> np.ndarray:
    """``total`` as a float64 vector of the query's length, or ConfigError."""
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (query.vector_length,):
        raise ConfigError(
            f"query {query.name!r} expects a summed vector of length {query.vector_length}, "
            f"got shape {total.shape}: sum the vectors local_sums returned for this query"
        )
    return total


def answer(query: Query, total: np.ndarray, *, noise_multiplier: float = 0.0) -> dict[str, Any]:
    """The JSON-safe answer of ``query`` from the sum of the clients' vectors.

    ``noise_multiplier`` is the one the total was noised with (0: exact), recorded in the
    answer and used to decide the post-processing (see the module docstring).
    """
    if query.statistic == "quantile":
        raise ConfigError(
            f"query {query.name!r} is a quantile: it runs in stages; use QuantileSearch(query) "
            "(request / update / answer) instead of answer()"
        )
    blocks = check_total(query, total).reshape(query.num_groups, query.block_length)
    noised = noise_multiplier > 0
    cells = [_cell(query, block, noised) for block in blocks]
    return package(query, cells, noise_multiplier=noise_multiplier)


def package(
    query: Query,
    cells: list[tuple[Any, Any, str | None]],
    *,
    noise_multiplier: float = 0.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble an answer from one (value, rows, reason) per group."""
    out: dict[str, Any] = {"query": query.name, "statistic": query.statistic}
    for key in ("column", "column2", "where", "group_by"):
        if getattr(query, key) is not None:
            out[key] = getattr(query, key)
    if query.groups is None:
        value, rows, reason = cells[0]
        out.update(value=value, rows=rows)
        if reason is not None:
            out["reason"] = reason
    else:
        keys = [group_key(g) for g in query.groups]
        out["groups"] = list(query.groups)
        out["value"] = {k: cell[0] for k, cell in zip(keys, cells)}
        out["rows"] = {k: cell[1] for k, cell in zip(keys, cells)}
        reasons = {k: cell[2] for k, cell in zip(keys, cells) if cell[2] is not None}
        if reasons:
            out["reasons"] = reasons
    out.update(extra or {})
    if noise_multiplier > 0:
        out["dp"] = {
            "noise_multiplier": float(noise_multiplier),
            "noise_std": noise_std(query, noise_multiplier)[: query.block_length].tolist(),
        }
    return out


def rows_of(n: float, noised: bool) -> int:
    """A count as reported: exact counts as they are, noised ones rounded and clamped at 0."""
    return max(int(round(n)), 0) if noised else int(n)


def _cell(query: Query, block: np.ndarray, noised: bool) -> tuple[Any, Any, str | None]:
    stat = query.statistic
    if stat == "histogram":
        counts = np.maximum(block, 0.0) if noised else block
        as_list = counts.tolist() if noised else [int(c) for c in counts]
        assert query.bins is not None
        rows = rows_of(float(counts.sum()), noised)
        return {"counts": as_list, "edges": list(query.bins)}, rows, None
    n = float(block[0])
    rows = rows_of(n, noised)
    if stat == "count":
        return (max(n, 0.0) if noised else int(n)), rows, None
    if stat == "sum":
        value, reason = _finite(float(block[1]))
        return value, rows, reason
    minimum = 2 if stat in ("var", "std", "cov", "corr") else 1
    if n < minimum:
        need = "at least 2 rows" if minimum == 2 else "at least 1 row"
        what = "the noised count" if noised else "the count"
        return None, rows, f"{what} is {n:g}; {stat} needs {need}"
    if stat == "mean":
        value, reason = _finite(float(block[1]) / n)
    elif stat in ("var", "std"):
        s, ss = float(block[1]), float(block[2])
        var = max((ss - s * s / n) / (n - 1), 0.0)
        value, reason = _finite(var if stat == "var" else math.sqrt(var))
    else:
        sx, sy, sxx, syy, sxy = (float(v) for v in block[1:])
        cxy = sxy - sx * sy / n
        if stat == "cov":
            value, reason = _finite(cxy / (n - 1))
        else:
            cxx, cyy = sxx - sx * sx / n, syy - sy * sy / n
            if not (cxx > 0 and cyy > 0):
                value, reason = None, "a column is constant over these rows; corr is undefined"
            else:
                value, reason = _finite(min(max(cxy / math.sqrt(cxx * cyy), -1.0), 1.0))
    return value, rows, reason


def _finite(value: float) -> tuple[float | None, str | None]:
    if math.isfinite(value):
        return value, None
    return None, "the result is not finite: the data hold infinite values; give bounds to clip"
