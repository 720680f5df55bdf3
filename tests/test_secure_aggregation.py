"""SecAgg+ in the round loop: the strategy gets the sum of the updates and never one update."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest

from pollinate.client import ClientContext
from pollinate.errors import ConfigError, RoundFailedError
from pollinate.privacy import CentralDP, ClientClipping
from pollinate.privacy.secagg import SecAggConfig, SecAggError
from pollinate.privacy.secure import MESSAGE, SecureAggregation, SecureClient
from pollinate.simulation import make_backend, simulate
from pollinate.strategy.base import SecureSum, StrategyWrapper, TrainSummary
from pollinate.strategy.fedavg import FedAvg
from pollinate.types import Arrays, Config, EvaluateRes, Outcome, TrainRes
from tests.fakes import MeanClientFn

SECAGG = SecAggConfig(neighbours=1.0, threshold=0.6, clip_range=64.0)


class Recording(StrategyWrapper):
    """Keeps every training outcome and every secure sum the strategy is handed."""

    def __init__(self, strategy: Any) -> None:
        super().__init__(strategy)
        self.seen: list[Outcome] = []
        self.sums: list[SecureSum] = []

    def aggregate_train(
        self, round_number: int, arrays: Arrays, outcomes: Iterable[Outcome]
    ) -> TrainSummary:
        kept = list(outcomes)
        self.seen.extend(kept)
        return self.strategy.aggregate_train(round_number, arrays, kept)

    def aggregate_sum(self, round_number: int, arrays: Arrays, summed: SecureSum) -> TrainSummary:
        self.sums.append(summed)
        return self.strategy.aggregate_sum(round_number, arrays, summed)


class RecordingExecutor:
    """Wraps an executor and keeps every outcome that reaches the server."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.outcomes: list[Outcome] = []

    def submit(self, round_number: int, kind: Any, plan: Sequence[Any], timeout_s: float):
        for o in self.inner.submit(round_number, kind, plan, timeout_s):
            self.outcomes.append(o)
            yield o


def _initial() -> Arrays:
    return [np.zeros((3, 4), dtype=np.float32), np.zeros((2,), dtype=np.int64)]


def _fedavg(**kw: Any) -> FedAvg:
    return FedAvg(
        **{"min_train_clients": 1, "min_available_clients": 1, "fraction_evaluate": 0.0, **kw}
    )


def _run(client_fn: Any, n: int, rounds: int = 1, secure: Any = None, strategy: Any = None):
    return simulate(
        client_fn,
        num_clients=n,
        strategy=strategy or _fedavg(),
        initial_arrays=_initial(),
        rounds=rounds,
        backend="sequential",
        deterministic=True,
        secure=secure,
    )


@pytest.mark.parametrize("n", [10, 100])
def test_secure_fedavg_equals_plain_fedavg_within_quantization(n: int) -> None:
    plain = _run(MeanClientFn(), n)
    config = SecAggConfig(neighbours=min(n - 1, 8), threshold=5, clip_range=128.0)
    secure = _run(SecureClient(MeanClientFn()), n, secure=SecureAggregation(config, seed=1))
    # client k's update is k everywhere, weighted by k + 1 (below max_weight)
    expected = sum(k * (k + 1) for k in range(n)) / sum(k + 1 for k in range(n))
    np.testing.assert_allclose(plain.arrays[0], expected, rtol=1e-6)
    bound = config.quantum() / 2 * n / sum(k + 1 for k in range(n)) * 1000  # Σ error / Σ w
    np.testing.assert_allclose(secure.arrays[0], expected, atol=bound + 1e-4)
    np.testing.assert_array_equal(secure.arrays[1], [0, 0])  # integer arrays: not aggregated
    rec = secure.history.rounds[0]
    assert rec["train"]["clients"] == n and rec["failures"] == []


def test_the_strategy_and_the_server_never_hold_an_unmasked_update() -> None:
    strategy = Recording(_fedavg())
    backend = make_backend("sequential")
    from pollinate.server import run
    from pollinate.simulation.engine import SimulationExecutor

    executor = RecordingExecutor(SimulationExecutor(backend, deterministic=True))
    backend.start(SecureClient(MeanClientFn()))
    try:
        result = run(strategy, executor, range(6), _initial(), 1, secure=SecureAggregation(SECAGG))
    finally:
        backend.close()
    model = result.arrays[0]
    assert strategy.seen == []  # no individual update reached the strategy: only the sum
    (summed,) = strategy.sums
    assert len(summed.survivors) == 6
    for o in summed.survivors:  # the survivors' bookkeeping, with no arrays of their own
        assert isinstance(o.result, TrainRes) and o.result.arrays == []
    np.testing.assert_allclose(summed.total / summed.weight, model.ravel(), atol=1e-3)
    masked = [o for o in executor.outcomes if o.result is not None and o.result.arrays]
    assert len(masked) == 6  # the only arrays that reached the server: masked vectors
    for o in masked:
        (vector,) = o.result.arrays  # type: ignore[union-attr]
        assert vector.dtype == np.uint32 and vector.size == 12  # 32-bit modulus: packed
        update = np.full(12, float(o.client_id))
        assert not np.allclose(vector.astype(np.float64), update)
        # uniform-looking: spread over the whole 32-bit range, not near the quantized update
        assert vector.max() > 2**31 or vector.min() < 2**31


def test_clients_dropping_after_key_sharing_are_unmasked_around() -> None:
    n, dropped = 8, {2: "raise", 5: "raise"}
    config = SecAggConfig(neighbours=1.0, threshold=4, clip_range=64.0)
    secure = _run(SecureClient(MeanClientFn(dropped)), n, secure=SecureAggregation(config))
    alive = [k for k in range(n) if k not in dropped]
    expected = sum(k * (k + 1) for k in alive) / sum(k + 1 for k in alive)
    weight = sum(k + 1 for k in alive) / 1000  # Σ min(n_k, max_weight) / max_weight
    bound = len(alive) * config.quantum() / 2 / weight  # rounding error of the sum, scaled
    np.testing.assert_allclose(secure.arrays[0], expected, atol=bound)
    assert abs(float(secure.arrays[0][0, 0]) - expected) > 0  # quantized, not in the clear
    rec = secure.history.rounds[0]
    assert rec["train"]["clients"] == 6
    assert sorted(f["client_id"] for f in rec["failures"]) == [2, 5]
    assert all("masked stage" in f["reason"] for f in rec["failures"])


def test_too_many_dropouts_fail_the_round_with_the_reason() -> None:
    n = 6
    faults = {k: "raise" for k in range(4)}
    config = SecAggConfig(neighbours=1.0, threshold=4, clip_range=64.0)
    with pytest.raises(SecAggError) as info:
        _run(SecureClient(MeanClientFn(faults)), n, secure=SecureAggregation(config))
    assert "dropped" in str(info.value) and "t = 4" in str(info.value)


def test_a_secure_client_refuses_to_train_in_the_clear() -> None:
    with pytest.raises(RoundFailedError, match="only through secure aggregation"):
        _run(SecureClient(MeanClientFn()), 3)  # the server runs no secure aggregation


def test_overflowing_configuration_is_refused_before_the_round() -> None:
    config = SecAggConfig(neighbours=4, threshold=3, quantization_bits=30, modulus_bits=32)
    with pytest.raises(ConfigError, match="modulus"):
        _run(SecureClient(MeanClientFn()), 10, secure=SecureAggregation(config))


class Still:
    """Trains nothing: returns the global model (Δ = 0), so the model moves only by noise."""

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx = ctx

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        return TrainRes([a.copy() for a in arrays], 10, {})

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return EvaluateRes(0.0, 1, {})


def _dp(**kw: Any) -> CentralDP:
    inner = _fedavg(min_available_clients=0)
    defaults: dict[str, Any] = dict(
        noise_multiplier=1.0, clip=0.5, num_clients=20, clients_per_round=20, clip_on="client"
    )
    defaults.update(sampling="fixed", accountant="rdp", seed=4)
    return CentralDP(inner, **{**defaults, **kw})


def test_distributed_dp_noise_sums_to_the_stated_stddev() -> None:
    big = [np.zeros(20_000, np.float64)]
    result = simulate(
        SecureClient(ClientClipping(Still)),
        num_clients=20,
        strategy=_dp(),
        initial_arrays=big,
        rounds=1,
        backend="sequential",
        secure=SecureAggregation(SecAggConfig(neighbours=6, threshold=4, clip_range=16.0)),
    )
    # w' = (Σ noise_k) / D with Σ noise_k ~ N(0, (z C)²): stddev z·C/D = 0.5/20
    std = float(result.arrays[0].std())
    assert std == pytest.approx(0.025, rel=0.03)
    assert "epsilon" in result.history.rounds[0]["privacy"]


def test_central_dp_with_server_clipping_is_refused() -> None:
    with pytest.raises(ConfigError, match="clip_on = 'client'"):
        _run(
            SecureClient(MeanClientFn()),
            4,
            secure=SecureAggregation(SECAGG),
            strategy=_dp(clip_on="server", num_clients=4, clients_per_round=4),
        )


def test_stage_messages_that_are_not_json_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    class Liar(SecureClient):
        def train(self, arrays: Arrays, config: Config) -> TrainRes:
            res = super().train(arrays, config)
            if self.context.client_id == 1 and config.get("secagg_stage") == "shares":
                return TrainRes([], 0, {MESSAGE: "{not json"})
            return res

    secure = _run(Liar(MeanClientFn()), 6, secure=SecureAggregation(SECAGG))
    rec = secure.history.rounds[0]
    assert rec["train"]["clients"] == 5
    (failure,) = rec["failures"]
    assert failure["client_id"] == 1 and "not valid JSON" in failure["reason"]


def test_process_backend_gives_the_same_sum() -> None:
    kw: dict[str, Any] = dict(num_clients=6, initial_arrays=_initial(), rounds=2, seed=3)
    out: list[np.ndarray] = []
    for backend in ("sequential", "process"):
        result = simulate(
            SecureClient(MeanClientFn()),
            strategy=_fedavg(),
            backend=backend,
            deterministic=True,
            secure=SecureAggregation(SECAGG, seed=9),
            **kw,
        )
        out.append(result.arrays[0])
    np.testing.assert_array_equal(out[0], out[1])
