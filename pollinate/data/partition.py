"""Partitioners: split one data set's examples among simulated clients.

A :class:`Partition` is two flat arrays, ``order`` and ``offsets``: client ``i`` holds the
examples ``order[offsets[i]:offsets[i + 1]]``. Memory is O(examples + clients), with no Python
object per client, so a million clients cost two arrays.

Every partitioner is a small frozen value with one method,
``partition(labels, num_clients, rng) -> Partition``; the same ``rng`` state gives the same split.

======================  ==================================================================
``IID()``               a uniform random split into near-equal sizes
``Dirichlet(alpha)``    label skew: each class spread over the clients by Dirichlet(alpha)
``Shards(k)``           pathological label skew: each client gets k label-sorted shards
``Quantity(alpha)``     size skew: client sizes drawn by Dirichlet(alpha), labels IID
======================  ==================================================================

More in :mod:`pollinate.data.skew` (pathological, inner Dirichlet, linear, square and
exponential sizes) and :mod:`pollinate.data.natural` (one client per value of a column, and
your own function); :func:`make_partitioner` builds any of them by name.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from pollinate.errors import ConfigError, DataError

MAX_DIRICHLET_TRIES = 100


@dataclasses.dataclass(frozen=True, eq=False)
class Partition:
    """Which examples each client holds: ``order[offsets[i]:offsets[i + 1]]`` for client i."""

    order: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        order = np.array(self.order, dtype=np.int64)  # private, read-only copies
        offsets = np.array(self.offsets, dtype=np.int64)
        if order.ndim != 1 or offsets.ndim != 1 or len(offsets) < 2:
            raise DataError("a Partition needs a 1-D order and 1-D offsets of length clients + 1")
        if offsets[0] != 0 or offsets[-1] != len(order) or np.any(np.diff(offsets) < 0):
            raise DataError(
                "Partition offsets must start at 0, never decrease and end at len(order) "
                f"= {len(order)}; got {offsets[0]} .. {offsets[-1]}"
            )
        order.flags.writeable = False
        offsets.flags.writeable = False
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "offsets", offsets)

    @property
    def num_clients(self) -> int:
        """How many clients the examples are split among."""
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        """The number of examples of every client, as an int64 array."""
        return np.diff(self.offsets)

    def size(self, client_id: int) -> int:
        """The number of examples client ``client_id`` holds."""
        i = self._check_id(client_id)
        return int(self.offsets[i + 1] - self.offsets[i])

    def indices(self, client_id: int) -> np.ndarray:
        """The example indices client ``client_id`` holds (a read-only view)."""
        i = self._check_id(client_id)
        return self.order[self.offsets[i] : self.offsets[i + 1]]

    def _check_id(self, client_id: int) -> int:
        i = operator.index(client_id)
        if not 0 <= i < self.num_clients:
            raise DataError(
                f"client id {client_id} is out of range: this partition has "
                f"{self.num_clients} clients (ids 0 .. {self.num_clients - 1})"
            )
        return i


@runtime_checkable
class Partitioner(Protocol):
    """Splits the examples with these labels among ``num_clients`` clients."""

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition: ...


@dataclasses.dataclass(frozen=True)
class IID:
    """A uniform random split: sizes differ by at most one example."""

    name: ClassVar[str] = "iid"

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        return Partition(rng.permutation(n), _offsets(_even_sizes(n, num_clients)))


@dataclasses.dataclass(frozen=True)
class Dirichlet:
    """Label skew (Hsu, Qi & Brown 2019, arXiv 1909.06335): for every class c, draw client
    proportions p_c ~ Dirichlet(alpha · 1) and give client i a share p_c[i] of class c's examples.

    Small alpha (0.1) gives each client few classes; large alpha (100) approaches IID. Draws are
    repeated, at most ``MAX_DIRICHLET_TRIES`` times, until every client holds >= min_size examples.
    """

    alpha: float = 0.5
    min_size: int = 2
    name: ClassVar[str] = "dirichlet"

    def __post_init__(self) -> None:
        _check_positive("alpha", self.alpha)
        _check_count("min_size", self.min_size, minimum=0)

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        if self.min_size * num_clients > n:
            raise DataError(
                f"cannot give {num_clients} clients at least min_size={self.min_size} examples "
                f"each from {n} examples; lower min_size or use fewer clients"
            )
        classes, class_of = np.unique(labels, return_inverse=True)
        class_sizes = np.bincount(class_of, minlength=len(classes))
        for _ in range(MAX_DIRICHLET_TRIES):
            props = rng.dirichlet(np.full(num_clients, float(self.alpha)), size=len(classes))
            counts = _split_counts(props, class_sizes)  # counts[c, i]: class c examples of i
            if counts.sum(axis=0).min() >= self.min_size:
                break
        else:
            raise DataError(
                f"Dirichlet(alpha={self.alpha}) left some of the {num_clients} clients with fewer "
                f"than min_size={self.min_size} examples in {MAX_DIRICHLET_TRIES} draws; raise "
                "alpha, lower min_size, or use fewer clients"
            )
        shuffled = rng.permutation(n)
        by_class = shuffled[np.argsort(class_of[shuffled], kind="stable")]
        client_of = np.empty(n, dtype=np.int64)
        client_of[by_class] = np.repeat(
            np.tile(np.arange(num_clients), len(classes)), counts.ravel()
        )
        return _group_by_client(client_of, num_clients, rng)


@dataclasses.dataclass(frozen=True)
class Shards:
    """Pathological label skew (McMahan et al. 2017, arXiv 1602.05629): sort the examples by
    label, cut them into num_clients · shards_per_client equal shards, give each client
    shards_per_client random shards. With class sizes that are multiples of the shard size,
    a client holds at most shards_per_client labels.
    """

    shards_per_client: int = 2
    name: ClassVar[str] = "shards"

    def __post_init__(self) -> None:
        _check_count("shards_per_client", self.shards_per_client, minimum=1)

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        num_shards = num_clients * self.shards_per_client
        if num_shards > n:
            raise DataError(
                f"{num_clients} clients x {self.shards_per_client} shards = {num_shards} shards "
                f"do not fit in {n} examples (a shard needs at least one); lower "
                "shards_per_client or use fewer clients"
            )
        shuffled = rng.permutation(n)  # random order within a label, then sort by label
        by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
        owner = rng.permutation(np.repeat(np.arange(num_clients), self.shards_per_client))
        client_of = np.empty(n, dtype=np.int64)
        client_of[by_label] = np.repeat(owner, _even_sizes(n, num_shards))
        return _group_by_client(client_of, num_clients, rng)


@dataclasses.dataclass(frozen=True)
class Quantity:
    """Quantity skew (Li et al. 2022, arXiv 2102.02079): client shares p ~ Dirichlet(alpha · 1);
    client i gets min_size + about p[i] · (n − num_clients · min_size) examples, drawn IID.

    Small alpha gives a few large clients and many small ones; large alpha near-equal sizes.
    """

    alpha: float = 0.5
    min_size: int = 1
    name: ClassVar[str] = "quantity"

    def __post_init__(self) -> None:
        _check_positive("alpha", self.alpha)
        _check_count("min_size", self.min_size, minimum=1)

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        spare = n - self.min_size * num_clients
        if spare < 0:
            raise DataError(
                f"cannot give {num_clients} clients at least min_size={self.min_size} examples "
                f"each from {n} examples; lower min_size or use fewer clients"
            )
        shares = rng.dirichlet(np.full(num_clients, float(self.alpha)))
        extra = _split_counts(shares[None, :], np.array([spare]))[0]
        return Partition(rng.permutation(n), _offsets(extra + self.min_size))


PARTITIONERS: dict[str, type[IID | Dirichlet | Shards | Quantity]] = {
    p.name: p for p in (IID, Dirichlet, Shards, Quantity)
}


def partitioner_classes() -> dict[str, type]:
    """Every built-in partitioner by name: the four above, then those of ``skew`` and
    ``natural`` (imported here, as they build on this module)."""
    from pollinate.data.natural import Natural
    from pollinate.data.skew import Exponential, InnerDirichlet, Linear, Pathological, Square

    more = (Pathological, InnerDirichlet, Linear, Square, Exponential, Natural)
    return {**PARTITIONERS, **{p.name: p for p in more}}


def make_partitioner(name: str, **params: Any) -> Partitioner:
    """Build the partitioner called ``name`` with ``params``: a built-in one (iid | dirichlet |
    shards | quantity | pathological | inner_dirichlet | linear | square | exponential |
    natural) or ``"package.module:function"`` (:class:`pollinate.data.FunctionPartitioner`)."""
    if ":" in name:
        from pollinate.data.natural import FunctionPartitioner

        if params:
            raise ConfigError(f"partition {name!r} (your function) takes no parameters")
        return FunctionPartitioner.load(name.strip())
    classes = partitioner_classes()
    cls = classes.get(name.strip().lower())
    if cls is None:
        raise ConfigError(
            f"unknown partition {name!r}; use one of: {' | '.join(classes)}, or "
            "'package.module:function' for your own"
        )
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"partition {name.strip().lower()!r} does not take {', '.join(unknown)}; it takes "
            f"{', '.join(allowed) or 'no parameters'}"
        )
    partitioner: Partitioner = cls(**params)
    return partitioner


# --- helpers ------------------------------------------------------------------------------


def _check_request(labels: np.ndarray, num_clients: int) -> int:
    """Validate a partition request; return the number of examples."""
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D (one per example), got shape {labels.shape}")
    _check_count("num_clients", num_clients, minimum=1)
    if num_clients > len(labels):
        raise DataError(
            f"cannot split {len(labels)} examples among {num_clients} clients: every client "
            "needs at least one example; use fewer clients"
        )
    return len(labels)


def _check_count(what: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _check_positive(what: str, value: float) -> None:
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a number > 0, got {value!r}")


def _even_sizes(n: int, parts: int) -> np.ndarray:
    """``parts`` sizes summing to ``n`` that differ by at most one."""
    sizes = np.full(parts, n // parts, dtype=np.int64)
    sizes[: n % parts] += 1
    return sizes


def _split_counts(props: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Split ``totals[r]`` into integer counts proportional to the row ``props[r]``."""
    totals = totals.astype(np.int64)[:, None]
    bounds = np.minimum(np.floor(np.cumsum(props, axis=1) * totals).astype(np.int64), totals)
    bounds[:, -1] = totals[:, 0]
    return np.diff(bounds, axis=1, prepend=0)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))


def _group_by_client(
    client_of: np.ndarray, num_clients: int, rng: np.random.Generator
) -> Partition:
    """Turn each example's client into a Partition, shuffling the examples within a client."""
    shuffled = rng.permutation(len(client_of))
    order = shuffled[np.argsort(client_of[shuffled], kind="stable")]
    return Partition(order, _offsets(np.bincount(client_of, minlength=num_clients)))
