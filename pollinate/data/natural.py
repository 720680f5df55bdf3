"""Partitions the data already have, or that your own function draws.

- :class:`Natural`: one client per distinct value of a column (a writer, a speaker, a
  hospital), as flwr-datasets' ``NaturalIdPartitioner``.
- :class:`FunctionPartitioner`: ``"package.module:function"``, a function
  ``(labels, num_clients, rng) -> list of index arrays``; its answer is checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from pollinate.data.partition import Partition, _check_request, _offsets
from pollinate.errors import DataError

PartitionFn = Callable[[np.ndarray, int, np.random.Generator], Sequence[Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class Natural:
    """One client per distinct value of ``groups`` (one value per example): client i holds the
    examples whose value is the i-th smallest distinct value, in random order. The split itself
    draws nothing; ``num_clients`` must equal the number of distinct values. ``column`` names
    the column in messages."""

    groups: np.ndarray
    column: str = "partition_by"
    name: ClassVar[str] = "natural"

    def __post_init__(self) -> None:
        groups = np.asarray(self.groups)
        if groups.ndim != 1:
            raise DataError(f"column {self.column!r} must hold one value per example")
        if groups.dtype == object:
            groups = groups.astype(str)
        object.__setattr__(self, "groups", groups)

    def values(self) -> np.ndarray:
        """The distinct values, client 0's first."""
        return np.unique(self.groups)

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        if len(self.groups) != n:
            raise DataError(
                f"column {self.column!r} has {len(self.groups)} values for {n} examples; it "
                "needs one per example"
            )
        values, group_of = np.unique(self.groups, return_inverse=True)
        if num_clients != len(values):
            raise DataError(
                f"partition = 'natural' makes one client per distinct value of "
                f"{self.column!r}: the data hold {len(values)} of them but num_clients = "
                f"{num_clients}; set data.num_clients = {len(values)}"
            )
        shuffled = rng.permutation(n)
        order = shuffled[np.argsort(group_of[shuffled], kind="stable")]
        return Partition(order, _offsets(np.bincount(group_of, minlength=num_clients)))


@dataclasses.dataclass(frozen=True)
class FunctionPartitioner:
    """Your own partition: ``function(labels, num_clients, rng)`` returns one array of example
    indices per client. Checked: exactly ``num_clients`` arrays of integers in
    [0, len(labels)), no index twice, no client empty (examples in no array are left out).
    Seed it only through ``rng`` to keep runs reproducible."""

    function: PartitionFn
    spec: str = "your partition function"
    name: ClassVar[str] = "function"

    @classmethod
    def load(cls, spec: str) -> FunctionPartitioner:
        """Import ``"package.module:function"`` (the current folder is importable)."""
        return cls(import_function(spec, "partition"), spec)

    def partition(
        self, labels: np.ndarray, num_clients: int, rng: np.random.Generator
    ) -> Partition:
        n = _check_request(labels, num_clients)
        parts = self.function(labels, num_clients, rng)
        where = f"partition {self.spec!r}"
        if isinstance(parts, np.ndarray) and parts.ndim == 2:
            parts = list(parts)  # equal-sized clients as the rows of one array
        if not isinstance(parts, (list, tuple)):
            raise DataError(
                f"{where} returned {type(parts).__name__}; return a list with one array of "
                "example indices per client"
            )
        if len(parts) != num_clients:
            raise DataError(
                f"{where} returned {len(parts)} index arrays for num_clients = {num_clients}; "
                "return one per client"
            )
        arrays = []
        for i, part in enumerate(parts):
            idx = np.asarray(part)
            if idx.ndim != 1 or (len(idx) and idx.dtype.kind not in "iu"):
                raise DataError(
                    f"{where}: client {i}'s indices have shape {idx.shape} and dtype "
                    f"{idx.dtype}; give a 1-D array of integer example indices"
                )
            if len(idx) == 0:
                raise DataError(f"{where}: client {i} got no examples; every client needs one")
            if idx.min() < 0 or idx.max() >= n:
                bad = int(idx[(idx < 0) | (idx >= n)][0])
                raise DataError(
                    f"{where}: client {i} got index {bad}, outside 0 .. {n - 1} ({n} examples)"
                )
            arrays.append(idx.astype(np.int64))
        order = np.concatenate(arrays)
        counts = np.bincount(order, minlength=n)
        if counts.max() > 1:
            twice = int(np.flatnonzero(counts > 1)[0])
            owners = [i for i, a in enumerate(arrays) if np.any(a == twice)]
            raise DataError(
                f"{where}: example {twice} is given {int(counts[twice])} times (clients "
                f"{', '.join(map(str, owners[:5]))}); every example may go to one client only"
            )
        return Partition(order, _offsets(np.array([len(a) for a in arrays])))


def import_function(spec: str, what: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` for ``what``; the current folder is importable."""
    from pollinate.imports import load_object

    function: Callable[..., Any] = load_object(spec, what)
    return function
