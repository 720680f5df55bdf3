"""Quantiles by histogram refinement land within the documented accuracy of pandas' 'lower'
quantile, on any data, with filters and groups."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pollinate.analytics import (
    Policy,
    QuantileSearch,
    Query,
    QueryRefused,
    load_tables,
    local_sums,
)
from pollinate.analytics import simulate_query as run
from pollinate.analytics.quantile import parse_stage, rank
from pollinate.errors import ConfigError


@pytest.fixture(scope="module")
def diabetes() -> list[pd.DataFrame]:
    return load_tables("diabetes", 6, "dirichlet", seed=2, partition_by="sex", alpha=0.5)


def lower_quantile(values: pd.Series, q: float, bounds: tuple[float, float]) -> float:
    return float(values.dropna().clip(*bounds).quantile(q, interpolation="lower"))


def assert_within(result: dict, values: pd.Series, query: Query) -> None:
    assert query.bounds is not None
    lo, hi = query.bounds
    accuracy = (hi - lo) / query.sub_bins**query.stages / 2
    assert result["accuracy"] == pytest.approx(accuracy)
    for q in query.quantiles:
        want = lower_quantile(values, q, query.bounds)
        got = result["value"][str(q)]
        assert abs(got - want) <= accuracy * (1 + 1e-6), (q, got, want, accuracy)


@pytest.mark.parametrize(
    ("column", "bounds", "where"),
    [
        ("bmi", (10.0, 50.0), None),
        ("age", (0.0, 100.0), "sex == 2"),
        ("target", (0.0, 400.0), "bmi > 25 and not bp < 80"),
        ("s1", (150.0, 250.0), None),  # some values lie outside the bounds: clipped
    ],
)
def test_matches_pandas_lower_quantile_within_the_accuracy(diabetes, column, bounds, where):
    query = Query("quantile", column, bounds=bounds, where=where, quantiles=(0.05, 0.25, 0.5, 0.9))
    everything = pd.concat(diabetes, ignore_index=True)
    rows = everything.query(where) if where else everything
    result = run(query, diabetes)
    json.dumps(result, allow_nan=False)
    assert result["rows"] == rows[column].notna().sum()
    assert_within(result, rows[column], query)


def test_groups_each_get_their_own_search(diabetes):
    query = Query("quantile", "bmi", bounds=(15, 45), group_by="sex", groups=(2, 1, 7))
    result = run(query, diabetes)
    everything = pd.concat(diabetes, ignore_index=True)
    for g in (1, 2):
        assert_within({"accuracy": result["accuracy"], "value": result["value"][str(g)]},
                      everything.bmi[everything.sex == g], query)  # fmt: skip
    assert result["value"]["7"] is None and "no quantile" in result["reasons"]["7"]
    assert result["rows"]["7"] == 0


@pytest.mark.parametrize(("sub_bins", "stages"), [(2, 20), (4, 6), (16, 4), (100, 2)])
def test_adversarial_data_and_other_search_shapes(sub_bins, stages):
    rng = np.random.default_rng(sub_bins)
    values = np.concatenate(
        [
            np.full(50, 3.0),  # a heavy tie
            rng.exponential(1.0, 200),  # a long tail past the upper bound
            -rng.exponential(1.0, 20),  # below the lower bound
            [np.nan] * 10,
            [np.inf, -np.inf],
        ]
    )
    rng.shuffle(values)
    tables = [pd.DataFrame({"x": part}) for part in np.array_split(values, 7)]
    query = Query(
        "quantile",
        "x",
        bounds=(0.0, 5.0),
        quantiles=(0.01, 0.1, 0.3, 0.5, 0.77, 0.99),
        sub_bins=sub_bins,
        stages=stages,
    )
    assert_within(run(query, tables), pd.Series(values), query)  # ±inf clip to the bounds


def test_the_rank_is_pandas_lower_for_every_size():
    for n in range(1, 200):
        values = pd.Series(np.arange(n, dtype=float))
        for q in (0.01, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99):
            assert rank(q, n) - 1 == values.quantile(q, interpolation="lower")


def test_default_accuracy_is_range_over_131072():
    search = QuantileSearch(Query("quantile", "x", bounds=(-1.0, 3.0)))
    assert search.accuracy == 4.0 / 16**4 / 2 == 4.0 / 131072


def test_the_stage_api_by_hand(diabetes):
    query = Query("quantile", "bp", bounds=(50, 150), quantiles=(0.5,), stages=3)
    search = QuantileSearch(query)
    widths = []
    while not search.done:
        request = json.loads(json.dumps(search.request()))  # what travels to the clients
        assert request["stage"] == len(widths)
        total = sum(local_sums(t, query, Policy(), request) for t in diabetes)
        assert total.shape == (18,)
        search.update(total)
        a, b = search.intervals[0, 0]
        widths.append(b - a)
    assert widths == pytest.approx([100 / 16, 100 / 256, 100 / 4096])
    with pytest.raises(ConfigError, match="all its stages"):
        search.request()
    assert search.answer()["value"]["0.5"] == pytest.approx(search.intervals[0, 0].mean())


def test_answer_before_the_last_stage_is_an_error():
    search = QuantileSearch(Query("quantile", "x", bounds=(0, 1)))
    with pytest.raises(ConfigError, match="0 of its 4 stages"):
        search.answer()


@pytest.mark.parametrize(
    "stage",
    [
        None,
        {"stage": 0},
        {"stage": 9, "intervals": [[[0, 1]]]},
        {"stage": 0, "intervals": [[[0, 1], [0, 1]]]},
        {"stage": 0, "intervals": [[[1, 0]]]},
        {"stage": 0, "intervals": [[[-1, 1]]]},
        {"stage": 0, "intervals": [[["a", 1]]]},
        {"stage": 0, "intervals": [[[0, float("nan")]]]},
    ],
)
def test_clients_check_the_stage_request(stage):
    query = Query("quantile", "x", bounds=(0, 1))
    with pytest.raises(ConfigError):
        parse_stage(query, stage)
    with pytest.raises(ConfigError):
        local_sums(pd.DataFrame({"x": [0.5]}), query, Policy(), stage)


def test_min_group_size_applies_to_the_group_not_the_sub_bins(diabetes):
    table = diabetes[0]
    query = Query("quantile", "bmi", bounds=(10, 50))
    stage = QuantileSearch(query).request()
    assert local_sums(table, query, Policy(min_group_size=len(table)), stage).sum() == len(table)
    with pytest.raises(QueryRefused, match="minimum of"):
        local_sums(table, query, Policy(min_group_size=len(table) + 1), stage)


def test_only_a_quantile_takes_a_stage():
    with pytest.raises(ConfigError, match="takes no stage"):
        local_sums(pd.DataFrame({"x": [0.5]}), Query("count"), None, {"stage": 0})
