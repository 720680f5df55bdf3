"""Client tables: the diabetes data split iid or non-iid, and CSV / Parquet folders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pollinate.analytics import Query, demo_tables, load_tables, simulate_query
from pollinate.errors import ConfigError, DataError

COLUMNS = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6", "target"]


def sorted_rows(table: pd.DataFrame) -> np.ndarray:
    values = table.to_numpy()
    return values[np.lexsort(values.T[::-1])]


@pytest.fixture(scope="module")
def whole() -> pd.DataFrame:
    (table,) = load_tables("diabetes", 1)
    return table


def test_diabetes_is_the_unscaled_data(whole):
    assert list(whole.columns) == COLUMNS and len(whole) == 442
    assert set(whole.sex.unique()) == {1.0, 2.0} and whole.age.between(19, 79).all()


@pytest.mark.parametrize("clients", [1, 3, 10])
def test_iid_split_covers_every_row_once(whole, clients):
    tables = load_tables("diabetes", clients, "iid", seed=4)
    assert len(tables) == clients
    sizes = [len(t) for t in tables]
    assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(sorted_rows(pd.concat(tables)), sorted_rows(whole))
    again = load_tables("diabetes", clients, "iid", seed=4)
    assert all(a.equals(b) for a, b in zip(tables, again))  # seeded


@pytest.mark.parametrize("clients", [2, 8, 20])
def test_dirichlet_on_a_column_gives_the_requested_clients(whole, clients):
    tables = load_tables("diabetes", clients, "dirichlet", 0, partition_by="sex", alpha=0.3)
    assert len(tables) == clients and all(len(t) >= 2 for t in tables)
    np.testing.assert_array_equal(sorted_rows(pd.concat(tables)), sorted_rows(whole))
    shares = [(t.sex == 2).mean() for t in tables]
    assert max(shares) - min(shares) > 0.3  # non-IID


def test_the_demo_is_eight_non_iid_hospitals(whole):
    hospitals = demo_tables()
    assert len(hospitals) == 8
    assert sum(len(h) for h in hospitals) == 442
    result = simulate_query(Query("mean", "bmi", group_by="sex", groups=(1, 2)), hospitals)
    want = whole.groupby("sex").bmi.mean()
    assert result["value"]["1"] == pytest.approx(want[1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spec": "diabetes", "num_clients": 0}, "num_clients must be >= 1"),
        ({"spec": "diabetes", "num_clients": 2, "partition": "dirichlet"}, "needs partition_by"),
        ({"spec": "diabetes", "num_clients": 2, "partition": "dirichlet", "partition_by": "x"},
         "not a column"),
        ({"spec": "diabetes", "num_clients": 2, "partition_by": "sex"}, "drop it for 'iid'"),
        ({"spec": "diabetes", "num_clients": 2, "partition": "shards"}, "iid | dirichlet"),
        ({"spec": "iris", "num_clients": 2}, "diabetes | csv:GLOB | parquet:PATH"),
        ({"spec": "csv:", "num_clients": 2}, "needs a path"),
    ],
)  # fmt: skip
def test_bad_requests_say_what_to_do(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_tables(**kwargs)


def write_clients(folder, kind: str, tables: list[pd.DataFrame]) -> None:
    folder.mkdir(exist_ok=True)
    for i, table in enumerate(tables):
        path = folder / f"hospital_{i:02d}.{kind}"
        if kind == "csv":
            table.to_csv(path, index=False)
        else:
            table.to_parquet(path, index=False)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_folder_of_files_is_one_client_each_in_sorted_order(tmp_path, kind):
    tables = load_tables("diabetes", 3, "iid", seed=1)
    write_clients(tmp_path / "data", kind, tables[::-1])  # file 00 holds the last table
    for spec in (f"{kind}:{tmp_path / 'data'}", f"{kind}:{tmp_path / 'data'}/hospital_*.{kind}"):
        loaded = load_tables(spec, num_clients=3 if kind == "csv" else None)
        assert len(loaded) == 3
        for got, want in zip(loaded, tables[::-1]):
            pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert len(load_tables(f"{kind}:{tmp_path / 'data'}", 0)) == 3


def test_csv_strings_and_missing_values_survive(tmp_path):
    a = pd.DataFrame({"city": ["Oslo", None], "x": [1.5, np.nan]})
    b = pd.DataFrame({"x": [2.5, 3.0], "city": ["Lima", "it's, quoted"]})  # other column order
    write_clients(tmp_path, "csv", [a, b])
    loaded = load_tables(f"csv:{tmp_path}")
    assert list(loaded[1].columns) == ["city", "x"]
    result = simulate_query(Query("sum", "x", where="city != 'Oslo'"), loaded)
    assert result["value"] == 5.5 and result["rows"] == 2


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_file_errors_are_clear(tmp_path, kind):
    with pytest.raises(DataError, match="no .* files match"):
        load_tables(f"{kind}:{tmp_path / 'missing'}")
    good = pd.DataFrame({"a": [1, 2], "b": [3, 4]})
    write_clients(tmp_path / "one", kind, [good, good])
    with pytest.raises(DataError, match="matches 2 files but num_clients = 3"):
        load_tables(f"{kind}:{tmp_path / 'one'}", 3)
    with pytest.raises(ConfigError, match="already one file per client"):
        load_tables(f"{kind}:{tmp_path / 'one'}", partition="iid")
    write_clients(tmp_path / "mixed", kind, [good, good.rename(columns={"b": "c"})])
    with pytest.raises(DataError, match=r"lacks \['b'\] and adds \['c'\]"):
        load_tables(f"{kind}:{tmp_path / 'mixed'}")
    broken = tmp_path / "broken"
    write_clients(broken, kind, [good])
    (broken / f"z.{kind}").write_bytes(b"\x00\xff\x00 not a table \xfe" * 10 if kind == "csv"
                                       else b"PAR1 garbage")  # fmt: skip
    with pytest.raises(DataError, match=f"cannot read .*z.{kind}"):
        load_tables(f"{kind}:{broken}")
