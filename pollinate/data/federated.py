"""A data set split among simulated clients, without a copy per client.

:class:`FederatedDataset` keeps the global training arrays once, plus a :class:`Partition`
(two index arrays). A client's data are gathered from the global arrays when a task asks for
them: its first examples are its training part, its last ``round(n · test_fraction)`` its
held-out test part (federated evaluation and the clients' ``local_accuracy``). The server's
test set is the data set's own test split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pollinate.data.datasets import Dataset
from pollinate.data.partition import Partition, Partitioner, make_partitioner
from pollinate.errors import ConfigError, DataError

XY = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedDataset:
    """Global train arrays split among clients by a Partition, and the server's test set."""

    x_train: np.ndarray
    y_train: np.ndarray
    partition: Partition
    test_fraction: float
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"client_test_fraction must be in [0, 1), got {self.test_fraction!r}")
        order = self.partition.order
        if len(order) and (order.min() < 0 or order.max() >= len(self.y_train)):
            raise DataError(
                f"the partition refers to examples outside the {len(self.y_train)} training "
                "examples; build it from this data set's labels"
            )
        sizes = self.partition.sizes()
        empty = np.flatnonzero(sizes - self._test_counts(sizes) < 1)
        if len(empty):
            raise DataError(
                f"{len(empty)} clients (e.g. client {empty[0]} with {sizes[empty[0]]} examples) "
                f"would have no training examples after holding out client_test_fraction="
                f"{self.test_fraction}; lower client_test_fraction or use fewer clients"
            )

    @classmethod
    def build(
        cls,
        dataset: Dataset,
        partitioner: Partitioner | str,
        num_clients: int,
        test_fraction: float,
        seed: int,
    ) -> FederatedDataset:
        """Split ``dataset``'s training examples among ``num_clients`` clients."""
        if isinstance(partitioner, str):
            partitioner = make_partitioner(partitioner)
        rng = np.random.default_rng(seed)
        partition = partitioner.partition(dataset.y_train, num_clients, rng)
        return cls(
            dataset.x_train,
            dataset.y_train,
            partition,
            float(test_fraction),
            dataset.x_test,
            dataset.y_test,
            dataset.num_classes,
        )

    @property
    def num_clients(self) -> int:
        """How many clients hold data."""
        return self.partition.num_clients

    def client_train(self, cid: int) -> XY:
        """Client ``cid``'s training examples (a fresh copy, gathered from the global arrays)."""
        idx = self.partition.indices(cid)
        return self._take(idx[: len(idx) - self._test_count(len(idx))])

    def client_test(self, cid: int) -> XY:
        """Client ``cid``'s held-out test examples (empty when test_fraction is 0)."""
        idx = self.partition.indices(cid)
        return self._take(idx[len(idx) - self._test_count(len(idx)) :])

    def num_train_examples(self, cid: int) -> int:
        """How many training examples client ``cid`` holds, without touching the data."""
        n = self.partition.size(cid)
        return n - self._test_count(n)

    def num_test_examples(self, cid: int) -> int:
        """How many held-out test examples client ``cid`` holds."""
        return self._test_count(self.partition.size(cid))

    def has_client_test_data(self) -> bool:
        """Whether any client holds a held-out test example (else federated evaluation has
        nothing to run on)."""
        sizes = self.partition.sizes()
        return len(sizes) > 0 and int(self._test_counts(sizes).max()) > 0

    def label_counts(self) -> np.ndarray:
        """Examples per (client, class), train and test parts together: (num_clients, classes)."""
        clients = np.repeat(np.arange(self.num_clients), self.partition.sizes())
        labels = self.y_train[self.partition.order]
        flat = np.bincount(
            clients * self.num_classes + labels, minlength=self.num_clients * self.num_classes
        )
        return flat.reshape(self.num_clients, self.num_classes)

    def server_test(self) -> XY:
        """The server's test set, for centralized evaluation."""
        return self.x_test, self.y_test

    def _take(self, idx: np.ndarray) -> XY:
        return self.x_train[idx], self.y_train[idx]

    def _test_count(self, n: int) -> int:
        return int(self._test_counts(np.array([n]))[0])

    def _test_counts(self, sizes: np.ndarray) -> np.ndarray:
        """round(n · test_fraction) for every size n (halves round to even, like round())."""
        return np.rint(sizes * self.test_fraction).astype(np.int64)
