"""Data sets and their split among simulated clients (NumPy only: no torch, no ray)."""

from pollinate.data.build import (
    dataset_from_config,
    federated_from_config,
    partitioner_from_config,
)
from pollinate.data.datasets import Dataset, IdxSource, download_idx, load_dataset, read_idx
from pollinate.data.federated import FederatedDataset
from pollinate.data.hf import from_hf
from pollinate.data.natural import FunctionPartitioner, Natural
from pollinate.data.partition import (
    IID,
    Dirichlet,
    Partition,
    Partitioner,
    Quantity,
    Shards,
    make_partitioner,
)
from pollinate.data.skew import Exponential, InnerDirichlet, Linear, Pathological, Square

__all__ = [
    "Dataset",
    "Dirichlet",
    "Exponential",
    "FederatedDataset",
    "FunctionPartitioner",
    "IID",
    "IdxSource",
    "InnerDirichlet",
    "Linear",
    "Natural",
    "Partition",
    "Partitioner",
    "Pathological",
    "Quantity",
    "Shards",
    "Square",
    "dataset_from_config",
    "download_idx",
    "federated_from_config",
    "from_hf",
    "load_dataset",
    "make_partitioner",
    "partitioner_from_config",
    "read_idx",
]
