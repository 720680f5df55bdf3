"""A run config's ``[data]`` section turned into clients' data: load, partition, check.

``federated_from_config(cfg.data, seed)`` is all ``pollinate run`` needs; the pieces are
public for scripts: :func:`dataset_from_config`, :func:`partitioner_from_config` and
:func:`check_client_test_sets`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from pollinate.data.datasets import Dataset, load_dataset
from pollinate.data.federated import FederatedDataset
from pollinate.data.partition import Partitioner, make_partitioner
from pollinate.errors import ConfigError

if TYPE_CHECKING:
    from pollinate.config import DataSection

log = logging.getLogger("pollinate")

#: which [data] keys each built-in partition takes
PARTITION_PARAMS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("alpha", "min_size"),
    "shards": ("shards_per_client",),
    "quantity": ("alpha", "min_size"),
    "pathological": ("classes_per_client",),
    "inner_dirichlet": ("alpha",),
    "linear": (),
    "square": (),
    "exponential": (),
    "natural": (),
}


def federated_from_config(data: DataSection, seed: int) -> FederatedDataset:
    """Load ``[data]``'s data set, split it among its clients, and warn about client test
    sets too small for federated evaluation."""
    dataset = dataset_from_config(data)
    fed = FederatedDataset.build(
        dataset,
        partitioner_from_config(data, dataset),
        data.num_clients,
        data.client_test_fraction,
        seed,
    )
    check_client_test_sets(fed)
    return fed


def dataset_from_config(data: DataSection) -> Dataset:
    """``[data]``'s data set (``label_column``, ``feature_columns``, ``test_fraction`` and
    ``partition_by`` reach Hugging Face sources)."""
    return load_dataset(
        data.dataset,
        label_column=data.label_column or None,
        feature_columns=data.feature_columns or None,
        test_fraction=data.test_fraction,
        keep=(data.partition_by,) if data.partition_by else (),
    )


def partitioner_from_config(data: DataSection, dataset: Dataset | None = None) -> Partitioner:
    """``[data]``'s partitioner. ``partition = "natural"`` reads the ``partition_by`` column of
    ``dataset``, which it then needs."""
    name = data.partition
    if ":" in name:
        return make_partitioner(name)
    if data.partition_by and name != "natural":
        raise ConfigError(
            f"data.partition_by = {data.partition_by!r} is for partition = 'natural' (one "
            f"client per value of that column); drop it for partition = {name!r}"
        )
    if name == "natural":
        return _natural(data, dataset)
    if name not in PARTITION_PARAMS:
        return make_partitioner(name)  # its error lists the partitions
    params: dict[str, Any] = {key: getattr(data, key) for key in PARTITION_PARAMS[name]}
    if name == "quantity":
        params["min_size"] = max(1, data.min_size)
    return make_partitioner(name, **params)


def _natural(data: DataSection, dataset: Dataset | None) -> Partitioner:
    column = data.partition_by
    if not column:
        raise ConfigError(
            "partition = 'natural' needs data.partition_by: the column whose values are the "
            "clients (e.g. partition_by = 'writer_id')"
        )
    if dataset is None:
        raise ConfigError("partition = 'natural' needs the data set to read its column from")
    if column not in dataset.columns:
        kept = ", ".join(dataset.columns) or "none"
        raise ConfigError(
            f"data.partition_by = {column!r} is not a column of {dataset.name!r} (its columns "
            f"besides inputs and labels: {kept}). Columns come from Hugging Face sources (hf:, "
            f"hf-disk:) and from npz files as an array '{column}_train'"
        )
    return make_partitioner("natural", groups=dataset.columns[column], column=column)


def check_client_test_sets(fed: FederatedDataset) -> None:
    """Warn when clients hold no test examples: their federated evaluation fails (it is
    counted as a failure), and with too few clients left the round reports no federated
    metrics. The warning names the numbers and the fix."""
    fraction = fed.test_fraction
    if fraction == 0:
        return
    sizes = fed.partition.sizes()
    tests = np.array([fed.num_test_examples(i) for i in range(fed.num_clients)])
    empty = int((tests == 0).sum())
    if empty == 0:
        return
    need = _smallest_size_with_a_test_example(fraction)
    most = max(1, int(sizes.sum()) // need)
    smallest, largest = int(sizes[tests == 0].min()), int(sizes[tests == 0].max())
    lead = (
        "federated evaluation is off"
        if empty == fed.num_clients
        else "federated evaluation fails on some clients"
    )
    fraction_fix = (
        f" or raise data.client_test_fraction above {0.5 / smallest:.2g}" if smallest >= 2 else ""
    )
    log.warning(
        "%s: %d of %d clients hold no test examples. A client of n examples holds out "
        "round(n × %g) of them, 0 for n < %d, and these clients hold %s examples. Fix: "
        "fewer clients (data.num_clients; an even split of %d examples allows at most %d)%s",
        lead,
        empty,
        fed.num_clients,
        fraction,
        need,
        str(smallest) if smallest == largest else f"{smallest} to {largest}",
        int(sizes.sum()),
        most,
        fraction_fix,
    )


def _smallest_size_with_a_test_example(fraction: float) -> int:
    """The smallest n with round(n · fraction) >= 1 (halves round to even, as FederatedDataset)."""
    n = max(1, math.ceil(0.5 / fraction))
    while np.rint(n * fraction) < 1:
        n += 1
    return n
