"""Query: validation that names the key, a JSON round trip, and a layout fixed by the query."""

from __future__ import annotations

import json

import pytest

from pollinate.analytics import STATISTICS, FilterError, Query
from pollinate.errors import ConfigError

EXAMPLES = [
    {"statistic": "count"},
    {"statistic": "count", "column": "bmi", "where": "age > 50"},
    {"name": "s", "statistic": "sum", "column": "bmi", "group_by": "sex", "groups": [1, 2]},
    {"statistic": "mean", "column": "bmi", "bounds": [10, 50], "noise_multiplier": 1.5},
    {"statistic": "var", "column": "bmi", "groups": ["a", True, 2.5], "group_by": "g"},
    {"statistic": "std", "column": "bmi", "epsilon": 1.0, "bounds": [0, 60]},
    {"statistic": "cov", "column": "bmi", "column2": "bp"},
    {"statistic": "corr", "column": "bmi", "column2": "bp", "bounds": [0, 1], "bounds2": [0, 2],
     "noise_multiplier": 2.0},
    {"statistic": "histogram", "column": "age", "bins": [0, 30, 60.5, 90]},
    {"statistic": "quantile", "column": "age", "bounds": [0, 100], "quantiles": [0.1, 0.9],
     "sub_bins": 8, "stages": 3, "where": "sex == 2"},
]  # fmt: skip


@pytest.mark.parametrize("data", EXAMPLES)
def test_json_round_trip(data):
    query = Query.from_dict(data)
    text = query.to_json()
    assert Query.from_json(text) == query
    assert Query.from_dict(json.loads(text)) == query
    assert json.loads(text)["statistic"] == data["statistic"]


def test_statistics_cover_the_brief():
    assert set(STATISTICS) == {s["statistic"] for s in EXAMPLES}


@pytest.mark.parametrize(
    ("query", "length"),
    [
        (Query("count"), 1),
        (Query("mean", "x", group_by="g", groups=("a", "b", "c")), 6),
        (Query("var", "x"), 3),
        (Query("corr", "x", "y", group_by="g", groups=(1, 2)), 12),
        (Query("histogram", "x", bins=(0, 1, 2, 3)), 3),
        (Query("quantile", "x", bounds=(0, 1), quantiles=(0.1, 0.5), group_by="g", groups=(1,)),
         2 * 18),
    ],
)  # fmt: skip
def test_vector_length_is_fixed_by_the_query(query, length):
    assert query.vector_length == length


def test_columns_lists_everything_the_query_reads():
    q = Query("corr", "bmi", "bp", where="age > 50 or city in ('x')", group_by="sex", groups=(1,))
    assert q.columns == {"bmi", "bp", "age", "city", "sex"}
    assert Query("count").columns == frozenset()


def test_defaults_name_and_privacy():
    assert Query("mean", "bmi").name == "mean(bmi)"
    assert not Query("mean", "bmi").private
    assert not Query("mean", "bmi", noise_multiplier=0.0).private
    assert Query("count", noise_multiplier=1.0).private
    assert Query("quantile", "x", bounds=(0, 1)).mechanisms == 4
    assert Query("count", where="  ").where is None


@pytest.mark.parametrize(
    ("data", "key", "hint"),
    [
        ({"statistic": "mean", "column": "x", "colour": 1}, "colour", "takes name, statistic"),
        ({"column": "x"}, "statistic", "is missing"),
        ({"statistic": "median", "column": "x"}, "statistic", "count | sum"),
        ({"statistic": "mean"}, "column", "is missing"),
        ({"statistic": "mean", "column": 3}, "column", "non-empty string"),
        ({"statistic": "mean", "column": "x", "column2": "y"}, "column2", "only for cov"),
        ({"statistic": "corr", "column": "x"}, "column2", "is missing"),
        ({"statistic": "mean", "column": "x", "group_by": "g"}, "groups", "list the values"),
        ({"statistic": "mean", "column": "x", "groups": [1]}, "groups", "needs group_by"),
        ({"statistic": "mean", "column": "x", "group_by": "g", "groups": []}, "groups", "1 to"),
        ({"statistic": "mean", "column": "x", "group_by": "g", "groups": [1, 1]}, "groups",
         "twice"),
        ({"statistic": "mean", "column": "x", "group_by": "g", "groups": [None]}, "groups",
         "strings, finite numbers"),
        ({"statistic": "mean", "column": "x", "group_by": "g", "groups": "ab"}, "groups",
         "must be a list"),
        ({"statistic": "histogram", "column": "x"}, "bins", "is missing"),
        ({"statistic": "histogram", "column": "x", "bins": [0, 2, 1]}, "bins", "increase"),
        ({"statistic": "histogram", "column": "x", "bins": [0]}, "bins", "2 to"),
        ({"statistic": "histogram", "column": "x", "bins": [0, "a"]}, "bins", "finite numbers"),
        ({"statistic": "histogram", "column": "x", "bins": [0, float("inf")]}, "bins", "finite"),
        ({"statistic": "mean", "column": "x", "bins": [0, 1]}, "bins", "only for histograms"),
        ({"statistic": "quantile", "column": "x"}, "bounds", "value range"),
        ({"statistic": "quantile", "column": "x", "bounds": [1, 0]}, "bounds", "lower < upper"),
        ({"statistic": "quantile", "column": "x", "bounds": [0, 1], "quantiles": [0.5, 1]},
         "quantiles", "in (0, 1)"),
        ({"statistic": "quantile", "column": "x", "bounds": [0, 1], "sub_bins": 1}, "sub_bins",
         "[2, 1024]"),
        ({"statistic": "quantile", "column": "x", "bounds": [0, 1], "stages": 0}, "stages",
         "[1, 64]"),
        ({"statistic": "mean", "column": "x", "quantiles": [0.2]}, "quantiles", "only for"),
        ({"statistic": "sum", "column": "x", "noise_multiplier": 1.0}, "bounds", "clips 'x'"),
        ({"statistic": "cov", "column": "x", "column2": "y", "bounds": [0, 1], "epsilon": 1.0},
         "bounds2", "clips 'y'"),
        ({"statistic": "count", "noise_multiplier": -1}, "noise_multiplier", ">= 0"),
        ({"statistic": "count", "epsilon": 0}, "epsilon", "> 0"),
        ({"statistic": "count", "epsilon": 1, "noise_multiplier": 1}, "epsilon", "give one"),
        ({"statistic": "histogram", "column": "x", "bins": list(range(2000)), "group_by": "g",
          "groups": list(range(1000))}, "groups", "limit"),
    ],
)  # fmt: skip
def test_validation_names_the_key(data, key, hint):
    with pytest.raises(ConfigError) as info:
        Query.from_dict(data)
    message = str(info.value)
    assert repr(key) in message or key in message, message
    assert hint in message, message


def test_a_bad_filter_fails_when_the_query_is_made():
    with pytest.raises(FilterError, match="position"):
        Query.from_dict({"statistic": "count", "where": "__import__('os').system('rm')"})


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"statistic": "count"' + " " * 2_000_000])
def test_from_json_rejects_what_is_not_a_query(text):
    with pytest.raises(ConfigError):
        Query.from_json(text)
