"""Answer a query over in-process client tables: the whole protocol in one function.

The reference for a server-side runner, and what tests and notebooks use. In order:

1. with a :class:`PrivacySession`, charge the query (refused before any client is asked
   when it would pass the budget) and take its noise multiplier;
2. send the query (and, for a quantile, each stage request) to every client:
   :func:`local_sums` on its table under its :class:`Policy`;
3. add the vectors (what secure aggregation would do without showing them to the server);
4. noise the total (:func:`add_noise`) when the query is private;
5. turn the total into the answer (:func:`answer`, or :class:`QuantileSearch` per stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.analytics.combine import answer
from pollinate.analytics.dp import PrivacySession, add_noise
from pollinate.analytics.local import Policy, QueryRefused, local_sums
from pollinate.analytics.quantile import QuantileSearch
from pollinate.analytics.query import Query
from pollinate.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd


def simulate_query(
    query: Query,
    tables: Sequence[pd.DataFrame],
    *,
    policy: Policy | Sequence[Policy] | None = None,
    session: PrivacySession | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """The answer of ``query`` over ``tables`` (one per client), as the server would give it.

    ``policy`` is one policy for every client or one per client. A private query needs a
    ``session`` when it sets a target ``epsilon`` (the session knows δ); with a session, the
    answer also carries ``epsilon``, the session's ε after this query.
    """
    policies = _policies(policy, len(tables))
    if not tables:
        raise ConfigError("simulate_query needs at least one client table")
    z = query.noise_multiplier or 0.0
    if session is not None:  # 1. charge first: a refused query asks no client
        session.charge(query)
        z = session.noise_multiplier(query)
    elif query.epsilon is not None:
        raise ConfigError(
            f"query {query.name!r} sets a target epsilon: pass a PrivacySession (it holds δ "
            "and the budget), or give a noise_multiplier instead"
        )
    rng = rng if rng is not None else np.random.default_rng()

    def round_trip(stage: dict[str, Any] | None) -> np.ndarray:
        total = np.zeros(query.vector_length)
        for client_id, (table, client_policy) in enumerate(zip(tables, policies)):
            try:  # 2.-3. every client's vector, added up
                total += local_sums(table, query, client_policy, stage)
            except QueryRefused as refused:
                raise QueryRefused(refused.reason, client_id=client_id) from None
        return add_noise(query, total, z, rng)  # 4.

    if query.statistic == "quantile":  # 5.
        search = QuantileSearch(query, noise_multiplier=z)
        while not search.done:
            search.update(round_trip(search.request()))
        result = search.answer()
    else:
        result = answer(query, round_trip(None), noise_multiplier=z)
    if session is not None:
        result["epsilon"] = session.epsilon
    return result


def _policies(policy: Policy | Sequence[Policy] | None, clients: int) -> list[Policy]:
    if policy is None or isinstance(policy, Policy):
        return [policy or Policy()] * clients
    policies = list(policy)
    if len(policies) != clients:
        raise ConfigError(
            f"got {len(policies)} policies for {clients} client tables; give one each"
        )
    return policies
