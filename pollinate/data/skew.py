"""More label-skew and size-skew partitioners, with the semantics of flwr-datasets' namesakes.

======================  ==================================================================
``Pathological(k)``     each client holds exactly k classes; a class is split evenly among
                        the clients that hold it (flwr-datasets ``PathologicalPartitioner``)
``InnerDirichlet(a)``   fixed client sizes; each client's class mix drawn from Dirichlet(a),
                        examples drawn without replacement (``InnerDirichletPartitioner``)
``Linear()``            client i (0-based) gets a share of the examples ∝ i + 1
``Square()``            … ∝ (i + 1)²
``Exponential()``       … ∝ e^(i + 1)  (``LinearPartitioner`` / ``SquarePartitioner`` /
                        ``ExponentialPartitioner``, built on ``SizePartitioner``)
======================  ==================================================================

Every one is seeded by the ``rng`` it is given and shuffles the examples within a client.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from typing import ClassVar

import numpy as np

from pollinate.data.partition import (
    Partition,
    _check_count,
    _check_positive,
    _check_request,
    _even_sizes,
    _offsets,
)
from pollinate.errors import ConfigError, DataError

log = logging.getLogger("pollinate")

ASSIGNMENTS = ("first-deterministic", "random", "deterministic")


@dataclasses.dataclass(frozen=True)
class Pathological:
    """Exactly ``classes_per_client`` classes per client (Li, Diao, Chen & He 2022, "Federated
    Learning on Non-IID Data Silos", arXiv 2102.02079, the #C = k setting).

    First every client i picks its k classes, by ``assignment``:

    - ``"first-deterministic"`` (the paper's, and the default): class i mod C, plus k − 1 other
      classes drawn uniformly without replacement; with at least C clients every class is used;
    - ``"random"`` (flwr-datasets' default): k classes drawn uniformly without replacement;
    - ``"deterministic"``: classes (i + j) mod C for j = 0 .. k−1.

    Then class c's examples, shuffled, are split into t_c near-equal parts (sizes differ by at
    most one), t_c being the number of clients that picked c, and handed to those clients in
    client order. Classes that no client picked are left out (a warning names them); the
    partition covers every example of the classes used.
    """

    classes_per_client: int = 2
    assignment: str = "first-deterministic"
    name: ClassVar[str] = "pathological"

    def __post_init__(self) -> None:
        _check_count("classes_per_client", self.classes_per_client, minimum=1)
        if self.assignment not in ASSIGNMENTS:
            raise ConfigError(
                f"assignment must be one of {', '.join(ASSIGNMENTS)}, got {self.assignment!r}"
            )

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        classes, class_of = np.unique(labels, return_inverse=True)
        c, k = len(classes), self.classes_per_client
        if k > c:
            raise DataError(
                f"classes_per_client = {k} but the labels hold only {c} classes; set "
                f"classes_per_client to at most {c}"
            )
        picked = self._pick(num_clients, c, rng)  # (num_clients, k) class positions
        holders = np.bincount(picked.ravel(), minlength=c)
        class_sizes = np.bincount(class_of, minlength=c)
        short = np.flatnonzero(holders > class_sizes)
        if len(short):
            j = short[0]
            raise DataError(
                f"class {classes[j].item()!r} has {class_sizes[j]} examples but {holders[j]} of "
                f"the {num_clients} clients hold it (each needs one); use fewer clients or a "
                "smaller classes_per_client"
            )
        unused = classes[holders == 0]
        if len(unused):
            log.warning(
                "pathological partition: no client holds classes %s; their %d examples are "
                "left out (with at least %d clients and assignment 'first-deterministic' "
                "every class is used)",
                ", ".join(map(str, unused.tolist())),
                int(class_sizes[holders == 0].sum()),
                c,
            )
        # clients that hold each class, class by class, in client order
        pairs = np.argsort(picked.ravel(), kind="stable")
        owners = pairs // k
        part_sizes = np.concatenate(
            [_even_sizes(int(class_sizes[j]), int(holders[j])) for j in np.flatnonzero(holders)]
        )
        shuffled = rng.permutation(n)
        by_class = shuffled[np.argsort(class_of[shuffled], kind="stable")]
        client_of = np.full(n, -1, dtype=np.int64)
        used = np.repeat(holders > 0, class_sizes)  # by_class positions of used classes
        client_of[by_class[used]] = np.repeat(owners, part_sizes)
        return _group(client_of, num_clients, rng)

    def _pick(self, num_clients: int, c: int, rng: np.random.Generator) -> np.ndarray:
        k = self.classes_per_client
        ids = np.arange(num_clients)[:, None]
        if self.assignment == "deterministic":
            return (ids + np.arange(k)) % c
        keys = rng.random((num_clients, c))  # a uniform random order of the classes per client
        if self.assignment == "first-deterministic":
            keys[np.arange(num_clients), np.arange(num_clients) % c] = -1.0  # class i mod C first
        return np.argsort(keys, axis=1, kind="stable")[:, :k]


@dataclasses.dataclass(frozen=True)
class InnerDirichlet:
    """Fixed client sizes, label skew inside each client (Acar et al. 2021, "Federated Learning
    Based on Dynamic Regularization", arXiv 2111.04263, as in flwr-datasets).

    Every client i draws class priors p_i ~ Dirichlet(alpha · 1). Then, one example at a time
    until every client is full: pick a client that is not yet full uniformly at random, draw a
    class c ~ p_i, and give it one of class c's remaining examples (without replacement). When a
    class runs out, its prior is set to 0 for everyone and the priors are renormalized (a client
    whose prior mass is all on used-up classes draws uniformly among the classes left).

    ``sizes``: every client's number of examples (their sum at most the data set's size);
    ``None`` splits all examples into near-equal sizes.
    """

    alpha: float = 0.5
    sizes: tuple[int, ...] | None = None
    name: ClassVar[str] = "inner_dirichlet"

    def __post_init__(self) -> None:
        _check_positive("alpha", self.alpha)
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(self.sizes))
            for size in self.sizes:
                _check_count("every client size", size, minimum=1)

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        sizes = self._sizes(n, num_clients)
        classes, class_of = np.unique(labels, return_inverse=True)
        c = len(classes)
        priors = rng.dirichlet(np.full(c, float(self.alpha)), size=num_clients)
        shuffled = rng.permutation(n)
        by_class = shuffled[np.argsort(class_of[shuffled], kind="stable")]
        starts = _offsets(np.bincount(class_of, minlength=c))
        left_in_class = np.diff(starts).tolist()
        alive = np.array(left_in_class) > 0
        cums = _cumulative(priors, alive)
        total = int(sizes.sum())
        u_client, u_class = rng.random(total), rng.random(total)
        left = sizes.tolist()
        open_clients = list(range(num_clients))
        client_of = np.full(n, -1, dtype=np.int64)
        for t in range(total):
            slot = int(u_client[t] * len(open_clients))
            i = open_clients[slot]
            row = cums[i]
            if row[-1] > 0:
                j = min(bisect.bisect_right(row, u_class[t] * row[-1]), c - 1)
                while left_in_class[j] == 0:  # a zero-width step at the edge of the row
                    j -= 1
            else:  # all of client i's prior mass was on used-up classes
                choices = np.flatnonzero(alive)
                j = int(choices[int(u_class[t] * len(choices))])
            left_in_class[j] -= 1
            client_of[by_class[starts[j] + left_in_class[j]]] = i
            if left_in_class[j] == 0:
                alive[j] = False
                cums = _cumulative(priors, alive)
            left[i] -= 1
            if left[i] == 0:  # swap-remove the full client
                open_clients[slot] = open_clients[-1]
                open_clients.pop()
        return _group(client_of, num_clients, rng)

    def _sizes(self, n: int, num_clients: int) -> np.ndarray:
        if self.sizes is None:
            return _even_sizes(n, num_clients)
        sizes = np.array(self.sizes, dtype=np.int64)
        if len(sizes) != num_clients:
            raise ConfigError(
                f"inner_dirichlet was given {len(sizes)} client sizes for {num_clients} clients; "
                "give one size per client"
            )
        if sizes.sum() > n:
            raise DataError(
                f"inner_dirichlet client sizes add up to {int(sizes.sum())} but there are only "
                f"{n} examples; lower the sizes"
            )
        return sizes


def _cumulative(priors: np.ndarray, alive: np.ndarray) -> list[list[float]]:
    """Every client's cumulative prior over the classes that still have examples."""
    return np.cumsum(priors * alive, axis=1).tolist()  # type: ignore[no-any-return]


# --- size skew ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SizeSkew:
    """Client sizes from a fixed function of the client id (flwr-datasets' SizePartitioner).

    With ids i = 1 .. M and units u(i), client i − 1 gets floor(n · u(i) / Σ u) examples and
    the last (largest) client also the examples the floors leave over; the examples are a
    uniform random permutation cut in that order, so labels are IID. Sizes are deterministic;
    which examples a client gets depends on the seed. A request that would leave the first
    (smallest) client with no example is refused, naming the most clients that fit.
    """

    name: ClassVar[str] = ""

    @staticmethod
    def units(ids: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def sizes(self, n: int, num_clients: int) -> np.ndarray:
        """The client sizes for ``n`` examples, smallest first."""
        units = self.units(np.arange(1, num_clients + 1, dtype=np.float64))
        sizes = np.floor(units / units.sum() * n).astype(np.int64)
        sizes[-1] += n - sizes.sum()
        return sizes

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        sizes = self.sizes(n, num_clients)
        if sizes[0] < 1:
            lo, hi = 1, num_clients  # the most clients whose smallest share is >= 1 example
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self.sizes(n, mid)[0] >= 1 else (lo, mid - 1)
            units = self.units(np.arange(1, num_clients + 1, dtype=np.float64))
            raise DataError(
                f"partition = {self.name!r} with {num_clients} clients gives client 0 a share "
                f"of {units[0] / units.sum():.3g} of {n} examples, which rounds down to 0; "
                f"use at most {lo} clients"
            )
        return Partition(rng.permutation(n), _offsets(sizes))


@dataclasses.dataclass(frozen=True)
class Linear(_SizeSkew):
    """Size skew: client i (0-based) gets a share ∝ i + 1 (see :class:`_SizeSkew`)."""

    name: ClassVar[str] = "linear"

    @staticmethod
    def units(ids: np.ndarray) -> np.ndarray:
        return ids


@dataclasses.dataclass(frozen=True)
class Square(_SizeSkew):
    """Size skew: client i (0-based) gets a share ∝ (i + 1)² (see :class:`_SizeSkew`)."""

    name: ClassVar[str] = "square"

    @staticmethod
    def units(ids: np.ndarray) -> np.ndarray:
        return ids**2


@dataclasses.dataclass(frozen=True)
class Exponential(_SizeSkew):
    """Size skew: client i (0-based) gets a share ∝ e^(i + 1) (see :class:`_SizeSkew`); each
    client holds about e ≈ 2.7 times the one before, so few clients fit: 60,000 examples
    allow at most 11."""

    name: ClassVar[str] = "exponential"

    @staticmethod
    def units(ids: np.ndarray) -> np.ndarray:
        return np.exp(ids - ids.max())  # e^i / e^M: the same shares, no overflow


def _group(client_of: np.ndarray, num_clients: int, rng: np.random.Generator) -> Partition:
    """A Partition of the examples whose client is >= 0 (others are left out), each client's
    examples in random order."""
    kept = np.flatnonzero(client_of >= 0)
    shuffled = kept[rng.permutation(len(kept))]
    order = shuffled[np.argsort(client_of[shuffled], kind="stable")]
    return Partition(order, _offsets(np.bincount(client_of[kept], minlength=num_clients)))
