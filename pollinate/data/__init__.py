"""Data sets and their split among simulated clients (NumPy only: no torch, no ray)."""

from pollinate.data.datasets import Dataset, IdxSource, download_idx, load_dataset, read_idx
from pollinate.data.federated import FederatedDataset
from pollinate.data.partition import (
    IID,
    Dirichlet,
    Partition,
    Partitioner,
    Quantity,
    Shards,
    make_partitioner,
)

__all__ = [
    "Dataset",
    "Dirichlet",
    "FederatedDataset",
    "IID",
    "IdxSource",
    "Partition",
    "Partitioner",
    "Quantity",
    "Shards",
    "download_idx",
    "load_dataset",
    "make_partitioner",
    "read_idx",
]
