"""FederatedDataset: clients' train/test parts are index views of one set of global arrays."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pollinate.data import (
    IID,
    Dataset,
    Dirichlet,
    FederatedDataset,
    Partition,
    Partitioner,
    Quantity,
    Shards,
    load_dataset,
)
from pollinate.errors import ConfigError, DataError


def numbered_dataset(n: int = 200, classes: int = 4, n_test: int = 30) -> Dataset:
    """Row i of x_train is filled with the value i, so every example can be traced back."""
    x = np.repeat(np.arange(n, dtype=np.float32), 4).reshape(n, 1, 2, 2)
    y = np.arange(n, dtype=np.int64) % classes
    x_test = np.zeros((n_test, 1, 2, 2), np.float32)
    y_test = np.arange(n_test, dtype=np.int64) % classes
    return Dataset("numbered", x, y, x_test, y_test, num_classes=classes)


def row_ids(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(np.int64)


@pytest.mark.parametrize("partitioner", [IID(), Dirichlet(0.5), Shards(2), Quantity(1.0)], ids=str)
def test_clients_split_into_train_and_test_parts(partitioner: Partitioner) -> None:
    ds = numbered_dataset()
    fds = FederatedDataset.build(ds, partitioner, num_clients=8, test_fraction=0.2, seed=0)
    assert fds.num_clients == 8 and fds.num_classes == 4
    seen = []
    for cid in range(8):
        (x_tr, y_tr), (x_te, y_te) = fds.client_train(cid), fds.client_test(cid)
        n = fds.partition.size(cid)
        assert len(x_te) == round(n * 0.2) == fds.num_test_examples(cid)
        assert len(x_tr) == n - len(x_te) == fds.num_train_examples(cid) >= 1
        ids = np.concatenate([row_ids(x_tr), row_ids(x_te)])
        np.testing.assert_array_equal(ids, fds.partition.indices(cid))  # train first, then test
        np.testing.assert_array_equal(np.concatenate([y_tr, y_te]), ds.y_train[ids])
        seen.append(ids)
    all_ids = np.concatenate(seen)
    assert len(np.unique(all_ids)) == len(all_ids) == len(ds.y_train)


def test_global_arrays_are_shared_not_copied() -> None:
    ds = numbered_dataset()
    fds = FederatedDataset.build(ds, IID(), num_clients=5, test_fraction=0.1, seed=0)
    assert fds.x_train is ds.x_train and fds.y_train is ds.y_train
    assert fds.server_test()[0] is ds.x_test and fds.server_test()[1] is ds.y_test


def test_zero_test_fraction_gives_empty_client_test_sets() -> None:
    fds = FederatedDataset.build(numbered_dataset(), "iid", 4, test_fraction=0.0, seed=0)
    x, y = fds.client_test(2)
    assert x.shape == (0, 1, 2, 2) and y.shape == (0,)
    assert fds.num_train_examples(2) == 50


def test_test_part_is_rounded_per_client() -> None:
    ds = numbered_dataset(n=103)
    fds = FederatedDataset.build(ds, Quantity(alpha=0.5), 10, test_fraction=0.15, seed=3)
    for cid in range(10):
        n = fds.partition.size(cid)
        assert fds.num_test_examples(cid) == round(n * 0.15)
        assert len(fds.client_test(cid)[0]) == round(n * 0.15)


def test_client_without_training_examples_is_an_error() -> None:
    ds = numbered_dataset(n=20)
    FederatedDataset.build(ds, IID(), num_clients=20, test_fraction=0.4, seed=0)  # round(.4)=0
    with pytest.raises(DataError, match="20 clients .* no training examples"):
        FederatedDataset.build(ds, IID(), num_clients=20, test_fraction=0.6, seed=0)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_invalid_test_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="client_test_fraction must be in"):
        FederatedDataset.build(numbered_dataset(), IID(), 4, test_fraction=fraction, seed=0)


def test_same_seed_same_clients_other_seed_other_clients() -> None:
    ds = numbered_dataset()
    a, b, c = (FederatedDataset.build(ds, "dirichlet", 5, 0.1, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.client_train(3)[1], b.client_train(3)[1])
    np.testing.assert_array_equal(a.partition.order, b.partition.order)
    assert not np.array_equal(a.partition.order, c.partition.order)


def test_label_counts() -> None:
    ds = numbered_dataset()
    fds = FederatedDataset.build(ds, Shards(1), num_clients=4, test_fraction=0.1, seed=0)
    counts = fds.label_counts()
    assert counts.shape == (4, 4)
    np.testing.assert_array_equal(counts.sum(axis=1), fds.partition.sizes())
    for cid in range(4):
        expected = np.bincount(ds.y_train[fds.partition.indices(cid)], minlength=4)
        np.testing.assert_array_equal(counts[cid], expected)
    assert np.all((counts > 0).sum(axis=1) == 1)  # one shard each, 50 examples of one label


def test_unknown_client_id() -> None:
    fds = FederatedDataset.build(numbered_dataset(), IID(), 4, 0.1, seed=0)
    with pytest.raises(DataError, match="out of range"):
        fds.client_train(4)
    with pytest.raises(DataError, match="out of range"):
        fds.num_train_examples(-1)


def test_partition_must_fit_the_data() -> None:
    ds = numbered_dataset(n=10)
    with pytest.raises(DataError, match="outside the 10 training examples"):
        FederatedDataset(
            ds.x_train, ds.y_train, Partition(np.array([0, 10]), np.array([0, 1, 2])), 0.0,
            ds.x_test, ds.y_test, ds.num_classes,
        )  # fmt: skip


def test_pickle_holds_the_arrays_once_however_many_clients() -> None:
    ds = numbered_dataset(n=5000)
    fds = FederatedDataset.build(ds, IID(), num_clients=2500, test_fraction=0.5, seed=0)
    blob = pickle.dumps(fds, protocol=pickle.HIGHEST_PROTOCOL)
    arrays = [ds.x_train, ds.y_train, ds.x_test, ds.y_test, fds.partition.order]
    assert len(blob) < 1.1 * sum(a.nbytes for a in arrays) + 100_000
    clone = pickle.loads(blob)
    assert clone.num_clients == 2500
    np.testing.assert_array_equal(clone.client_test(7)[0], fds.client_test(7)[0])


def test_builds_from_digits() -> None:
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    fds = FederatedDataset.build(ds, Dirichlet(alpha=0.3), 10, test_fraction=0.1, seed=0)
    assert fds.label_counts().sum() == len(ds.y_train)
    x, y = fds.client_train(0)
    assert x.shape[1:] == (1, 8, 8) and x.dtype == np.float32 and y.dtype == np.int64
