"""The partitioners users know from flwr-datasets, natural partitions and users' own functions:
each one's own promise, on hand-computed cases (the shared contract is in test_partition.py)."""

from __future__ import annotations

import hashlib
import logging
import sys

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
    Pathological,
    Quantity,
    Shards,
    Square,
    make_partitioner,
)
from pollinate.errors import ConfigError, DataError


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def label_sets(labels: np.ndarray, part) -> list[list[int]]:
    return [sorted(set(labels[part.indices(i)].tolist())) for i in range(part.num_clients)]


# --- the existing partitioners do not change ------------------------------------------------


@pytest.mark.parametrize(
    ("partitioner", "digest"),
    [
        (IID(), "f07663abf0a56392"),
        (Dirichlet(alpha=0.5, min_size=2), "120cf0a9c6cdafae"),
        (Shards(shards_per_client=2), "6856971cede8f68b"),
        (Quantity(alpha=0.5, min_size=1), "34ea2eb0cb108ab4"),
    ],
    ids=["IID", "Dirichlet", "Shards", "Quantity"],
)
def test_existing_partitioners_are_bit_identical(partitioner, digest: str) -> None:
    """Digests of the splits these partitioners gave before the new ones were added."""
    labels = np.random.default_rng(7).integers(0, 10, 1000)
    part = partitioner.partition(labels, 13, rng(3))
    got = hashlib.sha256(part.order.tobytes() + part.offsets.tobytes()).hexdigest()[:16]
    assert got == digest


# --- pathological ---------------------------------------------------------------------------

# classes 0 (4 examples), 1 (2), 2 (3)
SMALL = np.array([0, 2, 1, 0, 2, 0, 1, 2, 0])


def test_pathological_deterministic_by_hand() -> None:
    """k = 2, 3 clients: clients hold {0, 1}, {1, 2}, {2, 0}. Class 0's 4 examples split 2/2
    (clients 0, 2), class 1's 2 split 1/1 (clients 0, 1), class 2's 3 split 2/1 (clients 1, 2)."""
    part = Pathological(2, "deterministic").partition(SMALL, 3, rng())
    assert label_sets(SMALL, part) == [[0, 1], [1, 2], [0, 2]]
    counts = [np.bincount(SMALL[part.indices(i)], minlength=3).tolist() for i in range(3)]
    assert counts == [[2, 1, 0], [0, 1, 2], [2, 0, 1]]
    assert len(part.order) == len(SMALL)


def test_pathological_each_client_holds_exactly_k_classes_split_evenly() -> None:
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 60))
    for assignment in ("first-deterministic", "random", "deterministic"):
        for k in (1, 2, 4):
            part = Pathological(k, assignment).partition(labels, 25, rng(k))
            sets = label_sets(labels, part)
            assert all(len(s) == k for s in sets)
            for c in range(10):  # class c's holders got near-equal parts
                shares = [
                    int(np.sum(labels[part.indices(i)] == c)) for i in range(25) if c in sets[i]
                ]
                assert not shares or max(shares) - min(shares) <= 1
            if assignment == "first-deterministic":
                assert all(i % 10 in sets[i] for i in range(25))  # the paper's first class


def test_pathological_with_too_few_clients_leaves_classes_out_and_says_so(caplog) -> None:
    labels = np.repeat(np.arange(10), 10)
    with caplog.at_level(logging.WARNING, logger="pollinate"):
        part = Pathological(1, "deterministic").partition(labels, 4, rng())
    assert label_sets(labels, part) == [[0], [1], [2], [3]]
    assert len(part.order) == 40
    assert "no client holds classes 4, 5, 6, 7, 8, 9; their 60 examples are left out" in (
        caplog.text
    )


def test_pathological_impossible_requests_name_the_numbers() -> None:
    with pytest.raises(DataError, match="classes_per_client = 4 but the labels hold only 3"):
        Pathological(4).partition(SMALL, 2, rng())
    # k = 3 of 3 classes, 5 clients: each class is held 5 times; class 0 has 4 examples
    with pytest.raises(DataError, match="class 0 has 4 examples but 5 of the 5 clients"):
        Pathological(3, "deterministic").partition(SMALL, 5, rng())
    with pytest.raises(ConfigError, match="classes_per_client must be an integer >= 1"):
        Pathological(0)
    with pytest.raises(ConfigError, match="assignment must be one of"):
        Pathological(2, "greedy")


# --- inner Dirichlet ------------------------------------------------------------------------


def test_inner_dirichlet_gives_each_client_its_size() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(5), 40))
    part = InnerDirichlet(alpha=0.5, sizes=(10, 50, 30, 5)).partition(labels, 4, rng())
    assert part.sizes().tolist() == [10, 50, 30, 5]
    even = InnerDirichlet(alpha=0.5).partition(labels, 7, rng())
    assert even.sizes().tolist() == [29] * 4 + [28] * 3 and len(even.order) == 200


def test_inner_dirichlet_alpha_controls_the_skew() -> None:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 500))

    def top_share(alpha: float) -> float:
        part = InnerDirichlet(alpha=alpha).partition(labels, 10, rng())
        return float(
            np.mean([np.bincount(labels[part.indices(i)]).max() / part.size(i) for i in range(10)])
        )

    assert top_share(0.05) > 0.5  # a client's data is mostly one class
    assert top_share(1000.0) < 0.2  # near the uniform 0.1 until classes run out


def test_inner_dirichlet_survives_classes_running_out() -> None:
    """Class 0 has 2 examples, class 1 has 98: whatever the priors, every client fills up
    from the class that is left, and every example is used once."""
    labels = np.array([0] * 2 + [1] * 98)
    for seed in range(5):
        part = InnerDirichlet(alpha=0.01).partition(labels, 4, rng(seed))
        assert part.sizes().tolist() == [25] * 4
        np.testing.assert_array_equal(np.sort(part.order), np.arange(100))


def test_inner_dirichlet_impossible_sizes() -> None:
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(DataError, match="add up to 12 but there are only 10 examples"):
        InnerDirichlet(sizes=(6, 6)).partition(labels, 2, rng())
    with pytest.raises(ConfigError, match="was given 2 client sizes for 3 clients"):
        InnerDirichlet(sizes=(3, 3)).partition(labels, 3, rng())
    with pytest.raises(ConfigError, match="every client size must be an integer >= 1"):
        InnerDirichlet(sizes=(3, 0))
    with pytest.raises(ConfigError, match="alpha must be a number > 0"):
        InnerDirichlet(alpha=0)


# --- linear, square, exponential sizes -----------------------------------------------------


@pytest.mark.parametrize(
    ("partitioner", "n", "clients", "sizes"),
    [
        # units 1..7 (sum 28): floor(1000 i / 28), the leftover 3 to the last client
        (Linear(), 1000, 7, [35, 71, 107, 142, 178, 214, 253]),
        # units 1, 4, 9, 16 (sum 30): 3.33, 13.3, 30, 53.3 -> 3, 13, 30, 53 (+1 to the last)
        (Square(), 100, 4, [3, 13, 30, 54]),
        # units e, e^2, e^3 (sum 30.19): 9.00, 24.5, 66.5 -> 9, 24, 66 (+1 to the last)
        (Exponential(), 100, 3, [9, 24, 67]),
    ],
    ids=["linear", "square", "exponential"],
)
def test_size_skew_by_hand(partitioner, n: int, clients: int, sizes: list[int]) -> None:
    labels = np.arange(n) % 3
    part = partitioner.partition(labels, clients, rng())
    assert part.sizes().tolist() == sizes
    np.testing.assert_array_equal(np.sort(part.order), np.arange(n))


def test_size_skew_refuses_a_client_of_no_example_and_names_the_limit() -> None:
    labels = np.zeros(60_000, dtype=np.int64)
    assert Exponential().partition(labels, 11, rng()).sizes().min() == 1
    with pytest.raises(DataError, match="'exponential' with 12 clients .* use at most 11"):
        Exponential().partition(labels, 12, rng())
    with pytest.raises(DataError, match="use at most 345 clients"):
        Linear().partition(labels, 1000, rng())
    assert Linear().partition(labels, 345, rng()).sizes().min() >= 1
    assert Exponential().partition(np.zeros(5, dtype=np.int64), 1, rng()).sizes().tolist() == [5]


# --- natural --------------------------------------------------------------------------------


def test_natural_makes_one_client_per_value_in_sorted_order() -> None:
    groups = np.array(["bob", "ann", "bob", "cy", "ann", "bob"])
    natural = Natural(groups, column="writer")
    part = natural.partition(np.zeros(6, dtype=np.int64), 3, rng())
    assert [sorted(part.indices(i).tolist()) for i in range(3)] == [[1, 4], [0, 2, 5], [3]]
    assert natural.values().tolist() == ["ann", "bob", "cy"]
    with pytest.raises(DataError, match="the data hold 3 of them .* set data.num_clients = 3"):
        natural.partition(np.zeros(6, dtype=np.int64), 4, rng())
    with pytest.raises(DataError, match="'writer' has 6 values for 5 examples"):
        natural.partition(np.zeros(5, dtype=np.int64), 3, rng())


# --- your own function ----------------------------------------------------------------------


def test_function_partitioner_by_import_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_split_h4.py").write_text(
        "import numpy as np\n"
        "def by_parity(labels, num_clients, rng):\n"
        "    return [np.flatnonzero(labels % 2 == i) for i in range(num_clients)]\n"
    )
    monkeypatch.chdir(tmp_path)  # the current folder is importable
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    partitioner = make_partitioner("my_split_h4:by_parity")
    part = partitioner.partition(np.arange(7), 2, rng())
    assert [part.indices(i).tolist() for i in range(2)] == [[0, 2, 4, 6], [1, 3, 5]]
    with pytest.raises(ConfigError, match="has no 'nope'"):
        make_partitioner("my_split_h4:nope")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_h4'"):
        make_partitioner("no_such_module_h4:split")
    with pytest.raises(ConfigError, match="takes no parameters"):
        make_partitioner("my_split_h4:by_parity", alpha=1.0)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([[0, 1], [2]], "returned 2 index arrays for num_clients = 3"),
        ([[0, 1], [1], [2]], r"example 1 is given 2 times \(clients 0, 1\)"),
        ([[0], [1], [9]], "client 2 got index 9, outside 0 .. 5"),
        ([[0], [-1], [2]], "client 1 got index -1"),
        ([[0], [], [2]], "client 1 got no examples"),
        ([[0.5], [1], [2]], "give a 1-D array of integer example indices"),
        ("012", "return a list with one array"),
    ],
)
def test_function_partitioner_answers_are_checked(answer, message: str) -> None:
    partitioner = FunctionPartitioner(lambda labels, k, rng: answer, "mine:split")
    with pytest.raises(DataError, match=message):
        partitioner.partition(np.zeros(6, dtype=np.int64), 3, rng())


def test_function_partitioner_may_leave_examples_out() -> None:
    partitioner = FunctionPartitioner(lambda labels, k, rng: np.array([[4, 0], [2, 5]]))
    part = partitioner.partition(np.zeros(6, dtype=np.int64), 2, rng())
    assert [part.indices(i).tolist() for i in range(2)] == [[4, 0], [2, 5]]


def test_make_partitioner_builds_the_new_kinds() -> None:
    assert make_partitioner("pathological", classes_per_client=3) == Pathological(3)
    assert make_partitioner("inner_dirichlet", alpha=0.1) == InnerDirichlet(0.1)
    assert make_partitioner("LINEAR") == Linear()
    assert make_partitioner("square") == Square()
    assert make_partitioner("exponential") == Exponential()
    natural = make_partitioner("natural", groups=np.array([1, 1, 2]), column="site")
    assert isinstance(natural, Natural) and natural.column == "site"
    with pytest.raises(ConfigError, match="'linear' does not take alpha"):
        make_partitioner("linear", alpha=0.5)
