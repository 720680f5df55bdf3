"""Simulated attacks: who attacks, what each kind sends, and the wrappers that apply them."""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator, Sequence
from statistics import NormalDist

import numpy as np
import pytest

from pollinate.attacks import (
    Attack,
    AttackingExecutor,
    flip_labels,
    lie_z,
    little_is_enough,
    poison,
)
from pollinate.data import FederatedDataset
from pollinate.data.datasets import Dataset
from pollinate.data.partition import Partition
from pollinate.errors import ConfigError, DataError
from pollinate.simulation.backends.sequential import SequentialBackend
from pollinate.simulation.engine import SimulationExecutor
from pollinate.types import EvaluateIns, Outcome, TrainIns, TrainRes
from tests.fakes import MeanClientFn

W = [np.array([1.0, 2.0, 3.0], np.float32), np.array([5, 6], np.int64)]
Y = [np.array([2.0, 2.0, 1.0], np.float32), np.array([7, 7], np.int64)]  # Δ = [1, 0, -2]


# --- who attacks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "count"),
    [(10, 0.2, 2), (10, 0.25, 2), (10, 0.35, 4), (7, 0.5, 4), (3, 0.1, 0)],
)
def test_attackers_are_round_fraction_n_seeded(n, fraction, count):
    attack = Attack("sign_flip", fraction=fraction, seed=4)
    chosen = attack.attackers(n)
    assert len(chosen) == count == round(fraction * n)
    assert chosen <= set(range(n))
    assert Attack("scale", fraction=fraction, seed=4).attackers(n) == chosen  # the seed decides


def test_the_seed_changes_the_attackers():
    sets = {Attack("scale", fraction=0.3, seed=s).attackers(100) for s in range(5)}
    assert len(sets) == 5


def test_explicit_attackers_override_the_fraction():
    attack = Attack("gaussian", fraction=0.9, clients=(3, 1, 3))
    assert attack.attackers(5) == {1, 3}
    with pytest.raises(ConfigError, match=r"attack.clients lists 5.*\(0..4\)"):
        Attack("scale", clients=(5,)).attackers(5)


def test_from_config_reads_and_checks_every_key():
    attack = Attack.from_config(
        {"kind": "scale", "fraction": 0.5, "clients": [0, 2], "scale": 3, "seed": 9}, 4
    )
    assert attack == Attack("scale", 0.5, (0, 2), 3.0, 9)
    assert Attack.from_config({"kind": "label_flip"}) == Attack("label_flip")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"kind": "flip"}, r"attack.kind is 'flip'; use one of sign_flip, scale, gaussian"),
        ({}, r"\[attack\] needs kind"),
        ({"kind": 3}, "attack.kind must be a string"),
        ({"kind": "scale", "power": 2}, r"attack.power is not a key.*kind, fraction"),
        ({"kind": "scale", "fraction": 0}, r"attack.fraction must be in \(0, 1\)"),
        ({"kind": "scale", "fraction": 1.0}, r"attack.fraction must be in \(0, 1\)"),
        ({"kind": "scale", "fraction": "0.2"}, "attack.fraction must be a number"),
        ({"kind": "scale", "scale": 0}, "attack.scale must be a finite number > 0"),
        ({"kind": "scale", "scale": math.inf}, "attack.scale must be a finite number > 0"),
        ({"kind": "scale", "scale": math.nan}, "attack.scale must be a finite number > 0"),
        ({"kind": "scale", "clients": [1, -1]}, "attack.clients must be client ids"),
        ({"kind": "scale", "clients": [True]}, "attack.clients must be client ids"),
        ({"kind": "scale", "clients": 3}, "attack.clients must be a list"),
        ({"kind": "scale", "clients": [0, 10]}, r"lists 10, which is not a client id \(0..9\)"),
        ({"kind": "scale", "seed": 1.5}, "attack.seed must be an integer"),
    ],
)
def test_from_config_errors_name_the_key_and_what_is_allowed(section, message):
    with pytest.raises(ConfigError, match=message):
        Attack.from_config(section, num_clients=10)


# --- what each kind sends (NumPy, by hand) --------------------------------------------------------


def test_sign_flip_sends_w_minus_s_delta():
    sent = poison("sign_flip", W, Y, scale=10.0)
    np.testing.assert_array_equal(sent[0], [1 - 10, 2 - 0, 3 + 20])
    assert sent[0].dtype == np.float32
    assert sent[1] is Y[1]  # integer arrays are the client's own


def test_scale_sends_w_plus_s_delta():
    sent = poison("scale", W, Y, scale=10.0)
    np.testing.assert_array_equal(sent[0], [1 + 10, 2, 3 - 20])
    np.testing.assert_array_equal(sent[1], [7, 7])
    np.testing.assert_array_equal(poison("scale", W, Y, scale=1.0)[0], Y[0])  # s = 1: honest


def test_gaussian_noise_is_as_large_as_the_update_and_seeded():
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(200, 300)).astype(np.float32), rng.normal(size=4000)]
    delta = [rng.normal(scale=0.01, size=a.shape) for a in w]
    y = [(a + d).astype(a.dtype) for a, d in zip(w, delta)]
    norm = math.sqrt(sum(float(((b.astype(np.float64) - a) ** 2).sum()) for a, b in zip(w, y)))
    sent = poison("gaussian", w, y, rng=np.random.default_rng(1))
    noise = np.concatenate([(s.astype(np.float64) - a).ravel() for s, a in zip(sent, w)])
    assert np.linalg.norm(noise) == pytest.approx(norm, rel=0.01)
    assert abs(noise.mean()) < 4 * norm / noise.size  # centred (4 standard errors)
    assert abs(float(np.dot(noise, np.concatenate([d.ravel() for d in delta])))) < 0.05 * norm**2
    again = poison("gaussian", w, y, rng=np.random.default_rng(1))
    for a, b in zip(sent, again):
        np.testing.assert_array_equal(a, b)


def test_lie_z_follows_the_paper():
    # n = 10, f = 3: s = ⌊10/2 + 1⌋ − 3 = 3, z = Φ⁻¹(7/10) = 0.5244005127080407
    assert lie_z(10, 3) == pytest.approx(0.5244005127080407, abs=1e-12)
    # n = 50, f = 12 (the paper's setting): s = 26 − 12 = 14, z = Φ⁻¹(36/50)
    assert lie_z(50, 12) == pytest.approx(NormalDist().inv_cdf(0.72))
    assert lie_z(10, 7) == pytest.approx(NormalDist().inv_cdf(0.9))  # majority: s = 1
    assert lie_z(1, 1) == 0.0


def test_little_is_enough_by_hand_for_three_attackers_of_ten():
    w = [np.array([0.0, 1.0], np.float32), np.array([4], np.int64)]
    trained = [
        [np.array([1.0, 1.0], np.float32), np.array([9], np.int64)],  # Δ = [1, 0]
        [np.array([2.0, 1.0], np.float32), np.array([8], np.int64)],  # Δ = [2, 0]
        [np.array([3.0, 4.0], np.float32), np.array([7], np.int64)],  # Δ = [3, 3]
    ]
    z = 0.5244005127080407
    mu = np.array([2.0, 1.0])
    sigma = np.array([math.sqrt(2 / 3), math.sqrt(2.0)])  # population std of [1,2,3], [0,0,3]
    sent = little_is_enough(w, trained, num_clients=10)
    np.testing.assert_allclose(sent[0], np.array([0.0, 1.0]) + mu - z * sigma, rtol=1e-6)
    assert sent[0].dtype == np.float32
    np.testing.assert_array_equal(sent[1], [9])


def test_an_update_of_other_shapes_is_refused():
    with pytest.raises(ConfigError, match="client 4's result does not have the shapes"):
        poison("sign_flip", W, Y[:1], client_id=4)


# --- the executor wrapper -------------------------------------------------------------------------


def executor(behaviour: dict[int, str] | None = None) -> SimulationExecutor:
    backend = SequentialBackend()
    backend.start(MeanClientFn(behaviour or {}))
    return SimulationExecutor(backend, seed=1, deterministic=True)


def arrays() -> list[np.ndarray]:
    return [np.full((2, 3), 0.5, np.float32), np.zeros(2, np.int64)]


def plan(ids: Sequence[int]) -> list[tuple[int, TrainIns]]:
    ins = TrainIns(arrays(), {"round": 1})
    return [(cid, ins) for cid in ids]


def results(outcomes: Iterator[Outcome]) -> dict[int, Outcome]:
    return {o.client_id: o for o in outcomes}


def assert_same_result(a: object, b: object) -> None:
    assert isinstance(a, TrainRes) and isinstance(b, TrainRes)
    assert a.num_examples == b.num_examples and a.metrics == b.metrics
    assert len(a.arrays) == len(b.arrays)
    for x, y in zip(a.arrays, b.arrays):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["sign_flip", "scale", "gaussian", "label_flip"])
def test_attackers_results_are_replaced_and_marked_honest_ones_untouched(kind):
    attack = Attack(kind, clients=(1, 3), scale=2.0, seed=5)
    honest = results(executor().submit(1, "train", plan(range(5)), 60))
    attacked = results(
        AttackingExecutor(executor(), attack, attack.attackers(5)).submit(
            1, "train", plan(range(5)), 60
        )
    )
    assert set(attacked) == set(range(5))
    w = arrays()
    for cid in range(5):
        got, clean = attacked[cid].result, honest[cid].result
        assert isinstance(got, TrainRes) and isinstance(clean, TrainRes)
        np.testing.assert_array_equal(got.arrays[1], clean.arrays[1])  # ints: own values
        if cid not in (1, 3):
            assert_same_result(got, clean)
            continue
        assert got.metrics == {**clean.metrics, "attack": kind}
        delta = clean.arrays[0] - w[0]  # MeanClient trains to its id: Δ = cid − 0.5
        expected = {
            "sign_flip": w[0] - 2.0 * delta,
            "scale": w[0] + 2.0 * delta,
            "label_flip": clean.arrays[0],  # poisoned data, honest training: unchanged here
        }
        if kind == "gaussian":
            noise = got.arrays[0] - w[0]
            assert noise.std() > 0 and not np.allclose(got.arrays[0], clean.arrays[0])
            rng = np.random.default_rng([5, 1, cid])  # seeded by (attack seed, round, client)
            for a, b in zip(got.arrays, poison("gaussian", w, clean.arrays, rng=rng)):
                np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(got.arrays[0], expected[kind])


def test_little_is_enough_through_the_executor():
    attack = Attack("little_is_enough", clients=(2, 5, 7))
    honest = results(executor().submit(1, "train", plan(range(10)), 60))
    attacked = results(
        AttackingExecutor(executor(), attack, attack.attackers(10)).submit(
            1, "train", plan(range(10)), 60
        )
    )
    deltas = np.array([c - 0.5 for c in (2, 5, 7)])  # MeanClient c trains every weight to c
    expected = 0.5 + deltas.mean() - lie_z(10, 3) * deltas.std()
    for cid in range(10):
        got = attacked[cid].result
        assert isinstance(got, TrainRes)
        if cid in (2, 5, 7):
            np.testing.assert_allclose(got.arrays[0], np.full((2, 3), expected), rtol=1e-6)
            assert got.metrics["attack"] == "little_is_enough"
        else:
            assert_same_result(got, honest[cid].result)


class Scripted:
    """An executor that hands out given outcomes one by one and records how far it got."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        self.outcomes = outcomes
        self.pulled = 0

    def submit(self, round_number, kind, plan, timeout_s) -> Iterator[Outcome]:  # type: ignore[no-untyped-def]
        for outcome in self.outcomes:
            self.pulled += 1
            yield outcome


def trained(cid: int, value: float) -> Outcome:
    res = TrainRes([np.full(3, value, np.float32), np.zeros(2, np.int64)], 1, {"loss": 0.0})
    return Outcome(cid, "train", result=res)


def test_little_is_enough_passes_honest_outcomes_on_and_holds_attackers_until_all_report():
    w = [np.zeros(3, np.float32), np.zeros(2, np.int64)]
    script = [
        trained(4, 1.0),  # attacker
        trained(0, 0.1),
        Outcome(6, "train", error="timeout: too slow"),  # attacker that failed
        trained(1, 0.2),
        trained(9, 3.0),  # the last attacker
        trained(2, 0.3),
    ]
    inner = Scripted(script)
    attack = Attack("little_is_enough", clients=(4, 6, 9))
    ins = TrainIns(w, {})
    stream = AttackingExecutor(inner, attack, attack.attackers(10)).submit(
        1, "train", [(c, ins) for c in (0, 1, 2, 4, 6, 9)], 60
    )
    order = []
    for outcome in stream:
        order.append((outcome.client_id, inner.pulled))
    # honest and failed outcomes leave as soon as they arrive; 4 and 9 leave after 9 arrived
    assert order == [(0, 2), (6, 3), (1, 4), (4, 5), (9, 5), (2, 6)]
    # μ, σ over the two attackers that trained: Δ = 1 and 3; n = 6, f = 2 (the failed one too)
    z = lie_z(6, 2)
    out = results(
        AttackingExecutor(Scripted(script), attack, attack.attackers(10)).submit(
            1, "train", [(c, ins) for c in (0, 1, 2, 4, 6, 9)], 60
        )
    )
    for cid in (4, 9):
        res = out[cid].result
        assert isinstance(res, TrainRes)
        np.testing.assert_allclose(res.arrays[0], np.full(3, 2.0 - z * 1.0), rtol=1e-6)
    assert out[6].error == "timeout: too slow"


def test_evaluation_and_rounds_without_attackers_pass_through_unchanged():
    attack = Attack("sign_flip", clients=(1,))
    wrapped = AttackingExecutor(executor(), attack, attack.attackers(4))
    ins = EvaluateIns(arrays(), {})
    evaluated = results(wrapped.submit(1, "evaluate", [(c, ins) for c in range(4)], 60))
    plain = results(executor().submit(1, "evaluate", [(c, ins) for c in range(4)], 60))
    assert {c: o.result for c, o in evaluated.items()} == {c: o.result for c, o in plain.items()}
    without = results(wrapped.submit(1, "train", plan([0, 2, 3]), 60))
    assert all("attack" not in o.result.metrics for o in without.values())  # type: ignore[union-attr]


def test_a_failed_attacker_is_passed_on_as_failed():
    attack = Attack("scale", clients=(1,))
    wrapped = AttackingExecutor(executor({1: "raise"}), attack, attack.attackers(3))
    out = results(wrapped.submit(1, "train", plan(range(3)), 60))
    assert out[1].error == "RuntimeError: client 1 exploded"


# --- label flipping -------------------------------------------------------------------------------


def small_data() -> FederatedDataset:
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(4, dtype=np.int64), 10)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    ds = Dataset("toy", x, y, x[:8], y[:8], num_classes=4)
    partition = Partition(np.arange(40), np.arange(0, 41, 10))
    return FederatedDataset(ds.x_train, ds.y_train, partition, 0.2, ds.x_test, ds.y_test, 4)


def test_flip_labels_reverses_the_attackers_training_labels_only():
    data = small_data()
    flipped = flip_labels(data, {1, 3})
    for cid in range(4):
        x, y = flipped.client_train(cid)
        x0, y0 = data.client_train(cid)
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, (3 - y0) if cid in (1, 3) else y0)
        assert y.dtype == y0.dtype
        for a, b in zip(flipped.client_test(cid), data.client_test(cid)):  # the truth
            np.testing.assert_array_equal(a, b)
    assert flipped.num_clients == 4 and flipped.num_classes == 4
    assert flipped.num_train_examples(1) == 8
    np.testing.assert_array_equal(flipped.label_counts(), data.label_counts())


def test_flip_labels_with_a_permutation_and_its_checks():
    data = small_data()
    swapped = flip_labels(data, [0], permutation=[1, 0, 3, 2])
    np.testing.assert_array_equal(swapped.client_train(0)[1], [1, 0, 3, 2] * 2)
    with pytest.raises(ConfigError, match="each of 0..3 once"):
        flip_labels(data, [0], permutation=[0, 0, 1, 2])
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        flip_labels(data, [0], num_classes=1)
    with pytest.raises(DataError, match="labels outside 0..1"):
        flip_labels(data, [0], num_classes=2).client_train(0)


def test_flipped_data_pickles_without_copying_per_client():
    data = small_data()
    flipped = flip_labels(data, {2})
    back = pickle.loads(pickle.dumps(flipped))
    np.testing.assert_array_equal(back.client_train(2)[1], flipped.client_train(2)[1])
    assert back.attackers == {2}
    assert len(pickle.dumps(flipped)) < len(pickle.dumps(data)) + 1000


def test_a_run_with_an_attacking_executor_aggregates_the_attack():
    """FedAvg over MeanClients (client i: i + 1 examples, trains every weight to i) with client
    3 scaling its update by 2: the global model is the hand-computed weighted mean."""
    from pollinate.server import run
    from pollinate.strategy import FedAvg
    from tests.fakes import initial

    attack = Attack("scale", clients=(3,), scale=2.0)
    wrapped = AttackingExecutor(executor(), attack, attack.attackers(4))
    strategy = FedAvg(min_train_clients=4, min_evaluate_clients=4, round_timeout_s=60)
    result = run(strategy, wrapped, range(4), initial(), rounds=2)
    w1 = (0 * 1 + 1 * 2 + 2 * 3 + (0 + 2 * (3 - 0)) * 4) / 10  # 3.2
    w2 = (0 * 1 + 1 * 2 + 2 * 3 + (w1 + 2 * (3 - w1)) * 4) / 10
    np.testing.assert_allclose(result.arrays[0], np.full((3, 4), w2), rtol=1e-6)
    for record in result.history.rounds:
        assert record["clients"]["3"]["train"]["attack"] == "scale"
        assert "attack" not in record["clients"]["0"]["train"]
