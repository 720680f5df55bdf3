"""DP: the noise has the stated standard deviation, the stated sensitivity bounds the layout,
and the session's ε is dp_accounting's and refuses the query that would pass the budget."""

from __future__ import annotations

import json
import math

import dp_accounting as dp
import numpy as np
import pandas as pd
import pytest

from pollinate.analytics import (
    PrivacySession,
    QuantileSearch,
    Query,
    QueryBudgetExceeded,
    add_noise,
    coordinate_scales,
    load_tables,
    local_sums,
    noise_std,
    sensitivity,
    simulate_query,
)
from pollinate.analytics import simulate as simulate_module
from pollinate.errors import ConfigError
from pollinate.privacy import PrivacyError

PRIVATE = [
    Query("count", noise_multiplier=1.0),
    Query("count", "x", noise_multiplier=1.0),
    Query("sum", "x", bounds=(-2, 3), noise_multiplier=1.0),
    Query("mean", "x", bounds=(1, 5), noise_multiplier=1.0),
    Query("var", "x", bounds=(-4, 3), noise_multiplier=1.0),
    Query("std", "x", bounds=(0, 2), noise_multiplier=1.0),
    Query("cov", "x", "y", bounds=(-2, 3), bounds2=(0, 7), noise_multiplier=1.0),
    Query("corr", "x", "y", bounds=(1, 2), bounds2=(-1, 1), noise_multiplier=1.0),
    Query("histogram", "x", bins=(-1, 0, 2, 4), noise_multiplier=1.0),
    Query("quantile", "x", bounds=(-1, 4), quantiles=(0.2, 0.5, 0.9), noise_multiplier=1.0),
]


@pytest.mark.parametrize("query", PRIVATE, ids=lambda q: q.name)
def test_sensitivity_bounds_what_one_row_adds(query):
    """Brute force over single rows, inside and outside the bounds: ‖f(row) / s‖ <= Δ, with
    equality somewhere, for the layout local_sums really writes (with one group of three)."""
    grouped = Query.from_dict({**query.to_dict(), "group_by": "g", "groups": ["a", "b", "c"]})
    stage = QuantileSearch(grouped).request() if query.statistic == "quantile" else None
    scales = np.tile(coordinate_scales(query), 3)
    grid = np.linspace(-8, 8, 33)
    largest = 0.0
    for x in grid:
        for y in grid[::4]:
            row = pd.DataFrame({"x": [x], "y": [y], "g": ["b"]})
            scaled = local_sums(row, grouped, None, stage) / scales
            largest = max(largest, float(np.linalg.norm(scaled)))
    assert largest <= sensitivity(query) * (1 + 1e-12)
    assert largest == pytest.approx(sensitivity(query))


def test_stated_sensitivities():
    assert [round(sensitivity(q) ** 2) for q in PRIVATE] == [1, 1, 2, 2, 3, 3, 6, 6, 1, 3]
    np.testing.assert_array_equal(coordinate_scales(PRIVATE[4]), [1, 4, 16])
    np.testing.assert_array_equal(coordinate_scales(PRIVATE[6]), [1, 3, 7, 9, 49, 21])


@pytest.mark.parametrize("query", [PRIVATE[4], PRIVATE[6], PRIVATE[8]], ids=lambda q: q.name)
def test_the_noise_has_the_stated_std(query):
    grouped = Query.from_dict({**query.to_dict(), "group_by": "g", "groups": [1, 2]})
    z = 0.7
    stated = noise_std(grouped, z)
    want = z * sensitivity(query) * np.tile(coordinate_scales(query), 2)
    np.testing.assert_allclose(stated, want)
    rng = np.random.default_rng(1234)
    total = np.arange(grouped.vector_length, dtype=float)
    draws = np.array([add_noise(grouped, total, z, rng) for _ in range(4000)]) - total
    # the sample std of 4000 normal draws is within 5% of the truth far beyond 4 sigma (1.1%)
    np.testing.assert_allclose(draws.std(axis=0), stated, rtol=0.05)
    assert np.all(np.abs(draws.mean(axis=0)) < 4 * stated / math.sqrt(4000))
    corr = np.corrcoef(draws.T)
    assert np.all(np.abs(corr[~np.eye(len(stated), dtype=bool)]) < 0.1)  # independent


def test_zero_noise_changes_nothing_and_bad_input_is_refused():
    query = PRIVATE[2]
    total = np.array([3.0, 4.0])
    np.testing.assert_array_equal(add_noise(query, total, 0.0), total)
    with pytest.raises(ConfigError, match="length 2"):
        add_noise(query, np.zeros(3), 1.0)
    with pytest.raises(ConfigError, match=">= 0"):
        add_noise(query, total, -1.0)


def test_noised_queries_clip_to_the_bounds():
    table = pd.DataFrame({"x": [-10.0, 0.5, 10.0, np.nan], "y": [1.0, 1.0, 9.0, 2.0]})
    exact = Query("sum", "x", bounds=(-1, 2))
    noised = Query("sum", "x", bounds=(-1, 2), noise_multiplier=1.0)
    assert local_sums(table, exact).tolist() == [3, 0.5]  # exact: bounds are not applied
    assert local_sums(table, noised).tolist() == [3, 1.5]  # -1 + 0.5 + 2
    cov = Query("cov", "x", "y", bounds=(-1, 2), bounds2=(0, 5), noise_multiplier=1.0)
    np.testing.assert_allclose(local_sums(table, cov), [3, 1.5, 7, 5.25, 27, 9.5])


@pytest.fixture(scope="module")
def diabetes() -> list[pd.DataFrame]:
    return load_tables("diabetes", 4, "iid", seed=0)


def test_a_noised_answer_is_close_and_json_safe(diabetes):
    query = Query("mean", "bmi", bounds=(10, 50), noise_multiplier=0.5, group_by="sex",
                  groups=(1, 2))  # fmt: skip
    result = simulate_query(query, diabetes, rng=np.random.default_rng(0))
    json.dumps(result, allow_nan=False)
    assert result["dp"]["noise_multiplier"] == 0.5
    assert result["dp"]["noise_std"] == pytest.approx([0.5 * math.sqrt(2), 0.5 * math.sqrt(2) * 50])
    bmi = pd.concat(diabetes).groupby("sex").bmi.mean()
    for g in (1, 2):
        assert abs(result["value"][str(g)] - bmi[g]) < 1.0


def test_noised_counts_and_quantiles_are_post_processed(diabetes):
    rng = np.random.default_rng(5)
    hist = simulate_query(Query("histogram", "age", bins=(0, 10, 100), noise_multiplier=3.0),
                          diabetes, rng=rng)  # fmt: skip
    assert all(c >= 0 for c in hist["value"]["counts"])  # the empty bin is clamped at 0
    q = Query("quantile", "bmi", bounds=(10, 50), noise_multiplier=0.5)
    result = simulate_query(q, diabetes, rng=rng)
    exact = pd.concat(diabetes).bmi.quantile(0.5, interpolation="lower")
    assert abs(result["value"]["0.5"] - exact) < 1.0
    assert result["dp"]["noise_std"] == [0.5] * 18


# --- accounting -----------------------------------------------------------------------------


def independent_epsilons(events: list[tuple[float, int]], delta: float, accountant: str):
    """ε after each (noise multiplier, mechanisms) query, straight from dp_accounting."""
    if accountant == "rdp":
        acc = dp.rdp.RdpAccountant()
    else:
        acc = dp.pld.PLDAccountant(
            dp.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3
        )
    out = []
    for z, count in events:
        acc.compose(dp.GaussianDpEvent(z), count)
        out.append(acc.get_epsilon(delta))
    return out


QUERIES = [
    Query("mean", "bmi", bounds=(10, 50), noise_multiplier=3.0),
    Query("quantile", "age", bounds=(0, 100), noise_multiplier=8.0),  # 4 mechanisms
    Query("count", where="sex == 2", noise_multiplier=5.0),
]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_dp_accountings(diabetes, accountant):
    delta = 1e-6
    want = independent_epsilons([(3.0, 1), (8.0, 4), (5.0, 1)], delta, accountant)
    session = PrivacySession(max_epsilon=100.0, delta=delta, accountant=accountant)
    got = []
    for query in QUERIES:
        assert session.would_spend(query) == pytest.approx(session.check(query))
        result = simulate_query(query, diabetes, session=session, rng=np.random.default_rng(0))
        got.append(result["epsilon"])
    assert got == pytest.approx(want, rel=1e-9)
    assert [e["epsilon"] for e in session.ledger] == got
    assert [e["mechanisms"] for e in session.ledger] == [1, 4, 1]
    json.dumps(session.describe(), allow_nan=False)


def test_the_query_past_the_budget_is_refused_before_any_client_is_asked(diabetes, monkeypatch):
    delta = 1e-6
    first, second = independent_epsilons([(3.0, 1), (8.0, 4)], delta, "rdp")
    session = PrivacySession(max_epsilon=(first + second) / 2, delta=delta)
    simulate_query(QUERIES[0], diabetes, session=session)
    assert session.epsilon == pytest.approx(first)

    def no_client(*args, **kwargs):
        raise AssertionError("a client was asked")

    monkeypatch.setattr(simulate_module, "local_sums", no_client)
    with pytest.raises(QueryBudgetExceeded) as info:
        simulate_query(QUERIES[1], diabetes, session=session)
    err = info.value
    assert isinstance(err, PrivacyError)
    assert err.query == QUERIES[1].name and err.epsilon == pytest.approx(first)
    assert err.next_epsilon == pytest.approx(second)
    assert "No client was asked" in str(err) and "raise its noise_multiplier" in str(err)
    assert session.epsilon == pytest.approx(first) and len(session.ledger) == 1  # not recorded


def test_a_query_without_noise_cannot_be_charged(diabetes):
    session = PrivacySession(max_epsilon=10.0, delta=1e-6)
    with pytest.raises(QueryBudgetExceeded, match="give it a noise_multiplier"):
        session.charge(Query("count"))
    assert PrivacySession(math.inf, 1e-6).charge(Query("count")) == math.inf


def test_a_target_epsilon_is_solved_for_the_whole_query(diabetes):
    session = PrivacySession(max_epsilon=5.0, delta=1e-6)
    query = Query("quantile", "bmi", bounds=(10, 50), epsilon=1.0)
    z = session.noise_multiplier(query)
    (alone,) = independent_epsilons([(z, 4)], 1e-6, "rdp")
    assert 0.99 < alone <= 1.0  # just within the target
    result = simulate_query(query, diabetes, session=session, rng=np.random.default_rng(0))
    assert result["epsilon"] == pytest.approx(alone) and result["dp"]["noise_multiplier"] == z
    with pytest.raises(ConfigError, match="pass a PrivacySession"):
        simulate_query(query, diabetes)


def test_session_validates():
    for kwargs in ({"max_epsilon": 0, "delta": 1e-6}, {"max_epsilon": 1, "delta": 1.0},
                   {"max_epsilon": 1, "delta": 1e-6, "accountant": "moments"}):  # fmt: skip
        with pytest.raises(ConfigError):
            PrivacySession(**kwargs)
