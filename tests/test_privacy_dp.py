"""Central DP: clipping bounds every update, the noise has the stated scale, the budget holds."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from pollinate.client import ClientContext
from pollinate.errors import ConfigError, RoundFailedError
from pollinate.privacy import (
    AdaptiveClipping,
    CentralDP,
    ClientClipping,
    ClippedSum,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    PrivacyError,
    clip_update,
    update_norm,
)
from pollinate.strategy.fedavg import FedAvg
from pollinate.types import Arrays, Config, EvaluateRes, Outcome, TrainRes


def _model(size: int = 12) -> Arrays:
    return [np.linspace(-1, 1, size, dtype=np.float32), np.arange(3, dtype=np.int64)]


def _update(arrays: Arrays, delta: np.ndarray, counter: int = 7) -> Arrays:
    return [(arrays[0] + delta).astype(np.float32), np.full(3, counter, np.int64)]


def _train(cid: int, arrays: Arrays, n: int = 1, **metrics: float) -> Outcome:
    return Outcome(cid, "train", result=TrainRes(arrays, n, dict(metrics)))


def _dp(**kwargs) -> CentralDP:
    inner = kwargs.pop("inner", None) or FedAvg(min_available_clients=0, min_train_clients=1)
    defaults = dict(noise_multiplier=1.0, clip=1.0, num_clients=100, clients_per_round=10, seed=3)
    return CentralDP(inner, **{**defaults, **kwargs})


def test_privacy_imports_no_framework_backend_or_transport():
    code = (
        "import sys, pollinate.privacy; "
        "print(','.join(m for m in ('torch', 'ray', 'grpc', 'dp_accounting') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""  # dp_accounting too is loaded only when ε is computed


# -- clipping ------------------------------------------------------------------------------


def test_update_norm_is_over_float_arrays_only():
    ref = [np.zeros((2, 3), np.float32), np.zeros(4, np.int64), np.ones(2, np.float64)]
    upd = [np.full((2, 3), 2.0, np.float32), np.full(4, 100, np.int64), np.full(2, 3.0)]
    assert update_norm(upd, ref) == pytest.approx(np.sqrt(6 * 4 + 2 * 4))


def test_update_norm_matches_an_exact_sum_over_many_chunks():
    """Chunked sums give the norm of the whole update (here 3.5 chunks and a scalar)."""
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((350, 655)).astype(np.float32), np.array(2.0)]
    upd = [(r + rng.standard_normal(r.shape)).astype(r.dtype) for r in ref]
    diffs = [float(x) for u, r in zip(upd, ref) for x in (u.astype(float) - r).ravel()]
    exact = math.sqrt(math.fsum(d * d for d in diffs))
    assert update_norm(upd, ref) == pytest.approx(exact, rel=1e-12)
    assert update_norm([np.array([[3.0, 4.0]])], [np.zeros((1, 2))]) == 5.0


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_clip_update_bounds_the_norm_as_the_server_measures_it(scale):
    rng = np.random.default_rng(0)
    for trial in range(30):
        # large weights and a small clip: float32 rounding alone could push the norm over C
        ref = [(rng.normal(size=500) * 100).astype(np.float32), np.arange(2)]
        delta = rng.normal(size=500) * scale * rng.uniform(0.1, 10)
        clip = scale * 2.0
        out, norm = clip_update(_update(ref, delta), ref, clip)
        assert norm == pytest.approx(update_norm(_update(ref, delta), ref))
        assert update_norm(out, ref) <= clip
        assert out[0].dtype == np.float32
        np.testing.assert_array_equal(out[1], np.full(3, 7))  # counters pass through
        if norm > clip and scale >= 1:  # clipped: same direction, norm C (float32 rounding)
            d = out[0].astype(np.float64) - ref[0]
            cos = d @ delta / (np.linalg.norm(d) * np.linalg.norm(delta))
            assert cos > 0.99 and update_norm(out, ref) > 0.9 * clip, trial


def test_clip_update_leaves_small_updates_alone():
    ref = _model()
    upd = _update(ref, np.full(12, 0.01))
    out, norm = clip_update(upd, ref, 1.0)
    assert norm < 1.0 and all(a is b for a, b in zip(out, upd))


def test_clipped_sum_clips_or_verifies():
    ref = [np.zeros(4, np.float32)]
    total = ClippedSum(ref, clip=1.0)
    assert total.add([np.array([3, 4, 0, 0], np.float32)]) == (True, 5.0)  # clipped to 1
    assert total.add([np.array([0, 0, 0.5, 0], np.float32)]) == (True, 0.5)
    np.testing.assert_allclose(total.sums[0], [0.6, 0.8, 0.5, 0.0])
    assert total.count == 2
    ok, norm = total.add([np.array([0, 1.01, 0, 0], np.float32)], verify=True)
    assert not ok and norm == pytest.approx(1.01) and total.count == 2
    assert total.add([np.array([0, 1.0, 0, 0], np.float32)], verify=True)[0]


def test_server_side_clipping_bounds_one_clients_influence():
    arrays = _model(50)
    dp = _dp(noise_multiplier=0.0, clip=0.5, clients_per_round=10)
    huge = _update(arrays, np.full(50, 1000.0))
    summary = dp.aggregate_train(1, arrays, [_train(0, huge)])
    moved = update_norm(summary.arrays, arrays)
    assert moved == pytest.approx(0.5 / 10, rel=1e-5)  # C / D
    np.testing.assert_array_equal(summary.arrays[1], arrays[1])  # counters keep w's value


def test_uniform_weights_and_a_fixed_denominator():
    arrays = _model()
    dp = _dp(noise_multiplier=0.0, clip=10.0, clients_per_round=8)
    step = np.full(12, 0.01)
    outcomes = [
        _train(1, _update(arrays, step), n=1),
        _train(2, _update(arrays, 2 * step), n=1000),  # example counts do not weigh in
        _train(3, _update(arrays, 3 * step), n=5),
        Outcome(4, "train", error="timeout: still running at the round deadline"),
    ]
    summary = dp.aggregate_train(1, arrays, outcomes)
    expected = arrays[0].astype(np.float64) + (1 + 2 + 3) * step / 8  # dropouts: still / D
    np.testing.assert_allclose(summary.arrays[0], expected, rtol=1e-6)
    assert summary.clients == 3
    assert [(f.client_id, f.kind) for f in summary.failures] == [(4, "timeout")]
    assert summary.per_client[2][0] == 1000  # the inner strategy still sees the counts


def test_malformed_updates_are_rejected_by_the_wrapped_strategy():
    arrays = _model()
    nan = [np.full_like(arrays[0], np.nan), arrays[1]]
    bad_shape = [np.zeros(5, np.float32), arrays[1]]
    summary = _dp(noise_multiplier=0.0).aggregate_train(
        1, arrays, [_train(0, arrays), _train(1, nan), _train(2, bad_shape)]
    )
    assert summary.clients == 1
    assert {f.client_id: f.kind for f in summary.failures} == {1: "rejected", 2: "rejected"}
    assert all(np.isfinite(a).all() for a in summary.arrays)
    with pytest.raises(RoundFailedError):
        _dp().aggregate_train(1, arrays, [_train(1, nan)])


# -- noise -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("z", "clip", "sampling", "per_round"),
    [(1.0, 1.0, "poisson", 10), (1.3, 0.5, "fixed", 20), (0.6, 2.0, "poisson", 2.5)],
)
def test_noise_has_the_stated_standard_deviation(z, clip, sampling, per_round):
    size = 20_000
    arrays = [np.zeros(size, np.float64)]
    dp = _dp(
        noise_multiplier=z,
        clip=clip,
        sampling=sampling,
        clients_per_round=per_round,
        accountant="rdp",
        seed=11,
    )
    zeros = [_train(cid, [a.copy() for a in arrays]) for cid in range(3)]  # Δ = 0
    noise = dp.aggregate_train(1, arrays, zeros).arrays[0]
    stated = z * clip / per_round
    assert noise.std() == pytest.approx(stated, rel=0.03)
    assert abs(noise.mean()) < 4 * stated / np.sqrt(size)


def test_noise_is_seeded_per_round_and_secret_by_default():
    arrays = [np.zeros(100)]
    zeros = [_train(0, [np.zeros(100)])]

    def noise(seed, round_number):
        return _dp(seed=seed).aggregate_train(round_number, arrays, zeros).arrays[0]

    np.testing.assert_array_equal(noise(5, 1), noise(5, 1))
    assert not np.array_equal(noise(5, 1), noise(5, 2))
    assert not np.array_equal(noise(None, 1), noise(None, 1))


def test_privacy_entry_of_a_round():
    arrays = _model()
    dp = _dp(delta=1e-6, accountant="rdp")
    summary = dp.aggregate_train(3, arrays, [_train(0, arrays)])
    privacy = summary.privacy
    assert privacy is not None
    expected = PrivacyAccountant(1.0, delta=1e-6, sampling_probability=0.1, accountant="rdp")
    assert privacy["epsilon"] == pytest.approx(expected.epsilon_after(3))
    assert privacy["delta"] == 1e-6 and privacy["accountant"] == "rdp"
    assert privacy["noise_multiplier"] == 1.0 and privacy["clip"] == 1.0
    assert privacy["sampling"] == "poisson" and privacy["mode"] == "central"


# -- sampling ----------------------------------------------------------------------------------


def test_poisson_sampling_rate_and_fixed_size():
    dp = _dp(clients_per_round=20, sampling="poisson", accountant="rdp", num_clients=200)
    arrays, clients = _model(), [10 * i for i in range(200)]
    sizes, seen = [], set()
    for r in range(1, 201):
        picked = [cid for cid, _ in dp.configure_train(r, arrays, clients)]
        assert len(set(picked)) == len(picked) and set(picked) <= set(clients)
        sizes.append(len(picked))
        seen.add(tuple(picked))
    assert np.mean(sizes) == pytest.approx(20, rel=0.05)  # Binomial(200, 0.1)
    assert np.std(sizes) > 2 and len(seen) == 200
    fixed = _dp(clients_per_round=20, sampling="fixed", accountant="rdp", num_clients=200)
    assert {len(fixed.configure_train(r, arrays, clients)) for r in range(1, 20)} == {20}
    with pytest.raises(PrivacyError, match="20 of 200 clients, but 150 are available"):
        fixed.configure_train(1, arrays, clients[:150])
    with pytest.raises(RoundFailedError, match="min_available_clients=5"):
        _dp(min_available_clients=5).configure_train(1, arrays, range(4))


def test_the_wrapped_strategy_must_train_every_offered_client():
    dp = _dp(inner=FedAvg(fraction_train=0.5, min_available_clients=0), clients_per_round=50)
    with pytest.raises(ConfigError, match="fraction_train=1.0"):
        dp.configure_train(1, _model(), range(100))


# -- budget ------------------------------------------------------------------------------------


def test_budget_stops_before_the_round_that_would_exceed_it():
    acc = PrivacyAccountant(1.0, delta=1e-5, sampling_probability=0.1)
    budget = (acc.epsilon_after(3) + acc.epsilon_after(4)) / 2
    dp = _dp(max_epsilon=budget)
    arrays = _model()
    for r in (1, 2, 3):
        plan = dp.configure_train(r, arrays, range(100))
        dp.aggregate_train(r, arrays, [_train(cid, arrays) for cid, _ in plan])
    with pytest.raises(PrivacyBudgetExceeded, match="round 4 would raise ε") as info:
        dp.configure_train(4, arrays, range(100))
    assert info.value.round_number == 4
    assert info.value.epsilon <= budget < info.value.next_epsilon
    assert "stopped after round 3" in str(info.value)


# -- client-side clipping --------------------------------------------------------------------


class _Overshoot:
    """A client whose update is ``step`` per weight: far over any small clip."""

    def __init__(self, step: float = 1.0) -> None:
        self.step = step

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        return TrainRes(_update(arrays, np.full(arrays[0].shape, self.step)), 4, {"loss": 1.0})

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return EvaluateRes(0.5, 4, {"accuracy": 0.9})


def test_client_side_clipping_end_to_end():
    arrays = _model()
    dp = _dp(clip_on="client", clip=0.3, noise_multiplier=0.0)
    plan = dp.configure_train(1, arrays, range(100))
    configs = {id(ins) for _, ins in plan}
    assert len(configs) == 1  # one shared instruction: still one broadcast
    config = plan[0][1].config
    assert config["dp_clip"] == 0.3 and config["round"] == 1

    clipped = ClientClipping(_Overshoot()).train(arrays, config)
    assert update_norm(clipped.arrays, arrays) <= 0.3
    assert clipped.metrics["dp_below_clip"] == 0 and clipped.metrics["loss"] == 1.0
    raw = _Overshoot().train(arrays, config)
    summary = dp.aggregate_train(
        1, arrays, [_train(1, clipped.arrays, **clipped.metrics), _train(2, raw.arrays)]
    )
    assert summary.clients == 1
    (failure,) = summary.failures
    assert failure.client_id == 2 and failure.kind == "rejected"
    assert "exceeds the clip 0.3" in failure.reason and "ClientClipping" in failure.reason
    assert "dp_below_clip" not in summary.per_client[1][1]  # the bit is not published


def test_client_clipping_needs_the_servers_clip_and_wraps_client_fns():
    with pytest.raises(ValueError, match="dp_clip"):
        ClientClipping(_Overshoot()).train(_model(), {"round": 1})
    wrapped = ClientClipping(lambda ctx: _Overshoot(step=1e-4))(ClientContext(3, 0))
    res = wrapped.train(_model(), {"dp_clip": 1.0})
    assert res.metrics["dp_below_clip"] == 1
    assert wrapped.evaluate(_model(), {}).metrics == {"accuracy": 0.9}


# -- adaptive clipping -----------------------------------------------------------------------


def test_update_noise_multiplier_of_adaptive_clipping():
    adaptive = AdaptiveClipping()
    sigma_b = 100 / 20
    z_update = adaptive.update_noise_multiplier(1.0, 100)
    assert z_update == pytest.approx((1.0**-2 - (2 * sigma_b) ** -2) ** -0.5)
    assert z_update > 1.0
    with pytest.raises(ConfigError, match="count noise"):
        adaptive.update_noise_multiplier(1.0, 10)  # σ_b = 0.5: 2σ_b is not above z
    assert AdaptiveClipping(count_stddev=2.0).update_noise_multiplier(1.0, 10) > 1.0


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clip_converges_to_the_target_quantile(quantile):
    rng = np.random.default_rng(0)
    adaptive = AdaptiveClipping(target_quantile=quantile)
    clip, expected = adaptive.initial_clip, 100
    history = []
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=expected)  # true quantiles known
        below = int((norms <= clip).sum())
        clip, _ = adaptive.next_clip(clip, below, expected, rng)
        history.append(clip)
    truth = float(np.exp(0.5 * _normal_quantile(quantile)))
    assert np.mean(history[-100:]) == pytest.approx(truth, rel=0.1)


def _normal_quantile(p: float) -> float:
    return {0.5: 0.0, 0.8: 0.8416212335729143}[p]


def test_adaptive_clipping_through_the_strategy():
    rng = np.random.default_rng(1)
    arrays = [np.zeros(8, np.float64)]
    dp = _dp(
        clip=AdaptiveClipping(initial_clip=0.05),
        clients_per_round=50,
        num_clients=50,
        accountant="rdp",
    )
    assert dp.update_noise_multiplier > dp.noise_multiplier
    for r in range(1, 121):
        plan = dp.configure_train(r, arrays, range(50))
        outcomes = []
        for cid, _ in plan:
            direction = rng.normal(size=8)
            norm = rng.uniform(0.0, 2.0)  # median 1.0
            outcomes.append(_train(cid, [direction / np.linalg.norm(direction) * norm]))
        privacy = dp.aggregate_train(r, arrays, outcomes).privacy
        assert privacy is not None and privacy["next_clip"] == dp.clip
    assert dp.clip == pytest.approx(1.0, rel=0.2)
    assert 0 <= privacy["below_clip"] <= 1
    # the quantile estimate is paid for: ε is that of the configured z, not of z_Δ
    expected = PrivacyAccountant(1.0, delta=1e-5, sampling_probability=1.0, accountant="rdp")
    assert privacy["epsilon"] == pytest.approx(expected.epsilon_after(120))


def test_adaptive_with_client_side_clipping_needs_the_bit():
    arrays = _model()
    dp = _dp(clip=AdaptiveClipping(count_stddev=1.0), clip_on="client")
    summary = dp.aggregate_train(1, arrays, [_train(0, arrays, dp_below_clip=1), _train(1, arrays)])
    assert summary.clients == 1
    assert "clipping bit" in summary.failures[0].reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0},
        {"clip": -1.0},
        {"clip_on": "both"},
        {"sampling": "stratified"},
        {"accountant": "moments"},
        {"clients_per_round": 0},
        {"clients_per_round": 101},
        {"sampling": "fixed", "clients_per_round": 2.5, "accountant": "rdp"},
        {"sampling": "fixed", "accountant": "pld"},
        {"max_epsilon": 0.0},
        {"delta": 0.0},
        {"noise_multiplier": -1.0},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        _dp(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"target_quantile": 1.0}, {"learning_rate": 0}, {"initial_clip": 0}]
)
def test_bad_adaptive_arguments(kwargs):
    with pytest.raises(ConfigError):
        AdaptiveClipping(**kwargs)
