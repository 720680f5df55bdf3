"""Server optimizers: each against a hand-written loop of its update rule, then resuming."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pollinate.errors import ConfigError, UpdateRejected
from pollinate.strategy.optimizers import (
    OPTIMIZERS,
    Adagrad,
    Adam,
    Momentum,
    Plain,
    ServerOptimizer,
    Yogi,
    make_optimizer,
)

W0 = [0.5, -1.0, 2.0]
# a different Δ every round, with sign changes and one large step
DELTAS = [
    [1.0, -0.5, 0.0],
    [0.2, 0.1, -3.0],
    [-0.4, 0.3, 0.25],
    [2.0, -0.05, 0.5],
    [0.0, 1.5, -1.0],
]


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def algorithm_2(
    rule: str, lr: float, beta_1: float, beta_2: float, tau: float
) -> list[list[float]]:
    """Reddi et al. 2021, Algorithm 2, one scalar at a time in plain Python; the model after
    each round."""
    w, m, v = list(W0), [0.0] * 3, [tau * tau] * 3
    models = []
    for delta in DELTAS:
        for i, d in enumerate(delta):
            m[i] = beta_1 * m[i] + (1 - beta_1) * d
            if rule == "adagrad":
                v[i] = v[i] + d * d
            elif rule == "adam":
                v[i] = beta_2 * v[i] + (1 - beta_2) * d * d
            else:  # yogi
                v[i] = v[i] - (1 - beta_2) * d * d * _sign(v[i] - d * d)
            w[i] = w[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        models.append(list(w))
    return models


def _run(opt: ServerOptimizer, rounds: int = len(DELTAS)) -> list[list[float]]:
    arrays = [np.array(W0)]
    models = []
    for delta in DELTAS[:rounds]:
        arrays = opt.step(arrays, [np.array(delta)])
        models.append(arrays[0].tolist())
    return models


@pytest.mark.parametrize(
    ("opt", "rule", "beta_2"),
    [
        (Adam(server_lr=0.3, beta_1=0.8, beta_2=0.95, tau=1e-2), "adam", 0.95),
        (Yogi(server_lr=0.3, beta_1=0.8, beta_2=0.95, tau=1e-2), "yogi", 0.95),
        (Adagrad(server_lr=0.3, tau=1e-2), "adagrad", 0.0),
        (Adagrad(server_lr=0.3, beta_1=0.8, tau=1e-2), "adagrad", 0.0),
    ],
)
def test_adaptive_optimizers_follow_algorithm_2(
    opt: ServerOptimizer, rule: str, beta_2: float
) -> None:
    params = opt.describe()
    expected = algorithm_2(rule, 0.3, float(params["beta_1"]), beta_2, 1e-2)
    np.testing.assert_allclose(_run(opt), expected, rtol=1e-14, atol=1e-15)
    assert opt.rounds == len(DELTAS)


def test_adam_first_step_by_hand() -> None:
    # m = 0.1·Δ = 0.1; v = 0.99·τ² + 0.01·Δ² = 0.99e-6 + 0.01 = 0.01000099;
    # w = 0 + 0.1 · 0.1 / (√0.01000099 + 0.001)
    w = Adam().step([np.zeros(1)], [np.ones(1)])[0]
    assert w[0] == pytest.approx(0.01 / (math.sqrt(0.01000099) + 0.001), rel=1e-14)
    assert w[0] == pytest.approx(0.0990050, rel=1e-6)


def test_yogi_second_moment_moves_additively() -> None:
    # v_{-1} = τ² = 1e-6 < Δ² = 4: v = 1e-6 + 0.01·4 = 0.040001 (Adam: 0.99e-6 + 0.04)
    opt = Yogi()
    opt.step([np.zeros(1)], [np.full(1, 2.0)])
    assert opt.state()["v"][0][0] == pytest.approx(0.040001, rel=1e-14)
    # next Δ = 0: v > Δ², so v shrinks by (1−β2)·0 = 0: a quiet round leaves v alone
    opt.step([np.zeros(1)], [np.zeros(1)])
    assert opt.state()["v"][0][0] == pytest.approx(0.040001, rel=1e-14)


def test_momentum_follows_fedavgm() -> None:
    opt = Momentum(server_lr=0.5, momentum=0.7)
    w, v, expected = list(W0), [0.0] * 3, []
    for delta in DELTAS:
        for i, d in enumerate(delta):
            v[i] = 0.7 * v[i] + d
            w[i] = w[i] + 0.5 * v[i]
        expected.append(list(w))
    np.testing.assert_allclose(_run(opt), expected, rtol=1e-15)
    # round 1 by hand: v = Δ1, w = [0.5 + 0.5, -1 - 0.25, 2]
    assert _run(Momentum(server_lr=0.5, momentum=0.7), 1) == [[1.0, -1.25, 2.0]]


def test_plain_with_unit_rate_is_fedavg_to_the_bit() -> None:
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=5).astype(np.float16)]
    delta = [rng.normal(size=(4, 3)) * 1e-3, rng.normal(size=5) * 1e-2]
    out = Plain().step(w, delta)
    for new, old, d in zip(out, w, delta):
        assert new.dtype == old.dtype
        np.testing.assert_array_equal(new, (old.astype(np.float64) + d).astype(old.dtype))
    assert _run(Plain(server_lr=0.5), 1) == [[1.0, -1.25, 2.0]]


def test_integer_arrays_add_the_rounded_delta_without_state() -> None:
    for opt in (Plain(0.1), Momentum(), Adam(), Yogi(), Adagrad()):
        counters = np.array([5, 7], dtype=np.int64)
        out = opt.step(
            [counters, np.zeros(2, dtype=np.float32)], [np.array([0.6, -1.4]), np.ones(2)]
        )
        assert out[0].dtype == np.int64 and out[1].dtype == np.float32
        np.testing.assert_array_equal(out[0], [6, 6])
        state = opt.state()
        for slot in ("velocity", "m", "v"):
            if slot in state:
                assert [a.shape for a in state[slot]] == [(2,)]  # the float array alone


@pytest.fixture(params=sorted(OPTIMIZERS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def _model() -> list[np.ndarray]:
    return [np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), np.zeros(4), np.arange(3)]


def _delta(t: int) -> list[np.ndarray]:
    rng = np.random.default_rng(t)
    return [rng.normal(size=(2, 3)), rng.normal(size=4) * 0.1, rng.normal(size=3) * 2]


def test_resuming_from_state_is_bit_identical(name: str) -> None:
    straight, arrays = make_optimizer(name), _model()
    for t in range(5):
        arrays = straight.step(arrays, _delta(t))
    first, resumed = make_optimizer(name), _model()
    for t in range(3):
        resumed = first.step(resumed, _delta(t))
    saved = first.state()
    assert saved["name"] == name and saved["rounds"] == 3
    for key, value in saved.items():  # JSON scalars, or lists of float64 arrays
        assert isinstance(value, (str, int)) or all(a.dtype == np.float64 for a in value), key
    second = make_optimizer(**first.describe())
    second.load_state(saved)
    for t in range(3, 5):
        resumed = second.step(resumed, _delta(t))
    for a, b in zip(resumed, arrays):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert second.rounds == 5


def test_state_is_a_copy(name: str) -> None:
    opt = make_optimizer(name)
    opt.step(_model(), _delta(0))
    saved = opt.state()
    for value in saved.values():
        if isinstance(value, list):
            for a in value:
                a += 1e6  # must not reach the optimizer
    for key, value in opt.state().items():
        if isinstance(value, list):
            assert all(np.abs(a).max() < 1e5 for a in value), key


def test_fresh_state_loads_into_a_fresh_optimizer(name: str) -> None:
    opt = make_optimizer(name)
    opt.load_state(make_optimizer(name).state())
    np.testing.assert_array_equal(
        opt.step(_model(), _delta(0))[0], make_optimizer(name).step(_model(), _delta(0))[0]
    )


def test_state_for_another_optimizer_or_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="state is for 'yogi', not 'adam'"):
        Adam().load_state(Yogi().state())
    opt = Adam()
    opt.step([np.zeros(3)], [np.ones(3)])
    resumed = Adam()
    resumed.load_state(opt.state())
    with pytest.raises(ConfigError, match="saved state is for another model"):
        resumed.step([np.zeros(4)], [np.ones(4)])
    with pytest.raises(ConfigError, match="must hold all of"):
        Adam().load_state({"name": "adam", "rounds": 1, "m": [np.zeros(3)]})


def test_wrong_delta_shapes_are_rejected_by_name(name: str) -> None:
    opt = make_optimizer(name)
    with pytest.raises(UpdateRejected, match=r"delta array 1 has shape \(3,\), expected \(4,\)"):
        opt.step(_model(), [np.zeros((2, 3)), np.zeros(3), np.zeros(3)])
    with pytest.raises(UpdateRejected, match="delta has 2 arrays, the model has 3"):
        opt.step(_model(), _delta(0)[:2])
    assert opt.rounds == 0


def test_complex_arrays() -> None:
    out = Plain().step([np.array([1 + 1j], dtype=np.complex64)], [np.array([0.5 - 2j])])
    assert out[0].dtype == np.complex64 and out[0][0] == 1.5 - 1j
    with pytest.raises(ConfigError, match="needs real arrays.*'plain' or 'momentum'"):
        Adam().step([np.zeros(1, dtype=complex)], [np.zeros(1, dtype=complex)])


def test_make_optimizer_validates_names_and_parameters() -> None:
    assert isinstance(make_optimizer("yogi", server_lr=0.01), Yogi)
    with pytest.raises(ConfigError, match="plain, momentum, adam, yogi, adagrad"):
        make_optimizer("sgd")
    with pytest.raises(ConfigError, match="no parameter 'beta_2'; its parameters are: server_lr"):
        make_optimizer("adagrad", beta_2=0.9)
    bad = [
        ("plain", {"server_lr": 0.0}),
        ("plain", {"server_lr": -1.0}),
        ("plain", {"server_lr": math.inf}),
        ("momentum", {"momentum": 1.0}),
        ("momentum", {"momentum": -0.1}),
        ("adam", {"beta_1": math.nan}),
        ("adam", {"beta_2": 1.0}),
        ("yogi", {"tau": 0.0}),
        ("adagrad", {"tau": -1e-3}),
        ("adam", {"server_lr": True}),
    ]
    for opt_name, params in bad:
        key = next(iter(params))
        with pytest.raises(ConfigError, match=key):
            make_optimizer(opt_name, **params)


def test_describe_rebuilds_the_optimizer(name: str) -> None:
    opt = make_optimizer(name)
    assert make_optimizer(**opt.describe()).describe() == opt.describe()
    assert opt.describe()["name"] == name
