"""Partitioners: one contract every partitioner meets, then each one's own promise."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
import pytest

from pollinate.data import (
    IID,
    Dirichlet,
    Exponential,
    FunctionPartitioner,
    InnerDirichlet,
    Linear,
    Natural,
    Partition,
    Partitioner,
    Pathological,
    Quantity,
    Shards,
    Square,
    make_partitioner,
)
from pollinate.errors import ConfigError, DataError


def balanced_labels(classes: int = 10, per_class: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def check_valid(part: Partition, num_examples: int, num_clients: int) -> None:
    """Every client has examples, every example is used at most once, the arrays agree."""
    assert isinstance(part, Partition)
    assert part.order.dtype == np.int64 and part.offsets.dtype == np.int64
    assert part.num_clients == num_clients and len(part.offsets) == num_clients + 1
    sizes = part.sizes()
    assert sizes.sum() == len(part.order) <= num_examples
    assert sizes.min() >= 1
    assert len(np.unique(part.order)) == len(part.order)  # no example used twice
    assert part.order.min() >= 0 and part.order.max() < num_examples
    joined = np.concatenate([part.indices(i) for i in range(num_clients)])
    np.testing.assert_array_equal(joined, part.order)
    assert [part.size(i) for i in range(num_clients)] == sizes.tolist()


# --- the contract, met by every partitioner -------------------------------------------------


def round_robin(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list:
    """A user's partition function: a shuffled split into near-equal parts."""
    return np.array_split(rng.permutation(len(labels)), num_clients)


@dataclasses.dataclass(frozen=True)
class Case:
    """A partitioner for ``(labels, num_clients)``, and which examples it promises to use."""

    id: str
    make: Callable[[np.ndarray, int], Partitioner]
    uses_every_example: bool = True  # else: every example of the classes its clients hold

    def claimed(self, labels: np.ndarray, part: Partition) -> np.ndarray:
        if self.uses_every_example:
            return np.arange(len(labels))
        held = np.unique(labels[part.order])
        return np.flatnonzero(np.isin(labels, held))


def fixed(partitioner: Partitioner) -> Callable[[np.ndarray, int], Partitioner]:
    return lambda labels, num_clients: partitioner


CASES = [
    Case("IID", fixed(IID())),
    Case("Dirichlet", fixed(Dirichlet(alpha=0.5, min_size=2))),
    Case("Shards", fixed(Shards(shards_per_client=2))),
    Case("Quantity", fixed(Quantity())),
    Case("Pathological", fixed(Pathological(2)), uses_every_example=False),
    Case("Pathological-random", fixed(Pathological(3, "random")), uses_every_example=False),
    Case("Pathological-det", fixed(Pathological(2, "deterministic")), uses_every_example=False),
    Case("InnerDirichlet", fixed(InnerDirichlet(alpha=0.5))),
    Case("Linear", fixed(Linear())),
    Case("Square", fixed(Square())),
    Case("Exponential", fixed(Exponential())),
    Case("Natural", lambda labels, k: Natural(np.arange(len(labels)) % k, column="writer")),
    Case("Function", fixed(FunctionPartitioner(round_robin, "tests:round_robin"))),
]
IDS = [c.id for c in CASES]
ASKS_FOR_FEWER = "fewer clients|use at most|classes_per_client to at most"


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("num_clients", [1, 4, 7])
def test_contract_valid_partition(case: Case, num_clients: int) -> None:
    labels = balanced_labels()
    part = case.make(labels, num_clients).partition(labels, num_clients, np.random.default_rng(0))
    check_valid(part, len(labels), num_clients)
    np.testing.assert_array_equal(np.sort(part.order), case.claimed(labels, part))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_contract_many_clients_are_given_or_refused_with_the_fix(case: Case) -> None:
    labels = balanced_labels()
    try:
        part = case.make(labels, 60).partition(labels, 60, np.random.default_rng(0))
    except DataError as exc:
        assert re.search(ASKS_FOR_FEWER, str(exc)), exc
    else:
        check_valid(part, len(labels), 60)  # never a different number of clients


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_contract_deterministic_per_seed(case: Case) -> None:
    labels = balanced_labels()
    partitioner = case.make(labels, 5)
    a = partitioner.partition(labels, 5, np.random.default_rng(42))
    b = partitioner.partition(labels, 5, np.random.default_rng(42))
    c = partitioner.partition(labels, 5, np.random.default_rng(43))
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.order, c.order)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_contract_shuffles_within_a_client(case: Case) -> None:
    labels = np.sort(balanced_labels())  # sorted input must not come out sorted
    part = case.make(labels, 4).partition(labels, 4, np.random.default_rng(0))
    for i in range(4):
        idx = part.indices(i)
        assert len(idx) < 10 or not np.all(np.diff(idx) > 0)
    assert part.sizes().max() >= 10


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_contract_rejects_impossible_requests(case: Case) -> None:
    labels = balanced_labels(classes=3, per_class=4)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="use fewer clients"):
        case.make(labels, 13).partition(labels, 13, rng)  # more clients than examples
    partitioner = case.make(labels, 3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="num_clients must be an integer >= 1"):
            partitioner.partition(labels, bad, rng)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="1-D"):
        partitioner.partition(labels.reshape(3, 4), 2, rng)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_contract_edge_cases(case: Case) -> None:
    rng = np.random.default_rng(0)
    one_class = np.zeros(200, dtype=np.int64)
    sparse_labels = np.repeat(np.array([3, 70]), 50)  # labels need not be 0..C-1
    for labels in (one_class, sparse_labels):
        k = np.int64(5)  # NumPy integers count as integers
        try:
            part = case.make(labels, k).partition(labels, k, rng)  # type: ignore[arg-type]
        except DataError as exc:  # only a documented limit, named with its fix
            assert case.id.startswith("Pathological") and "classes_per_client to at most" in str(
                exc
            )
        else:
            check_valid(part, len(labels), 5)
    # as many clients as examples: a valid split of one example each, or a clear DataError
    labels = balanced_labels(classes=2, per_class=10)
    try:
        part = case.make(labels, 20).partition(labels, 20, rng)
    except DataError as exc:
        assert re.search(ASKS_FOR_FEWER, str(exc)), exc
    else:
        check_valid(part, 20, 20)
        assert part.sizes().tolist() == [1] * 20


@pytest.mark.parametrize("partitioner", [IID(), Shards(), Quantity()], ids=str)
def test_ten_thousand_clients_of_six_examples(partitioner: Partitioner) -> None:
    labels = balanced_labels(classes=10, per_class=6000)
    part = partitioner.partition(labels, 10_000, np.random.default_rng(0))
    check_valid(part, 60_000, 10_000)


# --- Partition ----------------------------------------------------------------------------


def test_partition_is_read_only_and_checks_ids() -> None:
    part = Partition(np.array([4, 2, 0, 1]), np.array([0, 1, 4]))
    assert part.num_clients == 2 and part.sizes().tolist() == [1, 3]
    assert part.indices(1).tolist() == [2, 0, 1]
    with pytest.raises(ValueError):
        part.order[0] = 3
    for bad in (2, -1):
        with pytest.raises(DataError, match=r"ids 0 \.\. 1"):
            part.indices(bad)


@pytest.mark.parametrize(
    "offsets", [[1, 2, 4], [0, 3, 2, 4], [0, 5], [0]], ids=["start", "decrease", "end", "short"]
)
def test_partition_rejects_bad_offsets(offsets: list[int]) -> None:
    with pytest.raises(DataError):
        Partition(np.arange(4), np.array(offsets))


# --- each partitioner's own promise ---------------------------------------------------------


def mean_top_class_share(partitioner: Partitioner, labels: np.ndarray, clients: int) -> float:
    part = partitioner.partition(labels, clients, np.random.default_rng(0))
    shares = [np.bincount(labels[part.indices(i)]).max() / part.size(i) for i in range(clients)]
    return float(np.mean(shares))


def test_iid_sizes_differ_by_at_most_one() -> None:
    part = IID().partition(balanced_labels(), 7, np.random.default_rng(0))
    assert part.sizes().max() - part.sizes().min() <= 1


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not() -> None:
    labels = balanced_labels(classes=10, per_class=500)
    skewed = mean_top_class_share(Dirichlet(alpha=0.05), labels, 10)
    near_iid = mean_top_class_share(Dirichlet(alpha=1000.0), labels, 10)
    assert skewed > 0.5  # most of a client's data is one class
    assert near_iid < 0.15  # close to the uniform 0.1


def test_dirichlet_respects_min_size_or_says_why() -> None:
    labels = balanced_labels(classes=10, per_class=100)
    part = Dirichlet(alpha=0.3, min_size=20).partition(labels, 10, np.random.default_rng(0))
    assert part.sizes().min() >= 20
    with pytest.raises(DataError, match="raise alpha, lower min_size"):
        Dirichlet(alpha=0.001, min_size=5).partition(labels, 100, np.random.default_rng(0))
    with pytest.raises(DataError, match="at least min_size=11"):
        Dirichlet(min_size=11).partition(labels, 100, np.random.default_rng(0))


def test_shards_give_at_most_k_labels_in_the_balanced_case() -> None:
    labels = balanced_labels(classes=10, per_class=100)
    for k, clients in [(1, 50), (2, 50), (5, 20)]:  # shard sizes 20, 10, 10 divide 100
        part = Shards(shards_per_client=k).partition(labels, clients, np.random.default_rng(k))
        assert set(part.sizes().tolist()) == {1000 // clients}
        label_sets = [np.unique(labels[part.indices(i)]) for i in range(clients)]
        assert max(len(s) for s in label_sets) <= k
        assert min(len(s) for s in label_sets) >= 1
    assert mean_top_class_share(Shards(1), labels, 10) == 1.0


def test_shards_that_do_not_fit_are_refused() -> None:
    with pytest.raises(DataError, match="shards do not fit in 100 examples"):
        Shards(shards_per_client=3).partition(
            balanced_labels(per_class=10), 40, np.random.default_rng(0)
        )


def test_quantity_sizes_vary_with_alpha() -> None:
    labels = balanced_labels(classes=10, per_class=1000)
    skewed = Quantity(alpha=0.3, min_size=5).partition(labels, 20, np.random.default_rng(0))
    assert skewed.sizes().min() >= 5
    assert skewed.sizes().max() > 4 * skewed.sizes().min()
    even = Quantity(alpha=10_000.0).partition(labels, 20, np.random.default_rng(0))
    assert np.all(np.abs(even.sizes() - 500) < 50)
    with pytest.raises(DataError, match="min_size=600"):
        Quantity(min_size=600).partition(labels, 20, np.random.default_rng(0))


# --- make_partitioner ----------------------------------------------------------------------


def test_make_partitioner_builds_each_kind() -> None:
    assert make_partitioner("iid") == IID()
    assert make_partitioner("Dirichlet", alpha=0.1, min_size=0) == Dirichlet(0.1, 0)
    assert make_partitioner("shards", shards_per_client=3) == Shards(3)
    assert make_partitioner("quantity", alpha=2) == Quantity(alpha=2)


def test_make_partitioner_names_what_is_allowed() -> None:
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "use one of: iid | dirichlet | shards | quantity | pathological | inner_dirichlet "
            "| linear | square | exponential | natural, or 'package.module:function'"
        ),
    ):
        make_partitioner("bogus")
    with pytest.raises(ConfigError, match="'iid' does not take alpha; it takes no parameters"):
        make_partitioner("iid", alpha=0.5)
    with pytest.raises(ConfigError, match="does not take shards; it takes shards_per_client"):
        make_partitioner("shards", shards=2)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("dirichlet", {"alpha": 0}),
        ("dirichlet", {"alpha": -1.0}),
        ("dirichlet", {"alpha": float("nan")}),
        ("dirichlet", {"alpha": "0.5"}),
        ("dirichlet", {"alpha": True}),
        ("dirichlet", {"min_size": -1}),
        ("quantity", {"alpha": float("inf")}),
        ("quantity", {"min_size": 0}),
        ("shards", {"shards_per_client": 0}),
        ("shards", {"shards_per_client": 1.5}),
    ],
)
def test_invalid_parameters_are_config_errors(name: str, params: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=f"{next(iter(params))} must be"):
        make_partitioner(name, **params)
