"""Client tables for federated analytics: a bundled data set split among clients, or files.

``load_tables(spec, ...)`` returns one pandas DataFrame per client:

- ``"diabetes"``: scikit-learn's diabetes data (442 patients, unscaled: age, sex, bmi, bp,
  s1 … s6, target; bundled, no download), split by ``partition``: ``"iid"`` (uniform) or
  ``"dirichlet"`` (label skew on the codes of column ``partition_by`` with concentration
  ``alpha``, :class:`pollinate.data.Dirichlet`).
- ``"csv:GLOB"``: one CSV file (with a header row) per client, in sorted path order; a folder
  means every ``*.csv`` in it.
- ``"parquet:PATH"``: a folder of ``.parquet`` files, or a glob; one file per client, sorted.

Files are already one table per client: ``num_clients`` must then be None, 0 or their number,
and ``partition`` is not taken. Every client's table must have the same columns.

The demo, :func:`demo_tables`: the diabetes data across 8 "hospitals", non-IID (Dirichlet
skew on sex, alpha = 0.5).
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.analytics.filters import load_pandas
from pollinate.data.partition import make_partitioner
from pollinate.errors import ConfigError, DataError, missing_dependency

if TYPE_CHECKING:
    import pandas as pd

DATASETS = ("diabetes",)
PARTITIONS = ("iid", "dirichlet")
_FORMS = "diabetes | csv:GLOB | parquet:PATH"


def load_tables(
    spec: str,
    num_clients: int | None = None,
    partition: str | None = None,
    seed: int = 0,
    partition_by: str | None = None,
    alpha: float = 0.5,
) -> list[pd.DataFrame]:
    """One DataFrame per client, from ``spec`` (see the module docstring)."""
    if not isinstance(spec, str):
        raise ConfigError(f"a table spec must be a string ({_FORMS}), got {spec!r}")
    kind, _, where = spec.partition(":")
    if kind in ("csv", "parquet"):
        if partition is not None or partition_by is not None:
            raise ConfigError(
                f"{spec!r} is already one file per client: drop partition / partition_by "
                "(they split a single table, such as diabetes)"
            )
        return _files(kind, where, num_clients)
    if spec not in DATASETS:
        raise ConfigError(f"unknown table spec {spec!r}; use one of: {_FORMS}")
    table = _diabetes()
    return split_table(table, num_clients, partition or "iid", seed, partition_by, alpha)


def demo_tables(seed: int = 0) -> list[pd.DataFrame]:
    """The diabetes data across 8 hospitals, non-IID: Dirichlet(0.5) skew on ``sex``."""
    return load_tables("diabetes", 8, "dirichlet", seed, partition_by="sex", alpha=0.5)


def split_table(
    table: pd.DataFrame,
    num_clients: int | None,
    partition: str = "iid",
    seed: int = 0,
    partition_by: str | None = None,
    alpha: float = 0.5,
) -> list[pd.DataFrame]:
    """Split one table's rows among ``num_clients`` clients (iid, or dirichlet on a column)."""
    if num_clients is None or num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1 to split one table, got {num_clients!r}")
    pd = load_pandas()
    if partition == "iid":
        if partition_by is not None:
            raise ConfigError("partition_by is for partition = 'dirichlet'; drop it for 'iid'")
        partitioner = make_partitioner("iid")
        labels = np.zeros(len(table), dtype=np.int64)
    elif partition == "dirichlet":
        if partition_by is None:
            raise ConfigError(
                "partition = 'dirichlet' needs partition_by: the column whose values are "
                "skewed across clients (e.g. 'sex')"
            )
        if partition_by not in table.columns:
            raise ConfigError(
                f"partition_by = {partition_by!r} is not a column; columns are "
                f"{', '.join(map(str, table.columns))}"
            )
        partitioner = make_partitioner("dirichlet", alpha=alpha)
        labels = pd.factorize(table[partition_by])[0]  # missing values: their own class
    else:
        raise ConfigError(f"unknown partition {partition!r}; use one of: {' | '.join(PARTITIONS)}")
    split = partitioner.partition(labels, num_clients, np.random.default_rng(seed))
    return [
        table.iloc[np.sort(split.indices(i))].reset_index(drop=True) for i in range(num_clients)
    ]


def _diabetes() -> pd.DataFrame:
    try:
        from sklearn.datasets import load_diabetes
    except ImportError:
        raise missing_dependency("scikit-learn", "data") from None
    frame: pd.DataFrame = load_diabetes(scaled=False, as_frame=True).frame
    return frame


def _files(kind: str, where: str, num_clients: int | None) -> list[pd.DataFrame]:
    if not where:
        raise ConfigError(f"{kind}: needs a path or glob after the colon, e.g. {kind}:data/")
    pattern = os.path.join(where, f"*.{kind}") if os.path.isdir(where) else where
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise DataError(f"no {kind} files match {pattern!r}; check the path (one file per client)")
    if num_clients not in (None, 0) and num_clients != len(paths):
        raise DataError(
            f"{pattern!r} matches {len(paths)} files but num_clients = {num_clients}; one file "
            "per client: set num_clients to the file count (or 0 to take them all)"
        )
    tables = [_read(kind, path) for path in paths]
    first = list(tables[0].columns)
    for path, table in zip(paths[1:], tables[1:]):
        if set(table.columns) != set(first) or len(table.columns) != len(first):
            missing = sorted(set(first) - set(table.columns))
            extra = sorted(set(table.columns) - set(first))
            raise DataError(
                f"clients' tables must have the same columns: {path} lacks {missing} and "
                f"adds {extra} compared with {paths[0]}; fix the files"
            )
    return [t[first] for t in tables]


def _read(kind: str, path: str) -> Any:
    pd = load_pandas()
    try:
        if kind == "csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except ImportError:
        raise missing_dependency("pyarrow", "analytics") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read {path} as {kind}: {exc}; check that it is a valid {kind} file"
        ) from None
