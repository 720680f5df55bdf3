"""Federated analytics: statistics over all clients' tables, computed from sums.

The server sends a :class:`Query` to the clients (as JSON); each client computes
:func:`local_sums`, a flat float64 vector of sums over its own table, under its data holder's
:class:`Policy`; the server adds the vectors (in the clear or through secure aggregation) and
:func:`answer` turns the total into the answer. Quantiles take several such round trips
(:class:`QuantileSearch`). Differential privacy adds Gaussian noise to the total
(:func:`add_noise`) and a :class:`PrivacySession` accounts ε over the queries answered.
:func:`simulate_query` runs the whole protocol over in-process tables; :class:`QueryRunner`
runs it over any executor (simulation backends, connected gRPC clients), with
:class:`TableClient` on the clients; :func:`load_tables` makes client tables. Analytics
configs are :mod:`pollinate.analytics.config`, and the outputs
:mod:`pollinate.analytics.session`; ``pollinate analyze`` is
``pollinate.experiment.run_analytics``, ``pollinate server`` on an analytics config
``pollinate.deploy.serve_analytics``.

Errors, all under ``PollinateError``::

    ConfigError
    └── FilterError          a where-filter that does not parse or does not fit the table
    QueryRefused             a data holder's policy or table does not allow the query
    PrivacyError
    └── QueryBudgetExceeded  the query would take ε past the session's max_epsilon

Nothing here imports an ML framework, a backend or a transport; pandas is imported when a
table is first touched (the ``analytics`` extra), scikit-learn only for the diabetes data.
"""

from pollinate.analytics.combine import answer, group_key
from pollinate.analytics.dp import (
    PrivacySession,
    QueryBudgetExceeded,
    add_noise,
    coordinate_scales,
    noise_std,
    sensitivity,
)
from pollinate.analytics.filters import Filter, FilterError, parse
from pollinate.analytics.local import Policy, QueryRefused, local_sums
from pollinate.analytics.quantile import QuantileSearch
from pollinate.analytics.query import STATISTICS, Query
from pollinate.analytics.runner import QueryRunner, TableClient, TableClientFn
from pollinate.analytics.simulate import simulate_query
from pollinate.analytics.tables import demo_tables, load_tables, split_table

__all__ = [
    "Filter",
    "FilterError",
    "Policy",
    "PrivacySession",
    "QuantileSearch",
    "Query",
    "QueryBudgetExceeded",
    "QueryRefused",
    "QueryRunner",
    "STATISTICS",
    "TableClient",
    "TableClientFn",
    "add_noise",
    "answer",
    "coordinate_scales",
    "demo_tables",
    "group_key",
    "load_tables",
    "local_sums",
    "noise_std",
    "parse",
    "sensitivity",
    "simulate_query",
    "split_table",
]
