"""Client selection policies: the old draws reproduced, power of choice, cool-down, resuming."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pollinate.errors import ConfigError
from pollinate.strategy.selection import (
    CoolDown,
    Poisson,
    PowerOfChoice,
    SelectionPolicy,
    Uniform,
    make_policy,
    policies,
    sample_size,
)

CLIENTS = [100 + 3 * i for i in range(20)]  # ids that are not positions


def _rng(seed: int, round_number: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, round_number, salt])


@pytest.mark.parametrize(
    ("fraction", "available", "minimum", "k"),
    [
        (0.07, 100, 0, 7),  # 7.000000000000001 rounds to 7
        (0.3, 10, 0, 3),  # 3.0000000000000004 too
        (0.5, 3, 0, 2),  # ⌈1.5⌉
        (0.1, 10, 2, 2),  # the minimum wins
        (1.0, 5, 10, 5),  # never more than available
        (0.0, 10, 3, 0),  # fraction 0: nobody
        (0.5, 0, 2, 0),
    ],
)
def test_sample_size(fraction: float, available: int, minimum: int, k: int) -> None:
    assert sample_size(fraction, available, minimum) == k


def _old_fedavg_sample(
    clients: list[int], fraction: float, minimum: int, rng: np.random.Generator
) -> list[int]:
    """FedAvg._sample as it was before selection policies (after its availability check)."""
    available = len(clients)
    if fraction <= 0:
        return []
    k = min(available, max(minimum, math.ceil(round(fraction * available, 6))))
    if k == available:
        return list(clients)
    picked = np.sort(rng.choice(available, size=k, replace=False))
    return [clients[int(i)] for i in picked]


def test_uniform_reproduces_the_old_fedavg_draw() -> None:
    for seed in range(8):
        for fraction, minimum in [(0.1, 2), (0.35, 0), (0.5, 15), (1.0, 2), (0.0, 2)]:
            for r in (1, 2, 9):
                got = Uniform().select(r, CLIENTS, fraction, minimum, _rng(seed, r))
                want = _old_fedavg_sample(CLIENTS, fraction, minimum, _rng(seed, r))
                assert got == want, (seed, fraction, minimum, r)


def _old_central_dp_poisson(clients: list[int], rate: float, rng: np.random.Generator) -> list[int]:
    """CentralDP._sample's Poisson draw as it was before selection policies."""
    available = len(clients)
    k = int(rng.binomial(available, rate))
    picked = np.sort(rng.choice(available, size=k, replace=False))
    return [clients[int(i)] for i in picked]


def test_poisson_reproduces_the_old_central_dp_draw() -> None:
    sizes = set()
    for seed in range(20):
        for rate in (0.05, 0.3, 1.0):
            got = Poisson(rate).select(1, CLIENTS, 0.9, 7, _rng(seed, 1))  # fraction ignored
            assert got == _old_central_dp_poisson(CLIENTS, rate, _rng(seed, 1))
            sizes.add(len(got))
    assert len(sizes) > 3  # the round size varies
    assert Poisson(0.5).select(1, [], 1.0, 2, _rng(0, 1)) == []


def test_power_of_choice_picks_the_highest_losses() -> None:
    policy = PowerOfChoice(candidates=20)
    losses = {cid: float((7 * i) % 20) for i, cid in enumerate(CLIENTS)}  # all distinct
    policy.observe(1, {cid: {"loss": loss, "accuracy": 0.5} for cid, loss in losses.items()}, {})
    # every client is a candidate: the 4 highest losses (19, 18, 17, 16) win
    got = policy.select(2, CLIENTS, 0.2, 0, _rng(0, 2))
    assert sorted(losses[c] for c in got) == [16.0, 17.0, 18.0, 19.0]
    assert got == sorted(got, key=CLIENTS.index)
    # 8 candidates: the same draw the policy makes, then its 4 highest losses
    policy = PowerOfChoice(candidates=8)
    policy.load_state({"losses": {str(c): v for c, v in losses.items()}})
    for seed in range(5):
        drawn = _rng(seed, 2).choice(20, size=8, replace=False)
        top = sorted(drawn, key=lambda i: -losses[CLIENTS[i]])[:4]
        assert policy.select(2, CLIENTS, 0.2, 0, _rng(seed, 2)) == [CLIENTS[i] for i in sorted(top)]


def test_power_of_choice_tries_unseen_clients_first_and_breaks_ties_at_random() -> None:
    policy = PowerOfChoice(candidates=20)
    policy.observe(1, {c: {"loss": 1.0} for c in CLIENTS[2:]}, {})
    # clients 0 and 1 never reported a loss; the other 18 tie at 1.0
    chosen = [tuple(policy.select(2, CLIENTS, 0.15, 0, _rng(s, 2))) for s in range(30)]
    assert all(c[:2] == (CLIENTS[0], CLIENTS[1]) for c in chosen)
    assert len({c[2] for c in chosen}) > 5  # the third place goes to a random tied client


def test_power_of_choice_memory() -> None:
    policy = PowerOfChoice(candidates=3)
    policy.observe(1, {1: {"loss": 2.0}, 2: {"loss": 5.0}, 3: {"loss": 1.0}}, {})
    # a failure keeps the last loss; non-finite or non-numeric values are not losses
    policy.observe(
        2, {3: {"loss": math.nan}, 4: {"accuracy": 0.9}, 5: {"loss": "high"}}, {1: "timeout"}
    )
    assert policy.state() == {"losses": {"1": 2.0, "2": 5.0, "3": 1.0}}
    # k = ⌈0.34 · 3⌉ = 2 of candidates {1 2 3}: the losses 5 and 2
    assert policy.select(3, [1, 2, 3], 0.34, 0, _rng(0, 3)) == [1, 2]


def test_cooldown_skips_recent_failures() -> None:
    policy = CoolDown(rounds=3)
    clients = list(range(10))
    policy.observe(1, {c: {} for c in range(3, 10)}, {0: "error", 1: "timeout", 2: "rejected"})
    for r in (2, 3, 4):  # rounds 2 … 1+3 leave 0 and 1 out; a rejected update does not count
        for seed in range(10):
            got = policy.select(r, clients, 0.8, 0, _rng(seed, r))
            assert len(got) == 8 and 0 not in got and 1 not in got
    assert policy.select(5, clients, 1.0, 0, _rng(0, 5)) == clients  # back in round 5
    assert policy.state()["failed"] == {"0": 1, "1": 1}


def test_cooldown_fills_from_the_least_recently_failed() -> None:
    policy = CoolDown(rounds=5)
    clients = list(range(6))
    policy.observe(1, {}, {4: "error"})
    policy.observe(2, {}, {1: "timeout", 5: "error"})
    policy.observe(3, {}, {0: "error"})
    # only 2 and 3 are healthy; 4 failed longest ago, then 1 before 5 (same round, earlier in
    # the list), then 0
    assert policy.select(4, clients, 0.5, 0, _rng(0, 4)) == [2, 3, 4]  # k = 3
    assert policy.select(4, clients, 0.5, 4, _rng(0, 4)) == [1, 2, 3, 4]  # k = 4
    assert policy.select(4, clients, 0.5, 5, _rng(0, 4)) == [1, 2, 3, 4, 5]  # k = 5
    assert policy.select(4, clients, 1.0, 0, _rng(0, 4)) == clients
    # a success clears the memory at once
    policy.observe(4, {4: {}}, {})
    assert "4" not in policy.state()["failed"]


def test_cooldown_without_failures_is_its_policy() -> None:
    for seed in range(5):
        for inner in (Uniform(), PowerOfChoice(candidates=6)):
            wrapped, bare = CoolDown(type(inner)(**_params(inner))), inner
            assert wrapped.select(1, CLIENTS, 0.2, 2, _rng(seed, 1)) == bare.select(
                1, CLIENTS, 0.2, 2, _rng(seed, 1)
            )


def _params(policy: SelectionPolicy) -> dict:
    return {k: v for k, v in policy.describe().items() if k != "name"}


def test_cooldown_passes_observations_on() -> None:
    policy = CoolDown(PowerOfChoice(candidates=3), rounds=1)
    policy.observe(1, {7: {"loss": 3.0}}, {8: "error"})
    assert policy.state() == {"failed": {"8": 1}, "policy": {"losses": {"7": 3.0}}}
    policy.observe(2, {}, {})
    assert policy.state()["failed"] == {}  # round 3 is past the cool-down: forgotten


def test_cooldown_around_poisson_draws_among_the_healthy_only() -> None:
    policy = CoolDown(Poisson(rate=1.0), rounds=2)
    policy.observe(1, {}, {CLIENTS[0]: "error", CLIENTS[1]: "timeout"})
    assert policy.select(2, CLIENTS, 1.0, 20, _rng(0, 2)) == CLIENTS[2:]  # never filled


def _session(policy: SelectionPolicy, rounds: range, seed: int = 3) -> list[list[int]]:
    """Select, then report: client c fails with a timeout in rounds where (c + r) % 5 == 0,
    and reports loss (c · r) % 7 otherwise."""
    picks = []
    for r in rounds:
        picked = policy.select(r, CLIENTS, 0.3, 2, _rng(seed, r))
        picks.append(picked)
        failed = {c: "timeout" for c in picked if (c + r) % 5 == 0}
        results = {c: {"loss": float((c * r) % 7)} for c in picked if c not in failed}
        policy.observe(r, results, failed)
    return picks


@pytest.mark.parametrize(
    "policy",
    [Uniform(), Poisson(0.3), PowerOfChoice(candidates=9), CoolDown(PowerOfChoice(candidates=9))],
    ids=lambda p: p.name + ("_" + p.policy.name if isinstance(p, CoolDown) else ""),
)
def test_resuming_from_state_selects_the_same_clients(policy: SelectionPolicy) -> None:
    straight = make_policy(**policy.describe())
    everything = _session(straight, range(1, 9))
    first = make_policy(**policy.describe())
    before = _session(first, range(1, 5))
    saved = json.loads(json.dumps(first.state()))  # JSON-safe, and keys come back as str
    second = make_policy(**json.loads(json.dumps(policy.describe())))
    second.load_state(saved)
    assert before + _session(second, range(5, 9)) == everything


def test_cooldown_state_holds_its_memory() -> None:
    policy = make_policy("cooldown", policy="power_of_choice", rounds=4)
    _session(policy, range(1, 6))
    saved = policy.state()
    assert saved["failed"] and saved["policy"]["losses"]  # the session made both
    fresh = make_policy("cooldown", policy="power_of_choice", rounds=4)
    assert fresh.select(6, CLIENTS, 0.3, 2, _rng(3, 6)) != policy.select(
        6, CLIENTS, 0.3, 2, _rng(3, 6)
    )
    fresh.load_state(saved)
    assert fresh.select(6, CLIENTS, 0.3, 2, _rng(3, 6)) == policy.select(
        6, CLIENTS, 0.3, 2, _rng(3, 6)
    )


def test_every_policy_returns_distinct_clients_in_order() -> None:
    for name in policies():
        policy = make_policy(name)
        for seed in range(5):
            got = policy.select(1, CLIENTS, 0.4, 2, _rng(seed, 1))
            assert len(set(got)) == len(got) and set(got) <= set(CLIENTS)
            assert got == sorted(got, key=CLIENTS.index)


def test_make_policy_validates_names_and_parameters() -> None:
    with pytest.raises(ConfigError, match="uniform, poisson, power_of_choice, cooldown"):
        make_policy("random")
    with pytest.raises(ConfigError, match="no parameter 'd'; its parameters are: candidates"):
        make_policy("power_of_choice", d=3)
    with pytest.raises(ConfigError, match="parameters are: none"):
        make_policy("uniform", fraction=0.1)
    bad = [
        ("poisson", {"rate": 0.0}),
        ("poisson", {"rate": 1.5}),
        ("power_of_choice", {"candidates": 0}),
        ("cooldown", {"rounds": 0}),
        ("cooldown", {"kinds": ["crash"]}),
        ("cooldown", {"kinds": []}),
        ("cooldown", {"policy": "shuffle"}),
        ("cooldown", {"policy": CoolDown()}),
    ]
    for name, params in bad:
        with pytest.raises(ConfigError):
            make_policy(name, **params)
    assert make_policy("cooldown", kinds="rejected").kinds == ("rejected",)
