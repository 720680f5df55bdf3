"""Strategies: one contract every strategy meets, then FedAvg's own behaviour."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pollinate.errors import ConfigError, RoundFailedError
from pollinate.privacy import CentralDP
from pollinate.strategy.base import Strategy
from pollinate.strategy.fedavg import FedAvg
from pollinate.types import Arrays, EvaluateIns, EvaluateRes, Outcome, TrainIns, TrainRes

# Every strategy joins the contract below by adding a factory here. The factory gets the
# minimum client counts; the strategy must accept a round with that many clients.
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": lambda **kw: FedAvg(seed=7, **kw),
    # DP-FedAvg around FedAvg; no noise, so that unchanged updates leave the model unchanged
    "central_dp": lambda **kw: CentralDP(
        FedAvg(seed=7, **kw),
        noise_multiplier=0.0,
        clip=10.0,
        num_clients=20,
        clients_per_round=20,
        seed=7,
    ),
}


def _model() -> Arrays:
    return [np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.arange(2, dtype=np.int64)]


def _train_ok(cid: int, arrays: Arrays, n: int = 1, **metrics: float) -> Outcome:
    return Outcome(cid, "train", result=TrainRes([a.copy() for a in arrays], n, dict(metrics)))


def _eval_ok(cid: int, loss: float, n: int, **metrics: float) -> Outcome:
    return Outcome(cid, "evaluate", result=EvaluateRes(loss, n, dict(metrics)))


# -- the contract every strategy meets ---------------------------------------------------


@pytest.fixture(params=sorted(STRATEGIES))
def make(request: pytest.FixtureRequest) -> Callable[..., Strategy]:
    factory = STRATEGIES[request.param]
    return lambda: factory(min_train_clients=1, min_available_clients=1, min_evaluate_clients=1)


def test_contract_configure_train_plans_distinct_known_clients(make) -> None:
    strategy, arrays, clients = make(), _model(), list(range(100, 120))
    plan = strategy.configure_train(1, arrays, clients)
    assert plan, "a strategy must pick at least one client"
    cids = [cid for cid, _ in plan]
    assert len(set(cids)) == len(cids) and set(cids) <= set(clients)
    for _, ins in plan:
        assert isinstance(ins, TrainIns)
        assert [a.shape for a in ins.arrays] == [a.shape for a in arrays]
        assert ins.config["round"] == 1
    assert [c for c, _ in make().configure_train(1, arrays, clients)] == cids  # reproducible
    assert strategy.round_timeout_s > 0


def test_contract_unchanged_updates_leave_the_model_unchanged(make) -> None:
    strategy, arrays = make(), _model()
    plan = strategy.configure_train(1, arrays, range(6))
    outcomes = [_train_ok(cid, arrays, n=cid + 1) for cid, _ in plan]
    summary = strategy.aggregate_train(1, arrays, iter(outcomes))
    assert summary.clients == len(plan) and not summary.failures
    for a, b in zip(summary.arrays, arrays):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_contract_bad_updates_are_rejected_and_recorded(make) -> None:
    strategy, arrays = make(), _model()
    nan = [np.full_like(arrays[0], np.nan), arrays[1]]
    outcomes = [
        _train_ok(0, arrays),
        _train_ok(1, nan),
        Outcome(2, "train", error="timeout: still running at the round deadline"),
        Outcome(3, "train", error="RuntimeError: boom"),
    ]
    summary = strategy.aggregate_train(1, arrays, outcomes)
    assert summary.clients == 1
    kinds = {f.client_id: f.kind for f in summary.failures}
    assert kinds == {1: "rejected", 2: "timeout", 3: "error"}
    assert all(np.isfinite(a).all() for a in summary.arrays)


def test_contract_round_fails_when_no_update_is_accepted(make) -> None:
    strategy, arrays = make(), _model()
    with pytest.raises(RoundFailedError):
        strategy.aggregate_train(1, arrays, [Outcome(0, "train", error="RuntimeError: x")])
    with pytest.raises(RoundFailedError):
        strategy.aggregate_train(1, arrays, [])


def test_contract_evaluation(make) -> None:
    strategy, arrays = make(), _model()
    plan = strategy.configure_evaluate(1, arrays, range(5))
    assert all(isinstance(ins, EvaluateIns) for _, ins in plan)
    assert strategy.aggregate_evaluate(1, []) is None
    summary = strategy.aggregate_evaluate(1, [_eval_ok(0, 2.0, 1), _eval_ok(1, 4.0, 3)])
    assert summary is not None and summary.loss == pytest.approx(3.5)


# -- FedAvg: sampling ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "minimum", "available", "expected"),
    [
        (1.0, 2, 10, 10),
        (0.3, 2, 10, 3),
        (0.3, 2, 4, 2),  # ceil(1.2) = 2
        (0.1, 5, 20, 5),  # the minimum wins
        (0.5, 50, 20, 20),  # never more than are available
        (0.07, 1, 100, 7),  # 0.07 * 100 is 7.000000000000001 in floating point
        (0.14, 1, 50, 7),
        (1e-5, 2, 1_000_000, 10),
    ],
)
def test_fedavg_samples_fraction_with_minimum(
    fraction: float, minimum: int, available: int, expected: int
) -> None:
    strategy = FedAvg(fraction_train=fraction, min_train_clients=minimum)
    plan = strategy.configure_train(1, _model(), range(available))
    cids = [cid for cid, _ in plan]
    assert len(cids) == expected
    assert len(set(cids)) == expected and all(0 <= c < available for c in cids)


def test_fedavg_sampling_is_seeded_and_differs_between_rounds() -> None:
    def picks(seed: int, round_number: int) -> list[int]:
        plan = FedAvg(fraction_train=0.1, seed=seed).configure_train(
            round_number, _model(), range(200)
        )
        return [cid for cid, _ in plan]

    assert picks(0, 1) == picks(0, 1)
    assert picks(0, 1) != picks(0, 2)
    assert picks(0, 1) != picks(1, 1)
    assert len({tuple(picks(0, r)) for r in range(1, 11)}) == 10


def test_fedavg_samples_clients_by_id_not_position() -> None:
    clients = [10 * i for i in range(50)]
    plan = FedAvg(fraction_train=0.2).configure_train(1, _model(), clients)
    assert {cid for cid, _ in plan} <= set(clients)


def test_fedavg_min_available_clients() -> None:
    strategy = FedAvg(min_available_clients=3, min_train_clients=1)
    with pytest.raises(RoundFailedError, match="min_available_clients=3"):
        strategy.configure_train(1, _model(), range(2))
    assert len(strategy.configure_train(1, _model(), range(3))) == 3


def test_fedavg_sampling_a_million_clients_allocates_nothing_per_client() -> None:
    strategy = FedAvg(fraction_train=2e-6, fraction_evaluate=3e-6)
    clients = range(1_000_000)
    tracemalloc.start()
    try:
        train = strategy.configure_train(4, _model(), clients)
        evaluate = strategy.configure_evaluate(4, _model(), clients)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(train) == 2 and len(evaluate) == 3
    assert peak < 1_000_000  # a list or permutation of a million ids would be 8 MB or more


def test_fedavg_evaluation_fraction_zero_skips_evaluation() -> None:
    assert FedAvg(fraction_evaluate=0.0).configure_evaluate(1, _model(), range(10)) == []


# -- FedAvg: configuration ------------------------------------------------------------------


def test_fedavg_config_dict_and_callable() -> None:
    base = {"lr": 0.1, "epochs": 2}
    strategy = FedAvg(train_config=base, evaluate_config=lambda r: {"batch": 8 * r})
    (_, ins), *_ = strategy.configure_train(3, _model(), range(2))
    assert ins.config == {"lr": 0.1, "epochs": 2, "round": 3}
    assert base == {"lr": 0.1, "epochs": 2}  # the caller's dict is not changed
    (_, eins), *_ = strategy.configure_evaluate(3, _model(), range(2))
    assert eins.config == {"batch": 24, "round": 3}


def test_fedavg_config_callable_sees_each_round() -> None:
    strategy = FedAvg(train_config=lambda r: {"lr": 1.0 / r})
    lrs = [strategy.configure_train(r, _model(), range(2))[0][1].config["lr"] for r in (1, 2, 4)]
    assert lrs == [1.0, 0.5, 0.25]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction_train": 1.5},
        {"fraction_train": 0.0},
        {"fraction_evaluate": -0.1},
        {"min_train_clients": -1},
        {"min_available_clients": -1},
        {"min_evaluate_clients": -2},
        {"round_timeout_s": 0},
        {"accumulate_dtype": "float16"},
    ],
)
def test_fedavg_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        FedAvg(**kwargs)


# -- FedAvg: aggregation ----------------------------------------------------------------------


def test_fedavg_aggregate_is_the_example_weighted_mean() -> None:
    arrays = _model()
    outcomes = [
        _train_ok(cid, [np.full((3, 4), cid, np.float32), np.array([cid, 2 * cid])], n)
        for cid, n in [(1, 10), (2, 30), (5, 60)]
    ]
    summary = FedAvg().aggregate_train(1, arrays, iter(outcomes))
    expected = (1 * 10 + 2 * 30 + 5 * 60) / 100
    np.testing.assert_allclose(summary.arrays[0], np.full((3, 4), expected), rtol=1e-6)
    assert summary.arrays[0].dtype == np.float32
    np.testing.assert_array_equal(summary.arrays[1], [4, 7])  # 3.7, 7.4 rounded
    assert summary.clients == 3
    assert summary.per_client == {1: (10, {}), 2: (30, {}), 5: (60, {})}


def test_fedavg_metrics_are_weighted_by_examples() -> None:
    arrays = _model()
    outcomes = [
        _train_ok(0, arrays, 1, loss=1.0, accuracy=0.0),
        _train_ok(1, arrays, 3, loss=3.0, accuracy=1.0),
    ]
    summary = FedAvg().aggregate_train(1, arrays, outcomes)
    assert summary.metrics == {"loss": pytest.approx(2.5), "accuracy": pytest.approx(0.75)}
    assert summary.per_client[1] == (3, {"loss": 3.0, "accuracy": 1.0})


def _bad_outcomes(arrays: Arrays) -> dict[int, tuple[Outcome, str]]:
    f, i = arrays

    def train(cid: int, res: object) -> Outcome:
        return Outcome(cid, "train", result=res)  # type: ignore[arg-type]

    return {
        10: (train(10, TrainRes([np.full_like(f, np.nan), i], 5)), "NaN"),
        11: (train(11, TrainRes([np.full_like(f, np.inf), i], 5)), "infinite"),
        12: (train(12, TrainRes([np.zeros((4, 3), f.dtype), i], 5)), "shape (4, 3)"),
        13: (train(13, TrainRes([f.astype(np.float64), i], 5)), "dtype float64"),
        14: (train(14, TrainRes([f], 5)), "expected 2 arrays"),
        15: (train(15, EvaluateRes(0.1, 5)), "returned EvaluateRes, expected TrainRes"),
        16: (train(16, {"arrays": arrays}), "returned dict"),
        17: (train(17, TrainRes([f, i], -1)), "num_examples must be an int >= 0, got -1"),
        18: (train(18, TrainRes([f, i], 2.5)), "num_examples must be an int"),  # type: ignore[arg-type]
        19: (train(19, TrainRes([f, i], True)), "num_examples"),
        20: (train(20, TrainRes(None, 3)), "arrays must be a list"),  # type: ignore[arg-type]
        21: (train(21, TrainRes([f, i], 3, None)), "metrics must be a dict"),  # type: ignore[arg-type]
        22: (train(22, None), "returned NoneType"),
    }


def test_fedavg_rejects_bad_updates_with_client_id_and_reason() -> None:
    arrays = _model()
    bad = _bad_outcomes(arrays)
    good = [_train_ok(0, [np.ones_like(arrays[0]), arrays[1]], 2), _train_ok(1, arrays, 2)]
    outcomes = [good[0], *(o for o, _ in bad.values()), good[1]]
    summary = FedAvg().aggregate_train(1, arrays, outcomes)
    assert summary.clients == 2
    assert set(summary.per_client) == {0, 1}
    np.testing.assert_allclose(summary.arrays[0], (1 + arrays[0]) / 2)  # bad ones left out
    failures = {f.client_id: f for f in summary.failures}
    assert set(failures) == set(bad)
    for cid, (_, reason) in bad.items():
        assert failures[cid].kind == "rejected"
        assert failures[cid].task == "train"
        assert reason in failures[cid].reason, (cid, failures[cid].reason)


def test_fedavg_failed_and_timed_out_outcomes_are_recorded() -> None:
    arrays = _model()
    outcomes = [
        _train_ok(0, arrays),
        _train_ok(1, arrays),
        Outcome(2, "train", error="timeout: still running at the round deadline"),
        Outcome(3, "train", error="worker process died (exit code 3)"),
    ]
    summary = FedAvg().aggregate_train(1, arrays, outcomes)
    assert [(f.client_id, f.kind) for f in summary.failures] == [(2, "timeout"), (3, "error")]
    assert "exit code 3" in summary.failures[1].reason


def test_fedavg_round_fails_below_min_train_clients_naming_clients() -> None:
    arrays = _model()
    outcomes = [
        _train_ok(0, arrays),
        Outcome(4, "train", error="RuntimeError: client 4 exploded"),
        _train_ok(7, [np.full_like(arrays[0], np.nan), arrays[1]]),
    ]
    with pytest.raises(RoundFailedError) as info:
        FedAvg(min_train_clients=2).aggregate_train(3, arrays, outcomes)
    message = str(info.value)
    assert "round 3" in message and "only 1 client updates" in message
    assert "min_train_clients=2" in message
    assert "client 4: RuntimeError: client 4 exploded" in message
    assert "client 7: update rejected" in message
    assert FedAvg(min_train_clients=1).aggregate_train(3, arrays, outcomes).clients == 1


def test_fedavg_round_fails_when_all_weights_are_zero() -> None:
    arrays = _model()
    with pytest.raises(RoundFailedError):
        FedAvg().aggregate_train(1, arrays, [_train_ok(0, arrays, 0), _train_ok(1, arrays, 0)])


def test_fedavg_float32_accumulation_option() -> None:
    arrays = [np.zeros(3, np.float64)]
    outcomes = [
        _train_ok(0, [np.full(3, 1e8)], 1),
        _train_ok(1, [np.full(3, 1.0)], 1),
        _train_ok(2, [np.full(3, -1e8)], 1),
    ]
    exact = FedAvg().aggregate_train(1, arrays, outcomes).arrays[0]
    rough = FedAvg(accumulate_dtype="float32").aggregate_train(1, arrays, outcomes).arrays[0]
    np.testing.assert_allclose(exact, 1 / 3)
    np.testing.assert_array_equal(rough, 0.0)


def test_fedavg_aggregates_a_stream_one_outcome_at_a_time() -> None:
    arrays = _model()
    seen: list[int] = []

    def stream() -> Iterator[Outcome]:
        for cid in range(5):
            seen.append(cid)
            yield _train_ok(cid, arrays, 1)

    assert FedAvg().aggregate_train(1, arrays, stream()).clients == 5
    assert seen == list(range(5))


def test_fedavg_aggregate_evaluate() -> None:
    outcomes = [
        _eval_ok(0, 1.0, 1, accuracy=0.5),
        _eval_ok(1, 2.0, 3, accuracy=1.0),
        Outcome(2, "evaluate", error="RuntimeError: boom"),
        _eval_ok(3, float("nan"), 2),
        Outcome(4, "evaluate", result=EvaluateRes(None, 2)),  # type: ignore[arg-type]
    ]
    summary = FedAvg(min_evaluate_clients=2).aggregate_evaluate(1, outcomes)
    assert summary is not None
    assert summary.loss == pytest.approx((1.0 + 6.0) / 4)
    assert summary.metrics == {"accuracy": pytest.approx(0.875)}
    assert summary.clients == 2
    assert summary.per_client == {0: (1.0, {"accuracy": 0.5}), 1: (2.0, {"accuracy": 1.0})}
    assert {f.client_id: f.kind for f in summary.failures} == {
        2: "error",
        3: "rejected",
        4: "rejected",
    }


def test_fedavg_aggregate_evaluate_below_minimum_is_none() -> None:
    strategy = FedAvg(min_evaluate_clients=3)
    assert strategy.aggregate_evaluate(1, [_eval_ok(0, 1.0, 1), _eval_ok(1, 1.0, 1)]) is None
    assert strategy.aggregate_evaluate(1, []) is None
    assert FedAvg().aggregate_evaluate(1, [_eval_ok(0, 1.0, 0), _eval_ok(1, 1.0, 0)]) is None


def test_fedavg_centralized_evaluate_fn() -> None:
    calls: list[Arrays] = []

    def evaluate_fn(arrays: Arrays) -> tuple[float, dict]:
        calls.append(arrays)
        return float(np.abs(arrays[0]).sum()), {"accuracy": 0.25}

    arrays = _model()
    assert FedAvg().evaluate(1, arrays) is None
    loss, metrics = FedAvg(evaluate_fn=evaluate_fn).evaluate(2, arrays)
    assert calls == [arrays]
    assert loss == pytest.approx(float(np.abs(arrays[0]).sum())) and metrics == {"accuracy": 0.25}
    assert not math.isnan(loss)
