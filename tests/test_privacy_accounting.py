"""Privacy accounting: ε equals what dp_accounting gives for the same events, computed here."""

from __future__ import annotations

import math
import sys

import dp_accounting as dp
import pytest
from dp_accounting import pld, rdp

from pollinate.errors import ConfigError, MissingDependencyError
from pollinate.privacy import PrivacyAccountant, find_noise_multiplier
from pollinate.privacy.accounting import PLD_DISCRETIZATION

CASES = [  # (q, z, T, δ)
    (0.1, 1.0, 10, 1e-5),
    (0.01, 1.1, 200, 1e-5),
    (0.5, 2.0, 5, 1e-6),
    (1.0, 1.5, 3, 1e-5),
    (0.05, 0.7, 50, 1e-3),
]


def _poisson(q: float, z: float, t: int, delta: float, accountant: str) -> float:
    if accountant == "pld":
        acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    else:
        acc = rdp.RdpAccountant()
    acc.compose(dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(z)), t))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize(("q", "z", "t", "delta"), CASES)
def test_poisson_epsilon_equals_dp_accounting(accountant, q, z, t, delta):
    ours = PrivacyAccountant(z, delta=delta, sampling_probability=q, accountant=accountant)
    assert ours.epsilon_after(t) == pytest.approx(_poisson(q, z, t, delta, accountant), rel=1e-9)
    assert ours.neighbouring == "add_or_remove_one"


def test_pld_at_the_library_default_discretization():
    ours = PrivacyAccountant(1.0, delta=1e-5, sampling_probability=0.1, pld_discretization=1e-4)
    acc = pld.PLDAccountant()  # dp_accounting's own defaults
    acc.compose(dp.PoissonSampledDpEvent(0.1, dp.GaussianDpEvent(1.0)), 20)
    assert ours.epsilon_after(20) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    coarse = PrivacyAccountant(1.0, delta=1e-5, sampling_probability=0.1).epsilon_after(20)
    assert coarse == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)  # the faster default


@pytest.mark.parametrize(
    ("m", "n", "z", "t", "delta"),
    [(10, 100, 1.0, 10, 1e-5), (5, 1000, 2.0, 100, 1e-5), (50, 100, 4.0, 5, 1e-6)],
)
def test_fixed_size_epsilon_equals_dp_accounting(m, n, z, t, delta):
    ours = PrivacyAccountant(z, delta=delta, sample=(m, n), accountant="rdp")
    acc = rdp.RdpAccountant(neighboring_relation=dp.NeighboringRelation.REPLACE_ONE)
    # replace-one moves a sum of C-clipped updates by up to 2C: the ratio is z / 2
    acc.compose(dp.SampledWithoutReplacementDpEvent(n, m, dp.GaussianDpEvent(z / 2)), t)
    assert ours.epsilon_after(t) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert ours.neighbouring == "replace_one" and ours.rate == m / n


def test_fixed_size_sampling_with_pld_is_refused():
    with pytest.raises(ConfigError, match="accountant = 'rdp'"):
        PrivacyAccountant(1.0, delta=1e-5, sample=(10, 100), accountant="pld")


def test_epsilon_grows_with_rounds_and_step_records_rounds():
    acc = PrivacyAccountant(1.0, delta=1e-5, sampling_probability=0.2, accountant="rdp")
    assert acc.epsilon == 0.0 and acc.epsilon_after(0) == 0.0
    values = [acc.step() for _ in range(5)]
    assert values == sorted(values) and len(set(values)) == 5
    assert acc.rounds == 5 and acc.epsilon == values[-1] == acc.epsilon_after(5)


def test_no_noise_means_infinite_epsilon():
    acc = PrivacyAccountant(0.0, delta=1e-5, sampling_probability=0.1)
    assert acc.epsilon_after(1) == math.inf


def test_rounds_within_a_budget():
    acc = PrivacyAccountant(1.0, delta=1e-5, sampling_probability=0.3, accountant="rdp")
    budget = acc.epsilon_after(7) + 1e-9
    assert acc.rounds_within(budget, 100) == 7
    assert acc.epsilon_after(8) > budget
    assert acc.rounds_within(budget, 5) == 5
    assert acc.rounds_within(acc.epsilon_after(1) / 2, 100) == 0


@pytest.mark.parametrize(
    ("kwargs", "accountant"),
    [
        ({"sampling_probability": 0.1}, "pld"),
        ({"sampling_probability": 0.02}, "rdp"),
        ({"sample": (20, 200)}, "rdp"),
    ],
)
def test_find_noise_multiplier_hits_the_target(kwargs, accountant):
    target, delta, rounds, rtol = 2.0, 1e-5, 30, 1e-3
    z = find_noise_multiplier(target, delta, rounds, accountant=accountant, rtol=rtol, **kwargs)

    def epsilon(noise: float) -> float:
        acc = PrivacyAccountant(noise, delta=delta, accountant=accountant, **kwargs)
        return acc.epsilon_after(rounds)

    assert epsilon(z) <= target  # always within the budget
    assert epsilon(z * (1 - 2 * rtol)) > target  # and not much more noise than needed
    assert epsilon(z) == pytest.approx(target, rel=0.02)


def test_find_noise_multiplier_unreachable_target():
    with pytest.raises(ConfigError, match="no noise multiplier"):
        find_noise_multiplier(
            0.01, 1e-5, 100, sampling_probability=1.0, accountant="rdp", max_noise_multiplier=8
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delta": 0.0, "sampling_probability": 0.1},
        {"delta": 1.0, "sampling_probability": 0.1},
        {"delta": 1e-5, "sampling_probability": 0.0},
        {"delta": 1e-5, "sampling_probability": 1.5},
        {"delta": 1e-5},
        {"delta": 1e-5, "sampling_probability": 0.1, "sample": (1, 10)},
        {"delta": 1e-5, "sample": (11, 10), "accountant": "rdp"},
        {"delta": 1e-5, "sample": (0, 10), "accountant": "rdp"},
        {"delta": 1e-5, "sampling_probability": 0.1, "accountant": "moments"},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        PrivacyAccountant(1.0, **kwargs)
    with pytest.raises(ConfigError):
        PrivacyAccountant(-1.0, delta=1e-5, sampling_probability=0.1)


def test_missing_dp_accounting_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # as if not installed
    acc = PrivacyAccountant(1.0, delta=1e-5, sampling_probability=0.1)
    with pytest.raises(MissingDependencyError, match=r"pollinate\[privacy\]"):
        acc.epsilon_after(1)
