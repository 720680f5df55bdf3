"""Every statistic, split across clients and summed, equals pandas on the union of the tables;
and a data holder's policy refuses what it should, with a reason."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from pollinate.analytics import (
    Policy,
    Query,
    QueryRefused,
    answer,
    group_key,
    load_tables,
    local_sums,
    simulate_query,
    split_table,
)
from pollinate.errors import ConfigError, PollinateError

Mask = Callable[[pd.DataFrame], pd.Series]


@pytest.fixture(scope="module")
def diabetes() -> list[pd.DataFrame]:
    return load_tables("diabetes", 5, "dirichlet", seed=1, partition_by="sex", alpha=0.3)


def make_synthetic(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10, 0.8, n)
    income[rng.random(n) < 0.15] = np.nan
    score = rng.normal(0, 1, n)
    score[rng.random(n) < 0.1] = np.nan
    city = rng.choice(np.array(["Oslo", "Lima", "Pune", "it's"], dtype=object), n)
    city[rng.random(n) < 0.1] = None
    return pd.DataFrame(
        {
            "city": city,
            "income": income,
            "score": score,
            "age": rng.integers(18, 90, n),
            "smoker": rng.random(n) < 0.3,
        }
    )


@pytest.fixture(scope="module")
def synthetic() -> list[pd.DataFrame]:
    return split_table(make_synthetic(), 4, "iid", seed=3)


def union(tables: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(tables, ignore_index=True)


def reference(stat: str, rows: pd.DataFrame, column: str | None, column2: str | None) -> float:
    if stat == "count":
        return float(len(rows) if column is None else rows[column].notna().sum())
    x = rows[column]
    if stat in ("cov", "corr"):
        return float(getattr(x, stat)(rows[column2]))
    return float(getattr(x, stat)())


def reference_rows(stat: str, rows: pd.DataFrame, column: str | None, column2: str | None) -> int:
    if column is None:
        return len(rows)
    present = rows[column].notna()
    if column2 is not None:
        present &= rows[column2].notna()
    return int(present.sum())


def assert_matches(got: object, want: float) -> None:
    if math.isnan(want):
        assert got is None
    else:
        assert got is not None
        assert math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-9), (got, want)  # type: ignore[arg-type]


DIABETES_FILTERS: list[tuple[str | None, Mask]] = [
    (None, lambda t: pd.Series(True, index=t.index)),
    ("age > 50 and sex == 2", lambda t: (t.age > 50) & (t.sex == 2)),
    ("not (bmi < 25 or bp >= 100)", lambda t: ~((t.bmi < 25) | (t.bp >= 100))),
]
SYNTHETIC_FILTERS: list[tuple[str | None, Mask]] = [
    (None, lambda t: pd.Series(True, index=t.index)),
    ("city in ('Oslo', 'it\\'s') and income > 15000", lambda t: t.city.isin(["Oslo", "it's"])
     & (t.income > 15000)),
    ("not (score > 0) or smoker == true", lambda t: (t.score <= 0) | t.smoker),
]  # fmt: skip
CASES = [
    ("count", None, None),
    ("count", "bmi", None),
    ("sum", "bmi", None),
    ("mean", "s5", None),
    ("var", "bmi", None),
    ("std", "target", None),
    ("cov", "bmi", "target"),
    ("corr", "bp", "s1"),
]
SYNTHETIC_CASES = [
    ("count", None, None),
    ("count", "score", None),
    ("sum", "income", None),
    ("mean", "income", None),
    ("var", "score", None),
    ("std", "age", None),
    ("cov", "income", "score"),
    ("corr", "score", "age"),
]


def check_against_pandas(
    tables: list[pd.DataFrame],
    stat: str,
    column: str | None,
    column2: str | None,
    where: str | None,
    mask: Mask,
    group_by: str | None,
    groups: tuple | None,
) -> None:
    query = Query(stat, column, column2, where=where, group_by=group_by, groups=groups)
    result = simulate_query(query, tables)
    json.dumps(result, allow_nan=False)  # JSON-safe
    everything = union(tables)
    rows = everything[mask(everything).fillna(False).astype(bool)]
    if groups is None:
        assert_matches(result["value"], reference(stat, rows, column, column2))
        assert result["rows"] == reference_rows(stat, rows, column, column2)
        return
    assert result["groups"] == list(groups)
    for g in groups:
        sub = rows[rows[group_by] == g]
        want = reference(stat, sub, column, column2)
        assert_matches(result["value"][group_key(g)], want)
        assert result["rows"][group_key(g)] == reference_rows(stat, sub, column, column2)
        if math.isnan(want):
            assert result["reasons"][group_key(g)]


@pytest.mark.parametrize(("stat", "column", "column2"), CASES)
@pytest.mark.parametrize(("where", "mask"), DIABETES_FILTERS)
@pytest.mark.parametrize("grouped", [False, True])
def test_diabetes_matches_pandas(diabetes, stat, column, column2, where, mask, grouped):
    groups = (1, 2.0, 3) if grouped else None  # sex is 1.0 / 2.0; 3 is an empty group
    group_by = "sex" if grouped else None
    check_against_pandas(diabetes, stat, column, column2, where, mask, group_by, groups)


@pytest.mark.parametrize(("stat", "column", "column2"), SYNTHETIC_CASES)
@pytest.mark.parametrize(("where", "mask"), SYNTHETIC_FILTERS)
@pytest.mark.parametrize("grouped", [False, True])
def test_strings_and_missing_values_match_pandas(
    synthetic, stat, column, column2, where, mask, grouped
):
    groups = ("Oslo", "Lima", "it's", "Nowhere") if grouped else None
    group_by = "city" if grouped else None
    check_against_pandas(synthetic, stat, column, column2, where, mask, group_by, groups)


@pytest.mark.parametrize("grouped", [False, True])
def test_histogram_matches_numpy(diabetes, grouped):
    bins = (20.0, 30.0, 45.5, 60.0, 79.0)  # 79 is the largest age: the last bin is closed
    query = Query(
        "histogram",
        "age",
        where="bmi > 22",
        bins=bins,
        group_by="sex" if grouped else None,
        groups=(1, 2) if grouped else None,
    )
    result = simulate_query(query, diabetes)
    rows = union(diabetes).query("bmi > 22")
    assert rows.age.max() == 79 and rows.age.min() < 20  # some values lie outside the edges
    if not grouped:
        want, _ = np.histogram(rows.age, bins=bins)
        assert result["value"] == {"counts": want.tolist(), "edges": list(bins)}
        assert result["rows"] == want.sum()
        return
    for g in (1, 2):
        want, _ = np.histogram(rows.age[rows.sex == g], bins=bins)
        assert result["value"][str(g)]["counts"] == want.tolist()


def test_histogram_ignores_missing_values(synthetic):
    result = simulate_query(Query("histogram", "score", bins=(-10, 0, 10)), synthetic)
    score = union(synthetic).score
    assert result["value"]["counts"] == [int((score < 0).sum()), int((score >= 0).sum())]


def test_vectors_add_up_to_the_vector_of_the_union(synthetic):
    query = Query("cov", "income", "score", where="age < 60", group_by="city", groups=("Lima",))
    parts = sum(local_sums(t, query) for t in synthetic)
    whole = local_sums(union(synthetic), query)
    assert whole.dtype == np.float64 and whole.shape == (query.vector_length,)
    np.testing.assert_allclose(parts, whole, rtol=1e-12)
    assert parts[0] == int(parts[0])  # counts are exact


def test_empty_cells_give_none_with_a_reason_not_a_crash(synthetic):
    nobody = "age > 200"
    for stat, column, column2 in SYNTHETIC_CASES:
        result = simulate_query(Query(stat, column, column2, where=nobody), synthetic)
        assert result["rows"] == 0
        if stat in ("count", "sum"):  # an empty count or sum is 0, as in pandas
            assert result["value"] == 0 and "reason" not in result
        else:
            assert result["value"] is None and "needs at least" in result["reason"]
    one = [pd.DataFrame({"x": [1.5]}), pd.DataFrame({"x": [np.nan]})]
    for stat in ("var", "std", "cov"):
        result = simulate_query(Query(stat, "x", "x" if stat == "cov" else None), one)
        assert result["rows"] == 1 and result["value"] is None
        assert result["reason"] == f"the count is 1; {stat} needs at least 2 rows"
    assert simulate_query(Query("mean", "x"), one)["value"] == 1.5
    constant = simulate_query(Query("corr", "age", "score", where="age == 30"), synthetic)
    assert constant["value"] is None and "constant" in constant["reason"]


def test_answer_checks_the_vector_length():
    with pytest.raises(ConfigError, match="length 2"):
        answer(Query("mean", "x"), np.zeros(3))
    with pytest.raises(ConfigError, match="QuantileSearch"):
        answer(Query("quantile", "x", bounds=(0, 1)), np.zeros(18))


# --- refusals -------------------------------------------------------------------------------


def refusal(table: pd.DataFrame, query: Query, policy: Policy) -> str:
    with pytest.raises(QueryRefused) as info:
        local_sums(table, query, policy)
    assert isinstance(info.value, PollinateError)
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_unexposed_columns_are_refused_wherever_they_are_read(synthetic):
    policy = Policy(exposed=frozenset({"age", "city"}))
    table = synthetic[0]
    assert local_sums(table, Query("mean", "age", where="city == 'Oslo'"), policy).shape == (2,)
    for query in (
        Query("mean", "income"),
        Query("mean", "age", where="income > 1"),
        Query("count", group_by="smoker", groups=(True,)),
        Query("corr", "age", "score"),
    ):
        reason = refusal(table, query, policy)
        assert "does not expose column" in reason
        assert "age, city" in reason  # what may be queried instead


def test_a_hidden_missing_column_is_reported_as_hidden(synthetic):
    reason = refusal(synthetic[0], Query("mean", "salary"), Policy(exposed=frozenset({"age"})))
    assert "does not expose column 'salary'" in reason  # not whether the table has it


def test_unknown_and_non_numeric_columns_are_refused(synthetic):
    table = synthetic[0]
    assert "no column 'height'" in refusal(table, Query("mean", "height"), Policy())
    reason = refusal(table, Query("sum", "city"), Policy())
    assert "holds strings, not numbers" in reason and "sum needs a numeric column" in reason
    reason = refusal(table, Query("count", group_by="city", groups=(1,)), Policy())
    assert "list groups of the column's kind" in reason
    # counting a string column's non-missing values needs no numbers
    assert local_sums(table, Query("count", "city"), Policy())[0] == table.city.notna().sum()


def test_small_cells_are_refused_and_named(synthetic):
    table = synthetic[0]
    counts = table.city.value_counts()
    small = int(counts.min())
    policy = Policy(min_group_size=small + 1)
    query = Query("mean", "age", group_by="city", groups=(counts.idxmin(), "Nowhere"))
    reason = refusal(table, query, policy)
    assert f"city = {counts.idxmin()!r}" in reason and f"minimum of {small + 1}" in reason
    assert str(small) + " rows" not in reason  # the exact count is not revealed
    # nor a bound on it: the reason is the same whatever the count below the minimum
    for words in ("fewer than", "more than", "none", "at least", f" {small} "):
        assert words not in reason.replace(f"minimum of {small + 1}", ""), words
    other = refusal(table, query, Policy(min_group_size=small + 7))
    assert other.replace(str(small + 7), "N") == reason.replace(str(small + 1), "N")
    # the empty group alone is fine: it adds nothing
    fine = local_sums(table, Query("mean", "age", group_by="city", groups=("Nowhere",)), policy)
    assert fine.tolist() == [0.0, 0.0]


def test_small_histogram_bins_are_refused_and_named(diabetes):
    table = diabetes[0]
    policy = Policy(min_group_size=3)
    oldest = float(table.age.max())
    query = Query("histogram", "age", bins=(0.0, oldest - 0.5, oldest))
    if (table.age > oldest - 0.5).sum() >= 3:
        pytest.skip("the oldest age is too common in this client")
    assert f"bin [{oldest - 0.5:g}, {oldest:g}]" in refusal(table, query, policy)
    wide = Query("histogram", "age", bins=(0.0, 200.0, 300.0))  # an empty bin is fine
    assert local_sums(table, wide, policy)[1] == 0


def test_simulate_query_names_the_refusing_client(synthetic):
    policies = [Policy(), Policy(), Policy(exposed=frozenset({"age"})), Policy()]
    with pytest.raises(QueryRefused) as info:
        simulate_query(Query("mean", "income"), synthetic, policy=policies)
    assert info.value.client_id == 2 and str(info.value).startswith("client 2 refused")


def test_a_filter_of_the_wrong_kind_is_a_config_error(synthetic):
    with pytest.raises(ConfigError, match="holds strings"):
        local_sums(synthetic[0], Query("count", where="city > 3"))


def test_policy_validates():
    with pytest.raises(ConfigError, match="min_group_size"):
        Policy(min_group_size=0)
    with pytest.raises(ConfigError, match="exposed"):
        Policy(exposed="age")  # type: ignore[arg-type]
    assert Policy(exposed={"a"}).exposed == frozenset({"a"})  # type: ignore[arg-type]
