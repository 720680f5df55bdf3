"""Federated analytics over real clients: queries as ``query`` tasks through any executor.

The server side of :mod:`pollinate.analytics`, the same protocol as
:func:`pollinate.analytics.simulate_query` but over an executor (a simulation backend or
connected gRPC clients), with refusals and failures recorded instead of fatal:

1. a private query (with a noise multiplier or a target ε) is charged to the
   :class:`PrivacySession` before any client is asked (over the budget: the query is
   refused and recorded, the next one is tried). A query without noise is answered exactly
   and is outside the DP guarantee (its record says ``"private": false``), unless
   ``require_dp`` refuses it;
2. every client gets a ``query`` task (the query as JSON, and for a quantile the stage
   request) and answers with its local sums, or refuses (its reason is recorded);
3. the answering clients' vectors are added, in the clear or through SecAgg+
   (:class:`pollinate.privacy.SecureAggregation`: the server then sees only the total,
   and a client that refuses or fails mid-protocol is a dropout the protocol recovers from);
4. the total is noised when the query is private, and turned into the answer.

The answer is over the clients that answered: ``answered`` and ``refused`` say who.

On the client, :class:`TableClient` answers queries from one table under its data holder's
:class:`Policy`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.analytics.combine import answer
from pollinate.analytics.dp import PrivacySession, QueryBudgetExceeded, add_noise
from pollinate.analytics.local import Policy, local_groups, local_sums
from pollinate.analytics.quantile import QuantileSearch
from pollinate.analytics.query import Query
from pollinate.errors import PollinateError
from pollinate.types import Arrays, ClientId, Config, Outcome, QueryIns, QueryRes

if TYPE_CHECKING:
    import pandas as pd

    from pollinate.privacy.secure import SecureAggregation

log = logging.getLogger("pollinate")

QUERY = "query"  # task config: the query, JSON
STAGE = "query_stage"  # task config: a quantile stage request, JSON
DISCOVER = "query_discover_groups"  # task config: the column whose values to report
GROUPS = "groups"  # result metric: the values found, JSON


class TableClient:
    """A data holder answering federated queries from one table, under its ``Policy``.

    Only the local sums leave it (``QueryRes.arrays``); a query the policy does not allow
    raises ``QueryRefused``, whose reason reaches the server. The row count it reports is
    0: the rows an answer rests on are in the sums (and hidden by secure aggregation).
    """

    def __init__(self, table: pd.DataFrame, policy: Policy | None = None) -> None:
        self.table = table
        self.policy = policy or Policy()

    def query(self, arrays: Arrays, config: Config) -> QueryRes:
        column = config.get(DISCOVER)
        if isinstance(column, str):  # which values of a group_by column this holder has
            values = local_groups(self.table, column, self.policy)
            return QueryRes([np.zeros(0)], 0, {GROUPS: json.dumps(values)})
        text = config.get(QUERY)
        if not isinstance(text, str):
            raise ValueError(f"the task config has no {QUERY!r}: this is not a query task")
        query = Query.from_json(text)
        stage_text = config.get(STAGE)
        stage = json.loads(stage_text) if isinstance(stage_text, str) else None
        sums = local_sums(self.table, query, self.policy, stage)
        return QueryRes([sums], 0, {})


@dataclass(frozen=True)
class TableClientFn:
    """A picklable ``client_fn``: client ``i`` answers from ``tables[i]`` under ``policy``
    (``tables``: a list, or a dict from client id to table)."""

    tables: Sequence[Any] | Mapping[int, Any]
    policy: Policy | None = None

    def __call__(self, context: Any) -> TableClient:
        return TableClient(self.tables[context.client_id], self.policy)


Observe = Callable[[Iterable[Outcome], int], Iterator[Outcome]]


def _passthrough(outcomes: Iterable[Outcome], total: int) -> Iterator[Outcome]:
    yield from outcomes


class QueryRunner:
    """Answers queries over the clients an executor reaches (see the module docstring).

    ``secure``: sum through SecAgg+; ``session``: DP budget; ``timeout_s``: each exchange's
    deadline. ``run(query, clients)`` returns the JSON-safe answer record.
    """

    def __init__(
        self,
        executor: Any,
        *,
        secure: SecureAggregation | None = None,
        session: PrivacySession | None = None,
        require_dp: bool = False,
        timeout_s: float = 120.0,
        seed: int | None = None,
    ) -> None:
        self.executor = executor
        self.secure = secure
        self.session = session
        self.require_dp = require_dp
        self.timeout_s = timeout_s
        self.rng = np.random.default_rng(seed)
        self.exchanges = 0  # every exchange gets its own number (task ids, SecAgg tags)

    def run(
        self, query: Query, clients: Sequence[ClientId], observe: Observe = _passthrough
    ) -> dict[str, Any]:
        """The answer record of ``query`` over ``clients`` (refusals recorded, not raised)."""
        z = 0.0
        if query.private:
            if self.session is None:
                why = "a private query needs a privacy session (the [privacy] section)"
                return refused_record(query, why, None)
            try:  # 1. charged before any client is asked
                self.session.charge(query)
            except QueryBudgetExceeded as exc:
                log.warning("%s", exc)
                return refused_record(query, f"privacy budget: {exc}", self.session)
            z = self.session.noise_multiplier(query)
        elif self.require_dp:
            why = (
                "privacy.require_dp is on and this query has no noise: give it a "
                "noise_multiplier or a target epsilon (and bounds)"
            )
            return refused_record(query, why, self.session)
        answered: set[ClientId] = set()
        refused: dict[str, str] = {}

        def exchange(stage: dict[str, Any] | None) -> np.ndarray:
            config: Config = {QUERY: query.to_json()}
            if stage is not None:
                config[STAGE] = json.dumps(stage)
            total, ok, failed = self._exchange(query, clients, config, observe)
            answered.update(ok)
            refused.update({str(cid): why for cid, why in failed.items()})
            if not ok:
                raise PollinateError(
                    f"no client answered ({len(failed)} refused or failed: see 'refused')"
                )
            if self.secure is not None and z == 0:
                total = round_counts(query, total)  # SecAgg sums are exact up to quantization
            return add_noise(query, total, z, self.rng)

        try:
            if query.statistic == "quantile":
                search = QuantileSearch(query, noise_multiplier=z)
                while not search.done:
                    search.update(exchange(search.request()))
                record = search.answer()
            else:
                record = answer(query, exchange(None), noise_multiplier=z)
        except PollinateError as exc:
            log.warning("%s", exc)
            record = refused_record(query, str(exc), self.session)
        record["answered"] = sorted(answered - {int(c) for c in refused})
        record["refused"] = refused
        record["secure_aggregation"] = self.secure is not None
        record["private"] = query.private
        if self.session is not None and query.private:
            record["epsilon"] = self.session.epsilon  # the session's ε after this query
            record["delta"] = self.session.delta
        return record

    def discover_groups(
        self, query: Query, clients: Sequence[ClientId]
    ) -> tuple[Query, dict[str, str]]:
        """``query`` with its ``groups`` set to every value of its ``group_by`` column that
        some client holds (with at least its ``min_group_size`` rows), asked in the clear
        before the query itself; and the clients that refused, with their reasons."""
        assert query.group_by is not None
        if self.require_dp:
            raise PollinateError(
                f"privacy.require_dp is on: list the groups of {query.group_by!r} in the query "
                "(asking the clients for them is not differentially private)"
            )
        self.exchanges += 1
        plan = [(cid, QueryIns([], {DISCOVER: query.group_by})) for cid in clients]
        found: set[Any] = set()
        refused: dict[str, str] = {}
        for o in self.executor.submit(self.exchanges, "query", plan, self.timeout_s):
            text = o.result.metrics.get(GROUPS) if isinstance(o.result, QueryRes) else None
            try:
                values = json.loads(text) if isinstance(text, str) else None
            except ValueError:
                values = None
            if o.error is not None or not isinstance(values, list):
                refused[str(o.client_id)] = _reason(o.error or "no list of group values")
                continue
            if not all(isinstance(v, (str, int, float, bool)) for v in values):
                refused[str(o.client_id)] = "group values must be strings, numbers or booleans"
                continue
            found.update(values)
        if not found:
            raise PollinateError(
                f"no client reported a value of {query.group_by!r} to group by "
                f"({len(refused)} refused or failed)"
            )
        groups = sorted(found, key=lambda v: (type(v).__name__, v))
        return Query.from_dict({**query.to_dict(), "groups": groups}), refused

    def _exchange(
        self, query: Query, clients: Sequence[ClientId], config: Config, observe: Observe
    ) -> tuple[np.ndarray, list[ClientId], dict[ClientId, str]]:
        """One round trip: (the total, who answered, who refused or failed and why)."""
        self.exchanges += 1
        plan = [(cid, QueryIns([], config)) for cid in clients]
        failed: dict[ClientId, str] = {}
        if self.secure is not None:
            total, outcomes, failures = self.secure.aggregate(
                self.exchanges, "query", plan, self.executor, self.timeout_s, observe
            )
            for f in failures:
                failed[f.client_id] = _reason(f.reason)
            return total, [o.client_id for o in outcomes], failed
        total = np.zeros(query.vector_length)
        ok: list[ClientId] = []
        outcomes = self.executor.submit(self.exchanges, "query", plan, self.timeout_s)
        for o in observe(outcomes, len(plan)):
            why = _check(o, query)
            if why is not None:
                failed[o.client_id] = why
                continue
            assert isinstance(o.result, QueryRes)
            total += o.result.arrays[0]
            ok.append(o.client_id)
        return total, ok, failed


def _reason(error: str) -> str:
    """A client's refusal as the record shows it (without the exception's class name)."""
    for prefix in ("QueryRefused: ", "FilterError: "):
        if prefix in error:
            return error.split(prefix, 1)[1]
    return error


def _check(o: Outcome, query: Query) -> str | None:
    """Why an outcome's vector cannot be added (None when it can)."""
    if o.error is not None:
        return _reason(o.error)
    res = o.result
    if not isinstance(res, QueryRes) or len(res.arrays) != 1:
        return "the answer is not one vector of local sums"
    vector = res.arrays[0]
    if vector.shape != (query.vector_length,) or vector.dtype.kind not in "fiu":
        return f"the answer has shape {vector.shape}, expected ({query.vector_length},)"
    if not np.isfinite(vector).all():
        return "the answer holds NaN or infinite values"
    return None


def round_counts(query: Query, total: np.ndarray) -> np.ndarray:
    """``total`` with its count coordinates rounded to whole numbers (they are counts of
    rows; secure aggregation returns them up to its quantization error)."""
    out = np.array(total, dtype=np.float64)
    if query.statistic in ("histogram", "quantile"):
        return np.rint(out)
    blocks = out.reshape(query.num_groups, query.block_length)
    blocks[:, 0] = np.rint(blocks[:, 0])
    return out


def refused_record(query: Query, reason: str, session: PrivacySession | None) -> dict[str, Any]:
    """The record of a query answered by nobody, and why."""
    record: dict[str, Any] = {"query": query.name, "statistic": query.statistic}
    record.update(value=None, rows=None, reason=reason, answered=[], refused={})
    record["private"] = query.private
    if session is not None:
        record["epsilon"] = session.epsilon
    return record
