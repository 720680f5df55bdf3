"""Client side: a query's sufficient statistics over this client's own table.

:func:`local_sums` returns one flat float64 vector whose length and layout depend on the
query only, so the server (or secure aggregation) can add the clients' vectors. One block per
group of ``query.groups`` in order (one block without ``group_by``; rows whose group is not
listed, or is missing, are ignored), each laid out as:

============  ============================================  ========================
statistic     block                                         rows counted (n)
============  ============================================  ========================
count         [n]                                           matching rows (with a
                                                            column: its non-missing)
sum, mean     [n, Σx]                                       x present
var, std      [n, Σx, Σx²]                                  x present
cov, corr     [n, Σx, Σy, Σx², Σy², Σxy]                    x and y both present
histogram     [count in each bin]                           x within the edges
quantile      per q: [count below, B sub-bin counts, above] x present (one stage)
============  ============================================  ========================

Histogram bins are [e_i, e_i+1) with the last one closed, as ``numpy.histogram``; values
outside the edges are not counted anywhere. A noised query (``query.private``) clips x (and
y) to its bounds before summing; a quantile search always clips to its bounds.

The data holder's :class:`Policy` is enforced here, before anything leaves the client:
columns it does not expose, unknown columns, a non-numeric column where numbers are needed
and any cell resting on 0 < rows < ``min_group_size`` make :func:`local_sums` raise
:class:`QueryRefused` with the reason. A cell is a group (times a bin, for a histogram);
empty cells are fine, they add nothing.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.analytics.filters import column_kind, column_values, literal_kind
from pollinate.analytics.quantile import parse_stage, stage_block
from pollinate.analytics.query import Query
from pollinate.errors import ConfigError, PollinateError

if TYPE_CHECKING:
    import pandas as pd

_NUMERIC_KINDS = ("number", "bool", "empty")


class QueryRefused(PollinateError):
    """The data holder's policy (or its table) does not allow answering the query.

    ``reason`` says why, without revealing more than the refusal itself; ``client_id`` is
    set by whoever ran the query on several clients.
    """

    def __init__(self, reason: str, *, client_id: Any = None) -> None:
        prefix = f"client {client_id} refused the query: " if client_id is not None else ""
        super().__init__(prefix + reason)
        self.reason = reason
        self.client_id = client_id


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a data holder allows: the columns it exposes (None: all) and the smallest cell."""

    exposed: frozenset[str] | None = None
    min_group_size: int = 1

    def __post_init__(self) -> None:
        if self.exposed is not None:
            if isinstance(self.exposed, str) or not isinstance(self.exposed, Iterable):
                raise ConfigError(
                    f"Policy.exposed must be a set of column names or None, got {self.exposed!r}"
                )
            exposed = frozenset(self.exposed)
            if not all(isinstance(c, str) for c in exposed):
                raise ConfigError("Policy.exposed must hold column names (strings)")
            object.__setattr__(self, "exposed", exposed)
        size = self.min_group_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ConfigError(f"Policy.min_group_size must be an integer >= 1, got {size!r}")

    def exposes(self, column: str) -> bool:
        """Whether the data holder lets queries read ``column``."""
        return self.exposed is None or column in self.exposed


def local_sums(
    table: pd.DataFrame,
    query: Query,
    policy: Policy | None = None,
    stage_state: dict[str, Any] | None = None,
) -> np.ndarray:
    """This client's vector for ``query`` (see the module docstring); QueryRefused if not allowed.

    ``stage_state`` is the stage request of a quantile search (``QuantileSearch.request()``);
    other statistics take none.
    """
    policy = policy if policy is not None else Policy()
    _check_columns(table, query, policy)
    intervals = parse_stage(query, stage_state) if query.statistic == "quantile" else None
    if intervals is None and stage_state is not None:
        raise ConfigError(f"query {query.name!r} is a {query.statistic}; it takes no stage")
    keep = np.ones(len(table), dtype=bool)
    if query.filter is not None:
        keep &= query.filter.mask(table)
    group = _group_index(table, query)  # -1: not in a listed group
    keep &= group >= 0
    stat, g = query.statistic, query.num_groups

    if stat == "count" and query.column is None:
        blocks = np.bincount(group[keep], minlength=g).astype(np.float64)[:, None]
        _check_cells(query, policy, blocks)
        return blocks.ravel()
    if stat == "count":
        present = table[query.column].notna().to_numpy(dtype=bool)
        blocks = np.bincount(group[keep & present], minlength=g).astype(np.float64)[:, None]
        _check_cells(query, policy, blocks)
        return blocks.ravel()

    clip = query.private or stat == "quantile"
    x = _numbers(table, query, query.column, query.bounds if clip else None)
    valid = keep & ~np.isnan(x)
    if stat == "histogram":
        return _histogram(query, policy, x, valid, group)
    if stat == "quantile":
        assert intervals is not None
        return _quantile(query, policy, x, valid, group, intervals)
    if stat in ("cov", "corr"):
        y = _numbers(table, query, query.column2, query.bounds2 if clip else None)
        valid &= ~np.isnan(y)
        xv, yv = x[valid], y[valid]
        features = [np.ones_like(xv), xv, yv, xv * xv, yv * yv, xv * yv]
    else:
        xv = x[valid]
        features = [np.ones_like(xv), xv, xv * xv][: 2 if stat in ("sum", "mean") else 3]
    gv = group[valid]
    blocks = np.stack([np.bincount(gv, weights=f, minlength=g) for f in features], axis=1)
    _check_cells(query, policy, blocks[:, :1])
    return blocks.ravel()


def local_groups(table: pd.DataFrame, column: str, policy: Policy | None = None) -> list[Any]:
    """The values of ``column`` this client holds, for a query whose ``groups`` are to be
    discovered: only values with at least ``min_group_size`` rows (smaller groups are not
    reported, and so not analysed), missing values never; QueryRefused for a column the
    data holder does not expose."""
    policy = policy if policy is not None else Policy()
    probe = Query("count", group_by=column, groups=("",))  # only to check the column
    _check_columns(table, probe, policy)
    counts = table[column].dropna().value_counts()
    values = [_plain(v) for v in counts.index[counts >= policy.min_group_size]]
    for v in values:
        if not isinstance(v, (str, int, float, bool)):
            raise QueryRefused(
                f"column {column!r} holds {type(v).__name__} values; group by a "
                "column of strings, numbers or booleans"
            )
    return sorted(values, key=lambda v: (str(type(v)), v))


def _plain(value: Any) -> Any:
    """A NumPy/pandas scalar as a plain Python one; whole floats as ints (1.0 → 1)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# --- checks ---------------------------------------------------------------------------------


def _check_columns(table: pd.DataFrame, query: Query, policy: Policy) -> None:
    for column in sorted(query.columns):  # exposure first: never reveal what is hidden
        if not policy.exposes(column):
            raise QueryRefused(
                f"the data holder does not expose column {column!r}; query only the columns "
                f"it exposes: {', '.join(sorted(policy.exposed or ())) or 'none'}"
            )
    for column in sorted(query.columns):
        if column not in table.columns:
            visible = [str(c) for c in table.columns if policy.exposes(str(c))]
            raise QueryRefused(
                f"this client's table has no column {column!r}; its columns are "
                f"{', '.join(visible) or 'none'}: check the name"
            )


def _check_cells(query: Query, policy: Policy, counts: np.ndarray) -> None:
    """Refuse when a cell of ``counts`` (groups x cells) holds 0 < rows < min_group_size."""
    minimum = policy.min_group_size
    small = np.argwhere((counts > 0) & (counts < minimum))
    if small.size == 0:
        return
    g, cell = (int(i) for i in small[0])
    where = []
    if query.groups is not None:
        where.append(f"{query.group_by} = {query.groups[g]!r}")
    if query.statistic == "histogram":
        assert query.bins is not None
        lo, hi = query.bins[cell], query.bins[cell + 1]
        closing = "]" if cell == len(query.bins) - 2 else ")"
        where.append(f"bin [{lo:g}, {hi:g}{closing}")
    name = ", ".join(where) or "the matching rows"
    # the reason names the cell and the policy, nothing about how many rows it holds
    raise QueryRefused(
        f"the cell {name} does not meet this data holder's minimum of {minimum} rows per "
        "answer cell; ask for fewer groups or wider bins, or loosen the filter"
    )


def _numbers(
    table: pd.DataFrame, query: Query, column: str | None, bounds: tuple[float, float] | None
) -> np.ndarray:
    """The column as float64 (missing: NaN), clipped to ``bounds`` when given."""
    assert column is not None
    series = table[column]
    kind = column_kind(series)
    if kind not in _NUMERIC_KINDS:
        holds = "strings" if kind == "string" else f"values of type {series.dtype}"
        raise QueryRefused(
            f"column {column!r} holds {holds}, not numbers, on this client: "
            f"{query.statistic} needs a numeric column"
        )
    x = series.to_numpy(dtype=np.float64, na_value=np.nan)
    if bounds is not None:
        x = np.clip(x, bounds[0], bounds[1])
    return x


def _group_index(table: pd.DataFrame, query: Query) -> np.ndarray:
    """Each row's position in ``query.groups`` (-1 if none); all 0 without group_by."""
    if query.group_by is None or query.groups is None:
        return np.zeros(len(table), dtype=np.int64)
    series = table[query.group_by]
    kind = column_kind(series)
    if kind == "other":
        raise QueryRefused(
            f"column {query.group_by!r} has type {series.dtype} on this client, which cannot "
            "be grouped by; group by a column of strings, numbers or booleans"
        )
    present, values = column_values(series)
    index = np.full(len(values), -1, dtype=np.int64)
    for i, value in enumerate(query.groups):
        if kind != "empty" and literal_kind(value) != kind:
            raise QueryRefused(
                f"group {value!r} is a {literal_kind(value)} but column {query.group_by!r} "
                f"holds {kind}s on this client; list groups of the column's kind"
            )
        index[(index == -1) & np.asarray(values == value, dtype=bool)] = i
    group = np.full(len(table), -1, dtype=np.int64)
    group[present] = index
    return group


# --- histogram and quantile -----------------------------------------------------------------


def _histogram(
    query: Query, policy: Policy, x: np.ndarray, valid: np.ndarray, group: np.ndarray
) -> np.ndarray:
    assert query.bins is not None
    edges = np.asarray(query.bins)
    bins = len(edges) - 1
    xv, gv = x[valid], group[valid]
    index = np.searchsorted(edges, xv, side="right") - 1
    index[xv == edges[-1]] = bins - 1  # the last bin is closed
    inside = (index >= 0) & (index < bins)
    cell = gv[inside] * bins + index[inside]
    counts = np.bincount(cell, minlength=query.num_groups * bins).astype(np.float64)
    _check_cells(query, policy, counts.reshape(query.num_groups, bins))
    return counts


def _quantile(
    query: Query,
    policy: Policy,
    x: np.ndarray,
    valid: np.ndarray,
    group: np.ndarray,
    intervals: np.ndarray,
) -> np.ndarray:
    xv, gv = x[valid], group[valid]
    order = np.lexsort((xv, gv))  # by group, then value
    xs, gs = xv[order], gv[order]
    starts = np.searchsorted(gs, np.arange(query.num_groups + 1), side="left")
    _check_cells(query, policy, np.diff(starts).astype(np.float64)[:, None])
    blocks = [
        stage_block(xs[starts[g] : starts[g + 1]], intervals[g], query)
        for g in range(query.num_groups)
    ]
    return np.concatenate(blocks)
