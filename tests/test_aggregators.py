"""Aggregators: each rule against hand-computed cases, then one contract for all of them."""

from __future__ import annotations

import numpy as np
import pytest

from pollinate.errors import ConfigError, UpdateRejected
from pollinate.strategy import aggregators
from pollinate.strategy.aggregators import (
    AGGREGATORS,
    Aggregator,
    Bulyan,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
    WeightedMean,
    make_aggregator,
    squared_distances,
)

# Five clients, one array of three values; client 5 is an outlier.
FIVE = [
    [np.array([1.0, 10.0, -2.0])],
    [np.array([2.0, 12.0, 0.0])],
    [np.array([3.0, 11.0, 1.0])],
    [np.array([4.0, 13.0, 5.0])],
    [np.array([100.0, -50.0, 3.0])],
]


def test_weighted_mean_by_hand() -> None:
    # weights 1..5: (1·1 + 2·2 + 3·3 + 4·4 + 5·100) / 15 = 530/15, and so on
    result = WeightedMean().aggregate(FIVE, [1, 2, 3, 4, 5])
    expected = [530 / 15, (10 + 24 + 33 + 52 - 250) / 15, (-2 + 0 + 3 + 20 + 15) / 15]
    np.testing.assert_allclose(result[0], expected, rtol=1e-15)


def test_median_by_hand() -> None:
    # sorted columns: [1 2 3 4 100], [-50 10 11 12 13], [-2 0 1 3 5]; weights do not count
    result = Median().aggregate(FIVE, [1, 1, 1, 1, 50])
    np.testing.assert_array_equal(result[0], [3.0, 11.0, 1.0])
    # an even count averages the two middle values: [1 2 3 4] → 2.5
    np.testing.assert_array_equal(Median().aggregate(FIVE[:4], [1] * 4)[0], [2.5, 11.5, 0.5])


def test_trimmed_mean_by_hand() -> None:
    # β = 0.2, n = 5: drop ⌊1⌋ largest and smallest per column: mean(2 3 4), mean(10 11 12),
    # mean(0 1 3)
    result = TrimmedMean(beta=0.2).aggregate(FIVE, [1] * 5)
    np.testing.assert_allclose(result[0], [3.0, 11.0, 4 / 3], rtol=1e-15)
    # β = 0.19: ⌊0.95⌋ = 0, nothing dropped: the unweighted mean
    np.testing.assert_allclose(
        TrimmedMean(beta=0.19).aggregate(FIVE, [1, 2, 3, 4, 5])[0], [22.0, -0.8, 1.4], rtol=1e-14
    )


def test_trim_count_is_rounded_before_the_floor() -> None:
    # 0.29 · 100 is 28.999999999999996 in floating point: 29 values are trimmed on each side
    updates = [[np.array([float(i)])] for i in range(100)]
    result = TrimmedMean(beta=0.29).aggregate(updates, [1] * 100)
    assert result[0][0] == pytest.approx(np.mean(np.arange(29, 71)))


# Squared distances between the five clients:
#   d12 = 1+4+4 = 9      d13 = 4+1+9 = 14    d14 = 9+9+49 = 67    d15 = 9801+3600+25 = 13426
#   d23 = 1+1+1 = 3      d24 = 4+1+25 = 30   d25 = 9604+3844+9 = 13457
#   d34 = 1+4+16 = 21    d35 = 9409+3721+4 = 13134
#   d45 = 9216+3969+4 = 13189
# Krum f=1: each score sums the n−f−2 = 2 smallest: 1: 9+14 = 23, 2: 3+9 = 12, 3: 3+14 = 17,
# 4: 21+30 = 51, 5: 13134+13189 = 26323.


def test_squared_distances_by_hand() -> None:
    rows = np.stack([u[0] for u in FIVE])
    dist = squared_distances(rows)
    assert dist[0, 1] == dist[1, 0] == pytest.approx(9)
    assert dist[2, 3] == pytest.approx(21)
    assert dist[3, 4] == pytest.approx(13189)
    np.testing.assert_array_equal(np.diag(dist), 0.0)


def test_krum_by_hand() -> None:
    # the lowest score is client 2's (12): its update comes back unchanged
    result = Krum(num_malicious=1).aggregate(FIVE, [1, 1, 1, 1, 1000])
    np.testing.assert_array_equal(result[0], FIVE[1][0])


def test_multikrum_by_hand() -> None:
    # m = 3 best scores: clients 2 (12), 3 (17), 1 (23); weighted by 1, 2, 3:
    # (1·[1 10 -2] + 2·[2 12 0] + 3·[3 11 1]) / 6 = [14 67 1] / 6
    result = MultiKrum(num_malicious=1, num_selected=3).aggregate(FIVE, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(result[0], np.array([14.0, 67.0, 1.0]) / 6, rtol=1e-15)
    # the default m = n − f = 4 drops only client 5
    result = MultiKrum(num_malicious=1).aggregate(FIVE, [1, 1, 1, 1, 1])
    np.testing.assert_allclose(result[0], [2.5, 11.5, 1.0], rtol=1e-15)


def test_bulyan_by_hand() -> None:
    # Seven clients u = [a, -2a] with a = 0 1 3 7 12 21 1000 (the last one malicious), f = 1:
    # θ = n − 2f = 5 selected by Krum, β = θ − 2f = 3 kept per coordinate. Distances are
    # 5·(a_i − a_j)², so Krum ranks as on a alone (written unscaled here):
    #  1) 4 closest of all 7: 0: 1+9+49+144 = 203, 1: 1+4+36+121 = 162,
    #     3: 4+9+16+81 = 110, 7: 16+25+36+49 = 126, 12: 25+81+81+121 = 308, 21: 1001 → 3
    #  2) 3 closest of {0 1 7 12 21 1000}: 0: 194, 1: 158, 7: 25+36+49 = 110, 12: 227 → 7
    #  3) 2 closest of {0 1 12 21 1000}: 0: 1+144 = 145, 1: 1+121 = 122, 12: 202 → 1
    #  4) 1 closest of {0 12 21 1000}: 0: 144, 12: 81, 21: 81; the tie goes to the lower sum
    #     of all distances: 12: 144+81+988² = 976369, 21: 441+81+979² = 958963 → 21
    #  5) 1 closest of {0 12 1000}: 0: 144, 12: 144; sums 0: 144+1000² = 1000144,
    #     12: 144+988² = 976288 → 12
    # S = {1 3 7 12 21}: median 7; the 3 values closest to it are 7, 12, 3 → mean 22/3; the
    # second coordinate: -44/3. The attacker never enters S.
    a = [0.0, 1.0, 3.0, 7.0, 12.0, 21.0, 1000.0]
    updates = [[np.array([x, -2 * x])] for x in a]
    result = Bulyan(num_malicious=1).aggregate(updates, [1] * 7)
    np.testing.assert_allclose(result[0], [22 / 3, -44 / 3], rtol=1e-15)
    # the tie-breaks do not depend on the order the updates arrived in
    rng = np.random.default_rng(0)
    for _ in range(50):
        perm = rng.permutation(7)
        shuffled = Bulyan(num_malicious=1).aggregate([updates[i] for i in perm], [1] * 7)
        np.testing.assert_allclose(shuffled[0], [22 / 3, -44 / 3], rtol=1e-15)


def test_krum_equals_its_definition_with_loops() -> None:
    rng = np.random.default_rng(3)
    updates = [[rng.normal(size=(3, 2)), rng.normal(size=4)] for _ in range(9)]
    flat = [np.concatenate([a.ravel() for a in u]) for u in updates]
    f = 2
    scores = []
    for i, x in enumerate(flat):
        d = sorted(float(np.sum((x - y) ** 2)) for j, y in enumerate(flat) if j != i)
        scores.append(sum(d[: len(flat) - f - 2]))
    best = int(np.argmin(scores))
    result = Krum(num_malicious=f).aggregate(updates, [1.0] * 9)
    for got, want in zip(result, updates[best]):
        np.testing.assert_array_equal(got, want)


def test_degenerate_parameters_give_the_mean() -> None:
    rng = np.random.default_rng(4)
    updates = [[rng.normal(size=5)] for _ in range(7)]
    weights = [float(w) for w in rng.integers(1, 9, size=7)]
    unweighted = np.mean([u[0] for u in updates], axis=0)
    weighted = np.average([u[0] for u in updates], axis=0, weights=weights)
    np.testing.assert_allclose(TrimmedMean(beta=0).aggregate(updates, weights)[0], unweighted)
    np.testing.assert_allclose(Bulyan(num_malicious=0).aggregate(updates, weights)[0], unweighted)
    multikrum = MultiKrum(num_malicious=0, num_selected=7)
    np.testing.assert_allclose(multikrum.aggregate(updates, weights)[0], weighted)


def test_integer_arrays_are_rounded() -> None:
    updates = [[np.array([1, 4], dtype=np.int32)], [np.array([2, 7], dtype=np.int32)]]
    result = Median().aggregate(updates, [1, 1])
    assert result[0].dtype == np.int32
    np.testing.assert_array_equal(result[0], [2, 6])  # rint(1.5) = 2, rint(5.5) = 6


def test_float32_storage_is_close_to_float64() -> None:
    rng = np.random.default_rng(5)
    updates = [[rng.normal(size=(20,))] for _ in range(12)]
    for cls in (Median, TrimmedMean, Bulyan):
        wide = cls().aggregate(updates, [1] * 12)
        narrow = cls(dtype="float32").aggregate(updates, [1] * 12)
        assert narrow[0].dtype == np.float64  # the template's dtype comes back
        np.testing.assert_allclose(narrow[0], wide[0], rtol=1e-6, atol=1e-6)


def test_float32_values_in_float32_storage_give_the_float64_result_exactly() -> None:
    """Sorting float32 values orders them as their (exact) float64 widening would, and the
    sums taken afterwards are in float64: storing float32-representable updates in float32
    changes nothing, bit for bit (a float32 sum or mean would differ in the last bits).
    The updates are float64 arrays, so the result comes back unrounded."""
    rng = np.random.default_rng(6)
    for n in (11, 12):
        updates = [
            [(rng.normal(size=(3000,)) * 1e3).astype(np.float32).astype(np.float64)]
            for _ in range(n)
        ]
        for cls in (Median, TrimmedMean, Bulyan):
            wide = cls().aggregate(updates, [1] * n)
            narrow = cls(dtype="float32").aggregate(updates, [1] * n)
            np.testing.assert_array_equal(narrow[0], wide[0])


def test_weighted_mean_keeps_the_old_semantics() -> None:
    template = [np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.uint8)]
    acc = WeightedMean().start(template)
    acc.add([np.array([1, 2, 10]), np.array([0, 255], dtype=np.uint8)], 1)
    acc.add([np.array([2, 3, 11]), np.array([1, 254], dtype=np.uint8)], 2)
    assert acc.count == 2 and acc.total_weight == 3.0
    ints, bytes_ = acc.result()
    assert ints.dtype == np.int64 and bytes_.dtype == np.uint8
    np.testing.assert_array_equal(ints, [2, 3, 11])  # 5/3, 8/3, 32/3 rounded
    np.testing.assert_array_equal(bytes_, [1, 254])  # 2/3 → 1, 763/3 → 254
    zero = WeightedMean().start([np.zeros(2)])
    zero.add([np.ones(2)], 0)
    with pytest.raises(ValueError, match="total weight is 0"):
        zero.result()
    # float32 accumulation: 1e8 + 1 is 1e8 in float32
    acc32 = WeightedMean(dtype="float32").start([np.zeros(1)])
    for value in (1e8, 1.0, -1e8):
        acc32.add([np.array([value])], 1.0)
    assert acc32.result()[0][0] == 0.0


# -- the contract every aggregator meets ---------------------------------------------------

# Each aggregator, configured to accept the eleven updates of the contract.
CONTRACT: dict[str, Aggregator] = {
    "mean": WeightedMean(),
    "median": Median(),
    "trimmed_mean": TrimmedMean(beta=0.2),
    "krum": Krum(num_malicious=2),
    "multikrum": MultiKrum(num_malicious=2, num_selected=5),
    "bulyan": Bulyan(num_malicious=2),
    "median_float32": Median(dtype="float32"),
}


def test_contract_covers_every_aggregator() -> None:
    assert set(AGGREGATORS) <= set(CONTRACT)


@pytest.fixture(params=sorted(CONTRACT))
def agg(request: pytest.FixtureRequest) -> Aggregator:
    return CONTRACT[request.param]


def _template() -> list[np.ndarray]:
    return [
        np.zeros((3, 4), dtype=np.float32),
        np.zeros(5, dtype=np.float64),
        np.zeros(2, dtype=np.int64),
    ]


def _updates(n: int = 11, seed: int = 0) -> tuple[list[list[np.ndarray]], list[float]]:
    rng = np.random.default_rng(seed)
    updates = [
        [
            rng.normal(size=(3, 4)).astype(np.float32),
            rng.normal(size=5),
            rng.integers(-50, 50, size=2),
        ]
        for _ in range(n)
    ]
    return updates, [float(w) for w in rng.integers(1, 100, size=n)]


def test_contract_shapes_and_dtypes_are_the_templates(agg: Aggregator) -> None:
    updates, weights = _updates()
    result = agg.aggregate(updates, weights)
    assert [(a.shape, a.dtype) for a in result] == [(a.shape, a.dtype) for a in _template()]


def test_contract_streaming_equals_standalone(agg: Aggregator) -> None:
    updates, weights = _updates(seed=1)
    acc = agg.start(_template())  # no capacity hint: the robust rules grow their matrix
    for u, w in zip(updates, weights):
        acc.add(u, w)
    assert acc.count == 11 and acc.total_weight == pytest.approx(sum(weights))
    for a, b in zip(acc.result(), agg.aggregate(updates, weights)):
        np.testing.assert_array_equal(a, b)


def test_contract_order_of_updates_does_not_matter(agg: Aggregator) -> None:
    updates, weights = _updates(seed=2)
    expected = agg.aggregate(updates, weights)
    for perm in (list(range(10, -1, -1)), list(np.random.default_rng(9).permutation(11))):
        result = agg.aggregate([updates[i] for i in perm], [weights[i] for i in perm])
        for a, b in zip(result, expected):  # only float rounding of weighted sums may differ
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_contract_identical_updates_give_that_update(agg: Aggregator) -> None:
    update = _updates(1, seed=3)[0][0]
    result = agg.aggregate([update] * 11, [float(w) for w in range(1, 12)])
    rtol = 1e-7 if agg.describe()["dtype"] == "float32" else 1e-12  # float32 storage rounds
    for a, b in zip(result, update):
        np.testing.assert_allclose(a, b, rtol=rtol)


def test_contract_blocks_do_not_change_the_result(
    agg: Aggregator, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates, weights = _updates(seed=4)
    expected = agg.aggregate(updates, weights)
    monkeypatch.setattr(aggregators, "_BLOCK_ELEMENTS", 30)  # blocks of two or three columns
    for a, b in zip(agg.aggregate(updates, weights), expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_contract_wrong_shapes_are_rejected_by_name(agg: Aggregator) -> None:
    acc = agg.start(_template())
    with pytest.raises(UpdateRejected, match=r"array 1 has shape \(1,\), expected \(5,\)"):
        acc.add([np.zeros((3, 4)), np.zeros(1), np.zeros(2)], 1.0)
    with pytest.raises(UpdateRejected, match="2 arrays, expected 3"):
        acc.add([np.zeros((3, 4)), np.zeros(5)], 1.0)
    with pytest.raises(UpdateRejected, match="array 0 has shape"):
        acc.add([np.zeros((4, 3)), np.zeros(5), np.zeros(2)], 1.0)  # same size, other shape
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(UpdateRejected, match="weight must be finite"):
            acc.add(_updates(1)[0][0], bad)
    assert acc.count == 0


def test_contract_describe_rebuilds_the_aggregator(agg: Aggregator) -> None:
    rebuilt = make_aggregator(**agg.describe())
    assert type(rebuilt) is type(agg) and rebuilt.describe() == agg.describe()
    updates, weights = _updates(seed=5)
    for a, b in zip(rebuilt.aggregate(updates, weights), agg.aggregate(updates, weights)):
        np.testing.assert_array_equal(a, b)


def test_only_the_mean_is_sum_based() -> None:
    assert {name for name, cls in AGGREGATORS.items() if cls.sum_based} == {"mean"}


# -- robustness ------------------------------------------------------------------------------


def test_one_huge_update_moves_only_the_mean() -> None:
    rng = np.random.default_rng(6)
    honest = [[1.0 + 0.1 * rng.normal(size=20)] for _ in range(9)]
    attack = [1e6 * honest[0][0]]
    updates, weights = [*honest, attack], [1.0] * 10
    honest_mean = np.mean([u[0] for u in honest], axis=0)
    robust = [Median(), TrimmedMean(beta=0.1), Krum(1), MultiKrum(1), Bulyan(1)]
    for agg in robust:
        result = agg.aggregate(updates, weights)[0]
        assert np.abs(result - honest_mean).max() < 0.3, agg
    assert np.abs(WeightedMean().aggregate(updates, weights)[0] - honest_mean).max() > 1e4


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agg", "n", "needs"),
    [
        (Krum(num_malicious=2), 6, "n > 2f \\+ 2 = 6"),
        (MultiKrum(num_malicious=1), 4, "n > 2f \\+ 2 = 4"),
        (Bulyan(num_malicious=1), 6, "n >= 4f \\+ 3 = 7"),
        (Bulyan(num_malicious=2), 10, "n >= 4f \\+ 3 = 11"),
    ],
)
def test_too_few_updates_for_the_assumed_attackers(agg: Aggregator, n: int, needs: str) -> None:
    updates, weights = _updates(n)
    f = agg.describe()["num_malicious"]
    with pytest.raises(ConfigError, match=rf"f={f}.*{needs}.*n={n}"):
        agg.aggregate(updates, weights)


def test_multikrum_cannot_select_more_than_it_has() -> None:
    with pytest.raises(ConfigError, match="num_selected m=8 exceeds the n=7"):
        MultiKrum(num_malicious=1, num_selected=8).aggregate(*_updates(7))


def test_make_aggregator_names_choices_and_parameters() -> None:
    assert isinstance(make_aggregator("trimmed_mean", beta=0.3), TrimmedMean)
    with pytest.raises(ConfigError, match="mean, median, trimmed_mean, krum, multikrum, bulyan"):
        make_aggregator("average")
    with pytest.raises(ConfigError, match="no parameter 'f'; its parameters are: num_malicious"):
        make_aggregator("krum", f=2)
    bad = [
        ("trimmed_mean", {"beta": 0.5}),
        ("krum", {"num_malicious": -1}),
        ("multikrum", {"num_selected": 0}),
        ("median", {"dtype": "float16"}),
    ]
    for name, params in bad:
        with pytest.raises(ConfigError):
            make_aggregator(name, **params)


def test_robust_rules_refuse_complex_arrays() -> None:
    with pytest.raises(ConfigError, match="array 0 is complex128.*'mean'"):
        Median().start([np.zeros(2, dtype=complex)])
    # the mean keeps complex sums
    result = WeightedMean().aggregate([[np.array([1 + 1j])], [np.array([3 + 1j])]], [1, 1])
    np.testing.assert_array_equal(result[0], [2 + 1j])


def test_empty_input_is_an_error() -> None:
    for agg in (WeightedMean(), Median()):
        with pytest.raises(ValueError, match="no updates"):
            agg.aggregate([], [])
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        Median().aggregate(_updates(2)[0], [1.0])
