"""Local DP: each client clips and noises its own update; the server checks and records ε."""

from __future__ import annotations

import json

import dp_accounting as dp
import numpy as np
import pytest
from dp_accounting import pld

from pollinate.client import ClientContext
from pollinate.errors import ConfigError
from pollinate.privacy import (
    LocalDP,
    LocalDPLedger,
    PrivacyBudgetExceeded,
    local_epsilon,
    local_noise_multiplier,
    update_norm,
)
from pollinate.strategy.fedavg import FedAvg
from pollinate.types import Arrays, Config, EvaluateRes, Outcome, TrainRes


class _Client:
    """Trains by adding ``step`` to every weight and bumping the counter."""

    def __init__(self, step: float = 0.0) -> None:
        self.step = step

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        out = [(arrays[0] + self.step).astype(arrays[0].dtype), arrays[1] + 5]
        return TrainRes(out, 37, {"loss": 0.25})

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return EvaluateRes(0.5, 9, {"accuracy": 0.75})


def _model(size: int = 10) -> Arrays:
    return [np.zeros(size, np.float32), np.arange(2, dtype=np.int64)]


@pytest.mark.parametrize(
    ("z", "releases", "delta"), [(2.0, 1, 1e-5), (4.0, 10, 1e-6), (8, 3, 1e-3)]
)
def test_local_epsilon_equals_dp_accounting(z, releases, delta):
    acc = pld.PLDAccountant(dp.NeighboringRelation.REPLACE_ONE)  # any two local data sets
    acc.compose(dp.GaussianDpEvent(z), releases)
    assert local_epsilon(z, delta, releases) == pytest.approx(acc.get_epsilon(delta), rel=1e-3)
    assert local_noise_multiplier(local_epsilon(z, delta, releases), delta, releases) == (
        pytest.approx(z, rel=1e-6)
    )


def test_local_dp_clips_before_adding_noise():
    arrays = _model(200)
    for step in (0.001, 1.0, 50.0):
        res = LocalDP(_Client(step), clip=0.5, noise_multiplier=0.0).train(arrays, {"round": 1})
        assert update_norm(res.arrays, arrays) <= 0.5
        assert update_norm(res.arrays, arrays) == pytest.approx(
            min(0.5, step * np.sqrt(200)), rel=1e-5
        )


def test_local_dp_noise_scale_and_what_leaves_the_client():
    arrays = [np.zeros(20_000, np.float64), np.arange(2, dtype=np.int64)]
    wrapped = LocalDP(_Client(0.0), clip=0.4, noise_multiplier=1.5, delta=1e-6, seed=2)
    res = wrapped.train(arrays, {"round": 1})
    assert res.arrays[0].std() == pytest.approx(1.5 * 0.4, rel=0.03)
    np.testing.assert_array_equal(res.arrays[1], arrays[1])  # the counter is not sent
    assert res.num_examples == 1  # the true count would tell the data size
    assert "loss" not in res.metrics
    assert res.metrics["dp_epsilon"] == pytest.approx(local_epsilon(1.5, 1e-6))
    assert res.metrics["dp_delta"] == 1e-6
    assert res.metrics["dp_noise_multiplier"] == 1.5 and res.metrics["dp_clip"] == 0.4
    kept = LocalDP(_Client(), clip=0.4, noise_multiplier=1.5, keep_metrics=True)
    assert kept.train(arrays, {"round": 1}).metrics["loss"] == 0.25
    assert wrapped.evaluate(arrays, {}).metrics == {"accuracy": 0.75}


def test_local_dp_noise_is_seeded_or_secret():
    arrays = _model(50)

    def release(seed, round_number):
        return (
            LocalDP(_Client(), clip=1.0, noise_multiplier=1.0, seed=seed)
            .train(arrays, {"round": round_number})
            .arrays[0]
        )

    np.testing.assert_array_equal(release(4, 1), release(4, 1))
    assert not np.array_equal(release(4, 1), release(4, 2))
    assert not np.array_equal(release(None, 1), release(None, 1))


def test_local_dp_from_epsilon_and_as_a_client_fn():
    client_fn = LocalDP(lambda ctx: _Client(0.1), clip=1.0, epsilon=3.0, delta=1e-5)
    assert client_fn.noise_multiplier == pytest.approx(local_noise_multiplier(3.0, 1e-5))
    assert client_fn.epsilon == pytest.approx(3.0, rel=1e-6)
    state: dict = {}
    for r in (1, 2, 3):
        ctx = ClientContext(7, seed=0, state=state)
        res = client_fn(ctx).train(_model(), {"round": r})
        state = ctx.state
        assert res.metrics["dp_releases"] == r
        assert res.metrics["dp_epsilon_total"] == pytest.approx(
            local_epsilon(client_fn.noise_multiplier, 1e-5, r)
        )
    with pytest.raises(ConfigError):
        LocalDP(_Client(), clip=1.0, noise_multiplier=1.0, epsilon=2.0)
    with pytest.raises(ConfigError):
        LocalDP(_Client(), clip=0.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="wraps a client"):
        LocalDP(_Client(), clip=1.0, noise_multiplier=1.0)(ClientContext(0, 0))


def _release(cid: int, client: LocalDP, arrays: Arrays) -> Outcome:
    return Outcome(cid, "train", result=client.train(arrays, {"round": 1}))


def test_ledger_checks_the_mechanism_and_records_the_worst_client():
    arrays = _model()
    ledger = LocalDPLedger(FedAvg(min_train_clients=1), noise_multiplier=2.0, clip=1.0, delta=1e-5)
    good = LocalDP(_Client(), clip=1.0, noise_multiplier=2.0, seed=0)
    weak = LocalDP(_Client(), clip=1.0, noise_multiplier=0.5, seed=0)
    plain = Outcome(3, "train", result=_Client().train(arrays, {}))
    summary = ledger.aggregate_train(
        1, arrays, [_release(0, good, arrays), _release(1, weak, arrays), plain]
    )
    assert summary.clients == 1
    reasons = {f.client_id: f.reason for f in summary.failures}
    assert "weaker than configured" in reasons[1] and "wrap the client in LocalDP" in reasons[3]
    summary = ledger.aggregate_train(2, arrays, [_release(0, good, arrays)])
    privacy = summary.privacy
    assert privacy is not None and privacy["mode"] == "local"
    assert privacy["epsilon"] == pytest.approx(local_epsilon(2.0, 1e-5, 2))  # client 0: twice
    assert privacy["epsilon_round"] == pytest.approx(local_epsilon(2.0, 1e-5, 1))
    assert privacy["noise_multiplier"] == 2.0 and privacy["clip"] == 1.0
    assert ledger.releases == {0: 2, 1: 1, 3: 1}


def test_ledger_budget_stops_before_a_client_would_exceed_it():
    arrays = _model()
    budget = (local_epsilon(4.0, 1e-5, 2) + local_epsilon(4.0, 1e-5, 3)) / 2
    ledger = LocalDPLedger(FedAvg(), noise_multiplier=4.0, clip=1.0, max_epsilon=budget)
    client = LocalDP(_Client(), clip=1.0, noise_multiplier=4.0)
    for r in (1, 2):
        plan = ledger.configure_train(r, arrays, range(3))
        ledger.aggregate_train(r, arrays, [_release(cid, client, arrays) for cid, _ in plan])
    with pytest.raises(PrivacyBudgetExceeded, match="round 3 would raise a client's local ε"):
        ledger.configure_train(3, arrays, range(3))


def test_ledger_restores_releases_from_the_history_of_a_resumed_run():
    from pollinate.server import make_record

    arrays = _model()
    ledger = LocalDPLedger(FedAvg(min_train_clients=1), noise_multiplier=2.0, clip=1.0, delta=1e-5)
    good = LocalDP(_Client(), clip=1.0, noise_multiplier=2.0, seed=0)
    weak = LocalDP(_Client(), clip=1.0, noise_multiplier=0.5, seed=0)
    records = []
    for r, outcomes in enumerate(
        [[_release(0, good, arrays), _release(1, weak, arrays)], [_release(0, good, arrays)]], 1
    ):
        summary = ledger.aggregate_train(r, arrays, outcomes)
        records.append(json.loads(json.dumps(make_record(r, 0.0, summary, None, None))))
    resumed = LocalDPLedger(FedAvg(min_train_clients=1), noise_multiplier=2.0, clip=1.0)
    resumed.restore(records)  # the weak client was rejected, but its update was released
    assert resumed.releases == ledger.releases == {0: 2, 1: 1}
