"""A federated query: what to compute, over which rows, split by which groups, with what privacy.

A :class:`Query` is a small frozen value. It travels from the server to every client as a JSON
string (``to_json`` / ``from_json``); each client answers with a flat float64 vector of sums
(:func:`pollinate.analytics.local_sums`), the server adds the vectors and turns the total into
the answer (:func:`pollinate.analytics.answer`). Everything is computed from sums, so the
vector must mean the same thing on every client: its length and layout are fixed by the query
alone (:attr:`Query.vector_length`), never by a client's data.

That is why ``group_by`` needs ``groups``: the group values are listed up front, in order, and
every client writes one block per listed group (zeros for a group it does not have). If each
client reported the groups it happens to hold, the vectors would differ in length and layout
and could not be summed, and in particular could not be summed by secure aggregation, which
only ever sees a masked vector of an agreed length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from functools import cached_property
from typing import Any, ClassVar, Union

from pollinate.analytics.filters import Filter, parse
from pollinate.errors import ConfigError

STATISTICS = ("count", "sum", "mean", "var", "std", "cov", "corr", "histogram", "quantile")
#: statistics of one numeric column, with their per-group vector length
_BLOCK = {"count": 1, "sum": 2, "mean": 2, "var": 3, "std": 3, "cov": 6, "corr": 6}
MAX_GROUPS = 1000
MAX_BINS = 10_000
MAX_QUANTILES = 32
MAX_SUB_BINS = 1024
MAX_STAGES = 64
MAX_JSON = 1_000_000
MAX_VECTOR = 1_000_000
#: quantile search defaults: the answer is within (hi - lo) / 16**4 / 2 of the true quantile
SUB_BINS = 16
STAGES = 4

GroupValue = Union[str, int, float, bool]


@dataclasses.dataclass(frozen=True)
class Query:
    """One federated statistic: ``statistic`` of ``column`` over the rows matching ``where``.

    - ``statistic``: count | sum | mean | var | std | cov | corr | histogram | quantile.
      var, std, cov and corr are sample statistics (ddof = 1), as in pandas.
    - ``column``: the column it reads (optional for count: with it, count its non-missing
      values); ``column2`` the second column of cov / corr.
    - ``where``: a filter text (:mod:`pollinate.analytics.filters`); only matching rows count.
    - ``group_by`` and ``groups``: one answer per listed value of a categorical column, in
      order; rows with other values are ignored (see the module docstring for why the values
      are listed up front).
    - ``bins``: the increasing bin edges of a histogram (bins are [e_i, e_i+1), the last one
      closed, as in ``numpy.histogram``; values outside the edges are not counted).
    - ``quantiles`` (default 0.5) and ``bounds`` = (lower, upper) for a quantile search, with
      ``sub_bins`` B and ``stages`` S (:mod:`pollinate.analytics.quantile`).
    - ``bounds`` / ``bounds2``: value bounds of ``column`` / ``column2``. A quantile search
      clips values to them and starts from them; a noised query clips to them before summing.
    - ``noise_multiplier`` z, or a target ``epsilon`` for this query alone (solved for z by a
      :class:`pollinate.analytics.PrivacySession`): Gaussian noise on the summed vector
      (:mod:`pollinate.analytics.dp`). Neither: an exact answer.
    """

    statistic: str
    column: str | None = None
    column2: str | None = None
    name: str = ""
    where: str | None = None
    group_by: str | None = None
    groups: tuple[GroupValue, ...] | None = None
    bins: tuple[float, ...] | None = None
    quantiles: tuple[float, ...] = (0.5,)
    bounds: tuple[float, float] | None = None
    bounds2: tuple[float, float] | None = None
    sub_bins: int = SUB_BINS
    stages: int = STAGES
    noise_multiplier: float | None = None
    epsilon: float | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "name",
        "statistic",
        "column",
        "column2",
        "where",
        "group_by",
        "groups",
        "bins",
        "quantiles",
        "bounds",
        "bounds2",
        "sub_bins",
        "stages",
        "noise_multiplier",
        "epsilon",
    )

    def __post_init__(self) -> None:
        stat = self.statistic
        if stat not in STATISTICS:
            raise self._error("statistic", f"must be one of {' | '.join(STATISTICS)}, got {stat!r}")
        set_ = self._set
        set_("name", _text(self, "name", self.name, optional=True) or _default_name(self))
        needs_column = stat != "count"
        set_("column", _text(self, "column", self.column, optional=not needs_column))
        two = stat in ("cov", "corr")
        set_("column2", _text(self, "column2", self.column2, optional=not two))
        if self.column2 is not None and not two:
            raise self._error("column2", f"is only for cov and corr, not {stat}; remove it")
        where = self.where.strip() if isinstance(self.where, str) else self.where
        set_("where", _text(self, "where", where or None, optional=True))
        if self.where is not None:
            _ = self.filter  # parse now, so a bad filter fails where the query is made
        self._check_groups()
        self._check_bins()
        self._check_quantiles()
        set_("bounds", self._bounds("bounds", self.bounds))
        set_("bounds2", self._bounds("bounds2", self.bounds2))
        if self.bounds2 is not None and not two:
            raise self._error("bounds2", "bounds the second column of cov / corr only; remove it")
        self._check_privacy()
        if self.vector_length > MAX_VECTOR:
            raise self._error(
                "groups",
                f"and bins make a vector of {self.vector_length} numbers per client; the limit "
                f"is {MAX_VECTOR}: ask for fewer groups, bins or quantiles",
            )

    # --- derived -----------------------------------------------------------------------

    @cached_property
    def filter(self) -> Filter | None:
        """The parsed ``where`` filter, or None."""
        return parse(self.where) if self.where is not None else None

    @property
    def columns(self) -> frozenset[str]:
        """Every column the query reads: its column(s), the group column and the filter's."""
        found = {c for c in (self.column, self.column2, self.group_by) if c is not None}
        if self.filter is not None:
            found |= self.filter.columns
        return frozenset(found)

    @property
    def private(self) -> bool:
        """Whether the summed vector is noised (a noise multiplier > 0 or a target ε)."""
        return bool(self.noise_multiplier) or self.epsilon is not None

    @property
    def num_groups(self) -> int:
        """The number of vector blocks: len(groups), or 1 without group_by."""
        return len(self.groups) if self.groups is not None else 1

    @property
    def block_length(self) -> int:
        """The length of one group's block of the vector."""
        if self.statistic == "histogram":
            assert self.bins is not None
            return len(self.bins) - 1
        if self.statistic == "quantile":
            return len(self.quantiles) * (self.sub_bins + 2)
        return _BLOCK[self.statistic]

    @property
    def vector_length(self) -> int:
        """The length of every client's vector (and of the total)."""
        return self.num_groups * self.block_length

    @property
    def mechanisms(self) -> int:
        """How many noised vectors the query releases: ``stages`` for a quantile, else 1."""
        return self.stages if self.statistic == "quantile" else 1

    # --- (de)serialization ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Query:
        """A query from a JSON-like dict (as ``to_dict`` writes it); ConfigError names the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"a query must be a table/dict, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - set(cls.KEYS))
        if unknown:
            raise ConfigError(
                f"query {data.get('name', '')!r}: unknown key(s) {', '.join(unknown)}; "
                f"a query takes {', '.join(cls.KEYS)}"
            )
        if "statistic" not in data:
            raise ConfigError(
                f"query {data.get('name', '')!r}: key 'statistic' is missing; set it to one "
                f"of {' | '.join(STATISTICS)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The query as a JSON-safe dict, without keys that keep their defaults."""
        out: dict[str, Any] = {}
        for key in self.KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if key in ("quantiles", "sub_bins", "stages") and self.statistic != "quantile":
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, text: str | bytes) -> Query:
        """A query from its JSON text; ConfigError when it is not valid JSON or not a query."""
        if len(text) > MAX_JSON:
            raise ConfigError(f"a query's JSON is limited to {MAX_JSON} bytes, got {len(text)}")
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"a query must be a JSON object: {exc}") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        """The query as a JSON string (what travels to the clients)."""
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    # --- validation ----------------------------------------------------------------------

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)

    def _error(self, key: str, problem: str) -> ConfigError:
        label = self.name if isinstance(self.name, str) and self.name else self.statistic
        return ConfigError(f"query {label!r}: key {key!r} {problem}")

    def _check_groups(self) -> None:
        group_by = _text(self, "group_by", self.group_by, optional=True)
        self._set("group_by", group_by)
        if group_by is None:
            if self.groups is not None:
                raise self._error("groups", "needs group_by (the column the groups are values of)")
            return
        if self.groups is None:
            raise self._error(
                "groups",
                f"is missing: list the values of {group_by!r} to report, e.g. groups = "
                "['a', 'b']; they fix the vector layout every client fills in",
            )
        groups = _sequence(self, "groups", self.groups)
        if not groups or len(groups) > MAX_GROUPS:
            raise self._error("groups", f"must list 1 to {MAX_GROUPS} values, got {len(groups)}")
        seen: set[tuple[str, Any]] = set()
        for value in groups:
            ok = isinstance(value, (str, bool)) or _is_real(value) and math.isfinite(value)
            if not ok:
                raise self._error(
                    "groups", f"values must be strings, finite numbers or booleans, got {value!r}"
                )
            tag = (type(value).__name__ if isinstance(value, (str, bool)) else "number", value)
            if tag in seen:
                raise self._error("groups", f"lists {value!r} twice; list each group once")
            seen.add(tag)
        self._set("groups", tuple(groups))

    def _check_bins(self) -> None:
        if self.statistic != "histogram":
            if self.bins is not None:
                raise self._error("bins", f"is only for histograms, not {self.statistic}")
            return
        if self.bins is None:
            raise self._error("bins", "is missing: give the increasing bin edges, e.g. [0, 10, 20]")
        edges = _numbers(self, "bins", self.bins)
        if not 2 <= len(edges) <= MAX_BINS + 1:
            raise self._error("bins", f"needs 2 to {MAX_BINS + 1} edges, got {len(edges)}")
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise self._error("bins", f"edges must strictly increase, got {list(edges)}")
        self._set("bins", edges)

    def _check_quantiles(self) -> None:
        if self.statistic != "quantile":
            default = self.quantiles in ((0.5,), [0.5])
            if not (default and self.sub_bins == SUB_BINS and self.stages == STAGES):
                raise self._error(
                    "quantiles",
                    f"(and sub_bins, stages) are only for quantile, not {self.statistic}",
                )
            return
        qs = _numbers(self, "quantiles", self.quantiles)
        if not 1 <= len(qs) <= MAX_QUANTILES:
            raise self._error("quantiles", f"must list 1 to {MAX_QUANTILES} values")
        if any(not 0 < q < 1 for q in qs) or len(set(qs)) != len(qs):
            raise self._error("quantiles", f"must be distinct numbers in (0, 1), got {list(qs)}")
        self._set("quantiles", qs)
        for key, lo, hi in (("sub_bins", 2, MAX_SUB_BINS), ("stages", 1, MAX_STAGES)):
            value = getattr(self, key)
            if not (_is_int(value) and lo <= value <= hi):
                raise self._error(key, f"must be an integer in [{lo}, {hi}], got {value!r}")
        if self.bounds is None:
            raise self._error(
                "bounds",
                "is missing: a quantile search needs the value range [lower, upper] to search",
            )

    def _bounds(self, key: str, value: Any) -> tuple[float, float] | None:
        if value is None:
            return None
        pair = _numbers(self, key, value)
        if len(pair) != 2 or not pair[0] < pair[1]:
            raise self._error(key, f"must be [lower, upper] with lower < upper, got {value!r}")
        return (pair[0], pair[1])

    def _check_privacy(self) -> None:
        z, eps = self.noise_multiplier, self.epsilon
        if z is not None:
            if not (_is_real(z) and math.isfinite(z) and z >= 0):
                raise self._error("noise_multiplier", f"must be a number >= 0, got {z!r}")
            self._set("noise_multiplier", float(z))
        if eps is not None:
            if not (_is_real(eps) and math.isfinite(eps) and eps > 0):
                raise self._error("epsilon", f"must be a number > 0, got {eps!r}")
            if z is not None:
                raise self._error(
                    "epsilon", "and noise_multiplier are two ways to set the noise; give one"
                )
            self._set("epsilon", float(eps))
        if not self.private or self.statistic in ("count", "histogram", "quantile"):
            return
        if self.bounds is None:
            raise self._error(
                "bounds",
                f"is missing: a noised {self.statistic} clips {self.column!r} to [lower, upper] "
                "so that one row's effect, and so the noise, is bounded",
            )
        if self.column2 is not None and self.bounds2 is None:
            raise self._error(
                "bounds2",
                f"is missing: a noised {self.statistic} also clips {self.column2!r} to "
                "[lower, upper]",
            )


def _default_name(query: Query) -> str:
    args = ", ".join(c for c in (query.column, query.column2) if isinstance(c, str))
    return f"{query.statistic}({args})"


def _text(query: Query, key: str, value: Any, *, optional: bool) -> str | None:
    if value is None or value == "" and key == "name":
        if optional:
            return None
        raise query._error(key, f"is missing: {query.statistic} needs it")
    if not isinstance(value, str) or not value:
        raise query._error(key, f"must be a non-empty string, got {value!r}")
    return value


def _sequence(query: Query, key: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise query._error(key, f"must be a list, got {value!r}")
    return tuple(value)


def _numbers(query: Query, key: str, value: Any) -> tuple[float, ...]:
    items = _sequence(query, key, value)
    if len(items) > MAX_BINS + 1:
        raise query._error(key, f"is too long ({len(items)} values)")
    if not all(_is_real(v) and math.isfinite(v) for v in items):
        raise query._error(key, f"must hold finite numbers only, got {list(items)!r}")
    return tuple(float(v) for v in items)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
