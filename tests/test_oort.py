"""Oort selection (Lai et al. 2021): hand-computed utilities, the deadline penalty,
exploration, seeded draws and resuming, and runs on the virtual clock."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pollinate import config as run_config
from pollinate.errors import ConfigError
from pollinate.server import run
from pollinate.simulation.backends.sequential import SequentialBackend
from pollinate.simulation.clock import ClockRecorder, VirtualClockExecutor
from pollinate.simulation.engine import SimulationExecutor
from pollinate.simulation.environment import Environment
from pollinate.strategy.fedavg import FedAvg
from pollinate.strategy.oort import Oort, staleness_bonus, statistical_utility, system_penalty
from pollinate.strategy.selection import CoolDown, make_policy
from tests.fakes import MeanClientFn, initial


def _rng(seed: int, round_number: int) -> np.random.Generator:
    return np.random.default_rng([seed, round_number, 0])


def test_the_three_terms_by_hand() -> None:
    assert statistical_utility(100, 0.5) == 50.0  # 100 · sqrt(0.5²)
    assert statistical_utility(8, -2.0) == 16.0
    assert system_penalty(10.0, 20.0, 2.0) == 0.25  # (10 / 20)²
    assert system_penalty(10.0, 40.0, 0.5) == 0.5  # (10 / 40)^0.5
    assert system_penalty(10.0, 10.0, 2.0) == 1.0  # on time: no penalty
    assert system_penalty(10.0, 3.0, 2.0) == 1.0
    assert system_penalty(10.0, None, 2.0) == 1.0  # never timed
    assert staleness_bonus(10, 2) == pytest.approx(math.sqrt(0.1 * math.log(10) / 2))
    assert staleness_bonus(1, 1) == 0.0  # log 1


def test_utilities_by_hand() -> None:
    oort = Oort(alpha=2.0, preferred_duration_s=10.0)
    oort.select(1, [1, 2, 3], 1.0, 0, _rng(0, 1))  # everyone, L_i = 1
    oort.observe(
        1,
        {1: {"loss": 2.0}, 2: {"loss": 2.0}},
        {3: "timeout"},
        examples={1: 100, 2: 50},
        durations={1: 5.0, 2: 20.0, 3: 40.0},
    )
    # U_stat = 200, 100, unknown → normalised 1, 0.5, 0; bonus sqrt(0.1 · ln 3 / 1)
    bonus = math.sqrt(0.1 * math.log(3))
    got = oort.utilities(3, [1, 2, 3])
    want = [1.0 + bonus, (0.5 + bonus) * (10 / 20) ** 2, bonus * (10 / 40) ** 2]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # α = 0: durations are ignored
    flat = Oort(alpha=0.0, preferred_duration_s=10.0)
    flat.load_state(oort.state())
    np.testing.assert_allclose(flat.utilities(3, [1, 2, 3]), [1 + bonus, 0.5 + bonus, bonus])
    # T = 0: no penalty either
    none = Oort(alpha=2.0)
    none.load_state(oort.state())
    np.testing.assert_allclose(none.utilities(3, [1, 2, 3]), [1 + bonus, 0.5 + bonus, bonus])


def test_exploration_decays_to_its_floor() -> None:
    oort = Oort(exploration=0.9, exploration_decay=0.5, min_exploration=0.2)
    assert [oort.exploration_at(r) for r in (1, 2, 3, 4)] == [0.9, 0.45, 0.225, 0.2]


def test_exploration_takes_its_share_from_never_tried_clients() -> None:
    clients = list(range(20))
    oort = Oort(exploration=0.5, exploration_decay=1.0, min_exploration=0.5)
    oort.select(1, clients[:10], 1.0, 0, _rng(0, 1))  # 0-9 tried
    oort.observe(
        1, {c: {"loss": 1.0} for c in range(10)}, {}, examples=dict.fromkeys(range(10), 10)
    )
    saved = oort.state()
    for seed in range(10):
        again = Oort(exploration=0.5, exploration_decay=1.0, min_exploration=0.5)
        again.load_state(saved)
        picked = again.select(2, clients, 0.4, 0, _rng(seed, 2))  # k = 8: 4 new, 4 known
        assert len(picked) == 8
        assert sum(c >= 10 for c in picked) == 4
        assert len(again.state()["clients"]) == 14  # the 4 new ones are tried now
    # no client tried yet: every pick explores; too few tried: fresh ones fill the round
    assert len(Oort().select(1, clients, 0.25, 0, _rng(0, 1))) == 5
    few = Oort(exploration=0.0, min_exploration=0.0)
    few.select(1, [0, 1], 1.0, 0, _rng(0, 1))
    few.observe(1, {0: {"loss": 1.0}, 1: {"loss": 1.0}}, {}, examples={0: 1, 1: 1})
    picked = few.select(2, clients, 0.25, 0, _rng(0, 2))
    assert len(picked) == 5 and {0, 1} <= set(picked)


def _explored(n: int, slow: int, duration_s: float) -> Oort:
    """``n`` clients tried in round 1 with the same loss and examples; ``slow`` took
    ``duration_s``, the others 1 s."""
    oort = Oort(alpha=2.0, preferred_duration_s=10.0, exploration=0.0, min_exploration=0.0)
    clients = list(range(n))
    oort.select(1, clients, 1.0, 0, _rng(0, 1))
    oort.observe(
        1,
        {c: {"loss": 1.0} for c in clients},
        {},
        examples=dict.fromkeys(clients, 10),
        durations={c: duration_s if c == slow else 1.0 for c in clients},
    )
    return oort


def test_a_client_certain_to_miss_the_deadline_is_picked_less() -> None:
    clients = list(range(10))
    on_time, late = _explored(10, 3, 1.0), _explored(10, 3, 100.0)
    counts_on_time = np.zeros(10)
    counts_late = np.zeros(10)
    for seed in range(300):
        for c in on_time.select(2, clients, 0.5, 0, _rng(seed, 2)):
            counts_on_time[c] += 1
        for c in late.select(2, clients, 0.5, 0, _rng(seed, 2)):
            counts_late[c] += 1
    # the same utilities for everyone: 5 of 10 picked, client 3 about half the time …
    assert 100 < counts_on_time[3] < 200
    # … but 100 s against a 10 s preference costs it (10/100)² = 1/100 of its utility,
    # which puts it under the cut-off (0.95 × the 5th highest utility): never exploited
    assert counts_late[3] == 0
    assert counts_late.sum() == 300 * 5


def test_the_same_seed_picks_the_same_clients_and_resuming_continues_exactly() -> None:
    clients = list(range(30))

    def session(oort: Oort, rounds: range) -> list[list[int]]:
        picks = []
        for r in rounds:
            picked = oort.select(r, clients, 0.2, 0, _rng(7, r))
            picks.append(picked)
            oort.observe(
                r,
                {c: {"loss": 1.0 / (1 + c)} for c in picked[1:]},
                {picked[0]: "timeout"},
                examples={c: 5 + c for c in picked[1:]},
                durations={c: float(c) for c in picked},
            )
        return picks

    a, b = Oort(preferred_duration_s=12.0), Oort(preferred_duration_s=12.0)
    assert session(a, range(1, 7)) == session(b, range(1, 7))
    whole = Oort(preferred_duration_s=12.0)
    first = session(whole, range(1, 4))
    saved = json.loads(json.dumps(whole.state()))  # JSON as is
    resumed = Oort(preferred_duration_s=12.0)
    resumed.load_state(saved)
    assert first + session(resumed, range(4, 8)) == first + session(whole, range(4, 8))


def test_cooldown_around_oort_records_the_rounds_picked() -> None:
    policy = make_policy("cooldown", policy="oort")
    assert isinstance(policy, CoolDown) and isinstance(policy.policy, Oort)
    picked = policy.select(1, list(range(10)), 0.3, 0, _rng(0, 1))
    assert sorted(int(c) for c in policy.state()["policy"]["clients"]) == picked


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"alpha": -1}, r"oort alpha must be a number in \[0.0, inf\].*strategy.oort_alpha"),
        ({"exploration": 1.5}, "strategy.oort_exploration"),
        ({"exploration_decay": 0}, "strategy.oort_exploration_decay"),
        ({"min_exploration": 0.5, "exploration": 0.2}, "must not exceed exploration"),
        ({"cutoff": 0}, "strategy.oort_cutoff"),
        ({"preferred_duration_s": -3}, "strategy.oort_preferred_duration_s"),
        ({"alpha": "2"}, "oort alpha"),
        ({"speed": 2}, "no parameter 'speed'"),
    ],
)
def test_bad_parameters_are_named(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_policy("oort", **params)


def test_config_keys_are_checked_when_the_config_is_read() -> None:
    cfg = run_config.from_dict({"strategy": {"selection": "oort", "oort_alpha": 3.0}})
    assert cfg.strategy.oort_alpha == 3.0
    with pytest.raises(ConfigError, match="strategy.oort_exploration must be between 0 and 1"):
        run_config.from_dict({"strategy": {"selection": "oort", "oort_exploration": 2}})
    with pytest.raises(ConfigError, match="DP-FedAvg samples the clients itself"):
        run_config.from_dict({"strategy": {"selection": "oort"}, "privacy": {"mode": "central"}})
    with pytest.raises(ConfigError, match="oort min_exploration .* must not exceed"):
        run_config.from_dict(
            {
                "strategy": {
                    "selection": "oort",
                    "oort_exploration": 0.1,
                    "oort_min_exploration": 0.2,
                }
            }
        )


def test_on_the_virtual_clock_oort_learns_to_leave_out_the_clients_that_miss_the_deadline() -> None:
    """Half the clients need 0.1 s per example, the slow half ten times that: MeanClient
    ``i`` has ``i + 1`` examples, so the slow ones with over 5 examples take 6-12 s against a
    5 s deadline; Oort stops picking them once tried, while uniform sampling keeps losing
    them."""
    tiers = [
        {"share": 0.5, "seconds_per_example": 0.1, "name": "fast"},
        {"share": 0.5, "seconds_per_example": 1.0, "name": "slow"},
    ]
    env = Environment.from_tiers(tiers, 12, seed=0)
    slow = {c for c in range(12) if env.tier_of(c) == "slow"}

    def timeouts(selection: Oort | None) -> int:
        backend = SequentialBackend(1)
        backend.start(MeanClientFn())
        clock = VirtualClockExecutor(SimulationExecutor(backend), env, deadline_s=5.0)
        strategy = FedAvg(
            fraction_train=0.5,
            min_train_clients=1,
            min_available_clients=1,
            fraction_evaluate=0.0,
            selection=selection,
            seed=3,
        )
        try:
            result = run(
                strategy, clock, range(12), initial(), 12, callbacks=[ClockRecorder(clock)]
            )
        finally:
            backend.close()
        missed = 0
        for record in result.history.rounds[4:]:  # after everyone was tried
            for cid, c in record["environment"]["clients"].items():
                missed += c["train"]["status"] == "timeout"
                assert c["train"]["status"] != "timeout" or int(cid) in slow
        if selection is not None:  # what the policy learnt is what the clock measured
            entries = selection.state()["clients"]
            for record in result.history.rounds:
                for cid in record["environment"]["clients"]:
                    assert entries[cid][1] is not None
            last = result.history.rounds[-1]["environment"]["clients"]
            for cid, c in last.items():
                assert entries[cid][1] == pytest.approx(c["train"]["duration_s"])
        return missed

    oort = Oort(preferred_duration_s=5.0, exploration=0.9, exploration_decay=0.5)
    assert timeouts(oort) < timeouts(None)
    assert len(oort.state()["clients"]) == 12  # everyone was tried


def _toml(tmp_path: Path, backend: str) -> Path:
    fast = "{share = 0.6, seconds_per_example = 0.0001, downlink_mbps = 50, uplink_mbps = 10}"
    medium = "{share = 0.3, seconds_per_example = 0.0005, downlink_mbps = 10, uplink_mbps = 2}"
    slow = (
        "{share = 0.1, seconds_per_example = 0.01, downlink_mbps = 2, uplink_mbps = 1, "
        "online = 0.9}"
    )
    toml = tmp_path / f"{backend}.toml"
    toml.write_text(
        f"""
[run]
rounds = 3
output = "{tmp_path / backend}"
[data]
dataset = "digits"
num_clients = 10
[model]
name = "logreg"
[train]
epochs = 1
[simulation]
backend = "{backend}"
workers = 2
[strategy]
fraction_train = 0.5
min_train_clients = 1
fraction_evaluate = 0.0
selection = "oort"
oort_alpha = 2.0
oort_exploration = 0.5
[environment]
seed = 1
deadline_s = 2.0
tiers = [{fast}, {medium}, {slow}]
"""
    )
    return toml


@pytest.mark.slow  # 15-25 s each on a loaded 2-core machine (torch, worker processes)
@pytest.mark.parametrize("backend", ["sequential", "process"])
def test_oort_from_a_toml_runs_on_the_virtual_clock(tmp_path: Path, backend: str) -> None:
    from pollinate.experiment import run_experiment

    cfg = run_config.load(_toml(tmp_path, backend))
    result = run_experiment(cfg, quiet=True)
    rounds = result.history.rounds
    assert len(rounds) == 3
    assert all(r["environment"]["simulated_time_s"] > 0 for r in rounds)
    assert all(len(r["environment"]["clients"]) == 5 for r in rounds)
    saved = json.loads((tmp_path / backend / "history.json").read_text())
    assert saved["config"]["strategy"]["selection"] == "oort"
    assert rounds[-1]["train"]["clients"] >= 1
