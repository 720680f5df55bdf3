"""Pure NumPy reductions: the running weighted mean, update checks and metric means."""

from __future__ import annotations

import numpy as np
import pytest

from pollinate.strategy.aggregators import WeightedMean
from pollinate.strategy.check import check_update
from pollinate.strategy.metrics import MetricsMean


def weighted_mean(updates, weights):
    return WeightedMean().aggregate(updates, weights)


def _updates(n: int, seed: int = 0) -> tuple[list[list[np.ndarray]], list[float]]:
    rng = np.random.default_rng(seed)
    updates = [
        [rng.standard_normal((4, 5)), rng.standard_normal(3).astype(np.float32)] for _ in range(n)
    ]
    weights = [float(w) for w in rng.integers(1, 100, size=n)]
    return updates, weights


def test_weighted_mean_equals_np_average() -> None:
    updates, weights = _updates(7)
    result = weighted_mean(updates, weights)
    for i in range(2):
        expected = np.average(np.stack([u[i] for u in updates]), axis=0, weights=weights)
        assert result[i].dtype == updates[0][i].dtype
        np.testing.assert_allclose(result[i], expected, rtol=1e-6)


def test_running_mean_equals_batch_mean_and_counts() -> None:
    updates, weights = _updates(5, seed=3)
    acc = WeightedMean().start(updates[0])
    for u, w in zip(updates, weights):
        acc.add(u, w)
    assert acc.count == 5
    assert acc.total_weight == pytest.approx(sum(weights))
    for a, b in zip(acc.result(), weighted_mean(updates, weights)):
        np.testing.assert_array_equal(a, b)


def test_zero_weight_updates_do_not_move_the_mean() -> None:
    acc = WeightedMean().start([np.zeros(3)])
    acc.add([np.ones(3)], 2.0)
    acc.add([np.full(3, 1e6)], 0.0)
    np.testing.assert_array_equal(acc.result()[0], np.ones(3))


def test_float32_accumulation_sums_in_float32() -> None:
    template = [np.zeros(4, dtype=np.float64)]
    acc64, acc32 = WeightedMean().start(template), WeightedMean(dtype="float32").start(template)
    big, small = [np.full(4, 1e8)], [np.full(4, 1.0)]
    for acc in (acc64, acc32):
        acc.add(big, 1.0)
        acc.add(small, 1.0)
        acc.add([np.full(4, -1e8)], 1.0)
    assert acc64.result()[0][0] == pytest.approx(1.0 / 3)
    assert acc32.result()[0][0] == 0.0  # 1e8 + 1 is 1e8 in float32
    assert acc32.result()[0].dtype == np.float64  # the template's dtype comes back


def test_float32_accumulation_is_close_to_float64() -> None:
    updates, weights = _updates(9, seed=5)
    acc = WeightedMean(dtype="float32").start(updates[0])
    for u, w in zip(updates, weights):
        acc.add(u, w)
    for a, b in zip(acc.result(), weighted_mean(updates, weights)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_integer_arrays_are_rounded_not_truncated() -> None:
    template = [np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.uint8)]
    acc = WeightedMean().start(template)
    acc.add([np.array([1, 2, 10]), np.array([0, 255], dtype=np.uint8)], 1)
    acc.add([np.array([2, 3, 11]), np.array([1, 254], dtype=np.uint8)], 2)
    ints, bytes_ = acc.result()
    assert ints.dtype == np.int64 and bytes_.dtype == np.uint8
    np.testing.assert_array_equal(ints, [2, 3, 11])  # 5/3, 8/3, 32/3 rounded
    np.testing.assert_array_equal(bytes_, [1, 254])  # 2/3 → 1, 763/3 → 254


def test_low_precision_updates_do_not_overflow_when_weighted() -> None:
    template = [np.zeros(2, dtype=np.float16), np.zeros(2, dtype=np.int8)]
    acc = WeightedMean().start(template)
    acc.add([np.array([100, -300], np.float16), np.array([100, -100], np.int8)], 5000)
    acc.add([np.array([200, -100], np.float16), np.array([120, -120], np.int8)], 5000)
    half, small = acc.result()
    np.testing.assert_array_equal(half, np.array([150, -200], np.float16))
    np.testing.assert_array_equal(small, np.array([110, -110], np.int8))


def test_complex_and_bool_arrays() -> None:
    template = [np.zeros(2, dtype=np.complex64), np.zeros(2, dtype=bool)]
    acc = WeightedMean().start(template)
    acc.add([np.array([1 + 1j, 2], dtype=np.complex64), np.array([True, True])], 3)
    acc.add([np.array([1 - 1j, 0], dtype=np.complex64), np.array([False, True])], 1)
    c, b = acc.result()
    np.testing.assert_allclose(c, [1 + 0.5j, 1.5])
    assert c.dtype == np.complex64
    np.testing.assert_array_equal(b, [True, True])


def test_weight_must_be_finite_and_non_negative() -> None:
    acc = WeightedMean().start([np.zeros(2)])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            acc.add([np.ones(2)], bad)
    with pytest.raises(ValueError, match="positive weight"):
        acc.result()
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([], [])


def test_check_update_reasons() -> None:
    template = [np.zeros((2, 3), np.float32), np.zeros(4, np.int64)]
    ok = [np.ones((2, 3), np.float32), np.ones(4, np.int64)]
    assert check_update(template, ok) is None
    cases = {
        "expected 2 arrays, got 1": ok[:1],
        "array 0 is list, not a NumPy array": [[1.0], ok[1]],
        "array 0 has shape (3, 2), expected (2, 3)": [np.ones((3, 2), np.float32), ok[1]],
        "array 0 has dtype float64, expected float32": [np.ones((2, 3)), ok[1]],
        "array 1 has dtype int32, expected int64": [ok[0], np.ones(4, np.int32)],
    }
    for reason, update in cases.items():
        assert check_update(template, update) == reason
    for bad in (np.nan, np.inf, -np.inf):
        update = [ok[0].copy(), ok[1]]
        update[0][1, 2] = bad
        assert check_update(template, update) == "array 0 holds NaN or infinite values"


def test_check_update_accepts_an_empty_model() -> None:
    assert check_update([], []) is None
    assert check_update([np.zeros(0)], [np.zeros(0)]) is None


def test_metrics_mean_is_example_weighted_and_skips_non_numeric() -> None:
    mean = MetricsMean()
    mean.add({"loss": 1.0, "accuracy": 0.5, "name": "a", "flag": True}, 1)
    mean.add({"loss": 3.0, "accuracy": np.float32(1.0), "bad": float("nan")}, 3)
    mean.add({"only_here": 7}, 2)
    result = mean.result()
    assert result == {"loss": pytest.approx(2.5), "accuracy": pytest.approx(0.875), "only_here": 7}
    assert MetricsMean().result() == {}
