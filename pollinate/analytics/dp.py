"""Differentially private answers: the Gaussian mechanism on the summed vector, and ε.

Adjacency is *add or remove one row* (one person's record in one client's table), not one
client: a hospital's whole table is many rows.

The scheme. A row adds a vector f(row) to its group's block of the total, and nothing to the
other blocks (a row belongs to one group; a filtered-out row adds nothing). With values
clipped to the bounds [lo, hi] (M = max(|lo|, |hi|)), every coordinate j of f has a known
largest size sⱼ (:func:`coordinate_scales`):

============  =====================================  ==============================
statistic     f(row)                                 s (coordinate scales)
============  =====================================  ==============================
count         [1]                                    [1]
sum, mean     [1, x]                                 [1, M]
var, std      [1, x, x²]                             [1, M, M²]
cov, corr     [1, x, y, x², y², xy]                  [1, Mx, My, Mx², My², Mx·My]
histogram     one-hot over the bins (or 0)           [1, …, 1]
quantile      per q: one-hot over (below, B, above)  [1, …, 1]
============  =====================================  ==============================

Scale each coordinate by 1/sⱼ: the scaled vector's L2 sensitivity Δ (:func:`sensitivity`) is
sup ‖f(row)/s‖₂, which is 1 for count and histogram (one row changes one cell), sqrt(2) for
sum and mean, sqrt(3) for var and std, sqrt(6) for cov and corr (each reached at a bound),
and sqrt(len(quantiles)) for a quantile stage (one cell per q). group_by does not increase
it. Adding N(0, (zΔ)²) to every scaled coordinate, i.e. N(0, (z·Δ·sⱼ)²) to coordinate j of
the total (:func:`noise_std`, :func:`add_noise`), is the Gaussian mechanism with noise
multiplier z on a vector of sensitivity Δ: ``dp_accounting.GaussianDpEvent(z)``. Scaling is
invertible, so the unscaled release is post-processing of it. Compared with one noise scale
for the whole vector, the counts get noise of size z·Δ instead of z·Δ·M².

A query is one such event, a quantile search S of them (``SelfComposedDpEvent``; the stages
are adaptive, which Rényi and PLD composition allow). :class:`PrivacySession` composes the
events of the queries answered so far with ``dp_accounting`` (RDP, Mironov 2017; or PLD,
Koskela et al. 2020) and refuses a query, before any client is asked, when ε would pass
``max_epsilon`` at the session's δ.

What DP does not cover: a refusal (``min_group_size``, a missing column) is data-dependent
and not noised; the noise is drawn on the server, which sees the exact total (central DP:
it protects the released answers, not the rows from the server); NumPy's generator is not a
cryptographic one and floating-point Gaussians leak low-order bits (Mironov 2012), which
matters against an adversary who sees the raw noised floats.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pollinate.analytics.query import Query
from pollinate.errors import ConfigError
from pollinate.privacy.accounting import (
    ACCOUNTANTS,
    PLD_DISCRETIZATION,
    PrivacyError,
    _quiet_absl,
    find_noise_multiplier,
    load_dp_accounting,
)


class QueryBudgetExceeded(PrivacyError):
    """Answering the query would take ε past the session's ``max_epsilon``; it was not run."""

    def __init__(self, message: str, query: str, epsilon: float, next_epsilon: float):
        super().__init__(message)
        self.query = query  # the name of the query that was refused
        self.epsilon = epsilon  # ε spent by the queries before it
        self.next_epsilon = next_epsilon  # ε it would have reached


def coordinate_scales(query: Query) -> np.ndarray:
    """The largest change one row makes to each coordinate of a block (see the table above)."""
    stat = query.statistic
    if stat in ("histogram", "quantile", "count"):
        return np.ones(query.block_length)
    m = _magnitude(query, query.bounds, query.column)
    if stat in ("sum", "mean"):
        return np.array([1.0, m])
    if stat in ("var", "std"):
        return np.array([1.0, m, m * m])
    m2 = _magnitude(query, query.bounds2, query.column2)
    return np.array([1.0, m, m2, m * m, m2 * m2, m * m2])


def sensitivity(query: Query) -> float:
    """The L2 sensitivity of the scaled vector (total / scales) to adding or removing a row."""
    stat = query.statistic
    if stat in ("count", "histogram"):
        return 1.0
    if stat == "quantile":
        return math.sqrt(len(query.quantiles))
    return math.sqrt(len(coordinate_scales(query)))


def noise_std(query: Query, noise_multiplier: float) -> np.ndarray:
    """The standard deviation of the noise on every coordinate of the total: z·Δ·sⱼ."""
    block = noise_multiplier * sensitivity(query) * coordinate_scales(query)
    return np.tile(block, query.num_groups)


def add_noise(
    query: Query,
    total: np.ndarray,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``total`` plus Gaussian noise of :func:`noise_std` (a new array; 0: unchanged copy)."""
    total = np.array(total, dtype=np.float64)
    if total.shape != (query.vector_length,):
        raise ConfigError(
            f"query {query.name!r} expects a vector of length {query.vector_length}, got "
            f"shape {total.shape}"
        )
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if noise_multiplier == 0:
        return total
    rng = rng if rng is not None else np.random.default_rng()
    return total + rng.normal(size=total.shape) * noise_std(query, noise_multiplier)


def _magnitude(query: Query, bounds: tuple[float, float] | None, column: str | None) -> float:
    if bounds is None:
        raise ConfigError(
            f"query {query.name!r}: a noised {query.statistic} needs bounds for {column!r} "
            "(values are clipped to them, which bounds one row's effect)"
        )
    return max(abs(bounds[0]), abs(bounds[1]))


class PrivacySession:
    """The ε of the queries answered so far, and a budget that refuses the next one.

    ``PrivacySession(max_epsilon=1.0, delta=1e-6, accountant="rdp")``; then, per query and
    before asking any client, ``session.charge(query)`` (raises :class:`QueryBudgetExceeded`
    and records nothing when ε would exceed ``max_epsilon``; else records the query's events
    and returns ε spent so far) and ``session.noise_multiplier(query)`` for the noise.
    ``check`` / ``would_spend`` ask without recording. ``epsilon`` is ε spent so far,
    ``ledger`` one entry per query. A query without noise has infinite ε: only a session
    with ``max_epsilon = inf`` takes it.

    The noise multiplier is the query's ``noise_multiplier``, or, for a query with a target
    ``epsilon``, the smallest z whose ``mechanisms`` Gaussian events alone reach at most that
    ε at the session's δ (:func:`pollinate.privacy.find_noise_multiplier`, sampling rate 1).
    """

    def __init__(self, max_epsilon: float, delta: float, accountant: str = "rdp") -> None:
        if not (max_epsilon > 0):
            raise ConfigError(f"max_epsilon must be > 0, got {max_epsilon}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}"
            )
        self.max_epsilon = float(max_epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.events: list[Any] = []
        self.ledger: list[dict[str, Any]] = []
        self.epsilon = 0.0
        self._solved: dict[tuple[float, int], float] = {}

    def noise_multiplier(self, query: Query) -> float:
        """The noise multiplier ``query`` is answered with (0 for a query without noise)."""
        if query.epsilon is None:
            return query.noise_multiplier or 0.0
        key = (query.epsilon, query.mechanisms)
        if key not in self._solved:
            self._solved[key] = find_noise_multiplier(
                query.epsilon,
                self.delta,
                query.mechanisms,
                sampling_probability=1.0,
                accountant=self.accountant,
            )
        return self._solved[key]

    def event(self, query: Query) -> Any:
        """The query as a ``dp_accounting`` event (one Gaussian event per mechanism)."""
        dp = load_dp_accounting()
        z = self.noise_multiplier(query)
        if z == 0:
            return dp.NonPrivateDpEvent()
        gaussian = dp.GaussianDpEvent(z)
        return (
            gaussian
            if query.mechanisms == 1
            else dp.SelfComposedDpEvent(gaussian, query.mechanisms)
        )

    def epsilon_of(self, events: list[Any]) -> float:
        """ε at the session's δ of these events composed (inf if one is not private)."""
        dp = load_dp_accounting()
        if any(isinstance(e, dp.NonPrivateDpEvent) for e in events):
            return math.inf
        if not events:
            return 0.0
        relation = dp.NeighboringRelation.ADD_OR_REMOVE_ONE
        if self.accountant == "pld":
            accountant = dp.pld.PLDAccountant(
                relation, value_discretization_interval=PLD_DISCRETIZATION
            )
        else:
            accountant = dp.rdp.RdpAccountant(neighboring_relation=relation)
        with _quiet_absl():
            accountant.compose(dp.ComposedDpEvent(list(events)))
            return float(accountant.get_epsilon(self.delta))

    def would_spend(self, query: Query) -> float:
        """ε after the queries so far and ``query``."""
        return self.epsilon_of([*self.events, self.event(query)])

    def check(self, query: Query) -> float:
        """ε after ``query``; raises :class:`QueryBudgetExceeded` when it passes the budget."""
        after = self.would_spend(query)
        if after <= self.max_epsilon:
            return after
        if math.isinf(after):
            fix = "give it a noise_multiplier or a target epsilon (and bounds)"
        else:
            fix = "raise its noise_multiplier, lower its epsilon, or raise max_epsilon"
        raise QueryBudgetExceeded(
            f"query {query.name!r} refused: it would take ε from {self.epsilon:.4g} to "
            f"{after:.4g} at δ = {self.delta:g}, past max_epsilon = {self.max_epsilon:g}; "
            f"{fix}. No client was asked.",
            query.name,
            self.epsilon,
            after,
        )

    def charge(self, query: Query) -> float:
        """Check ``query`` against the budget, record it, and return ε spent after it."""
        self.epsilon = self.check(query)
        self.events.append(self.event(query))
        z = self.noise_multiplier(query)
        self.ledger.append(
            {
                "query": query.name,
                "noise_multiplier": z,
                "mechanisms": query.mechanisms,
                "epsilon": self.epsilon,
            }
        )
        return self.epsilon

    def describe(self) -> dict[str, Any]:
        """The session as a JSON-safe dict, for a report."""
        return {
            "max_epsilon": self.max_epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon": self.epsilon,
            "neighbouring": "add_or_remove_one_row",
            "queries": list(self.ledger),
        }
