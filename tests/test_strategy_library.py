"""The strategy library: one contract for every preset, each algorithm's server half against
its definition, impossible combinations refused, state that resumes exactly, and every
strategy on every simulation backend with the same result."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pollinate.client import ClientContext
from pollinate.errors import ConfigError
from pollinate.privacy import CentralDP
from pollinate.server import run
from pollinate.simulation import make_backend, simulate
from pollinate.simulation.engine import SimulationExecutor
from pollinate.strategy import PRESETS, FedAvg, Strategy, make_strategy
from pollinate.strategy.optimizers import Adam
from pollinate.strategy.state import pack, unpack
from pollinate.types import Arrays, Outcome, TrainRes
from tests.algorithm_apps import LinearClient, initial, linear_app

# parameters that let the robust presets run on rounds of 6 clients
PARAMS: dict[str, dict[str, Any]] = {
    "krum": {"num_malicious": 1},
    "multikrum": {"num_malicious": 1, "num_selected": 3},
    "bulyan": {"num_malicious": 0},
    "qfedavg": {"lipschitz": 20.0},
}
#: the presets for vector models with rounds (the boosted-trees ones are tested in
#: test_frameworks.py, asynchronous FedBuff in test_fedbuff.py)
VECTOR_PRESETS = sorted(n for n in PRESETS if not n.startswith("fedxgb_") and n != "fedbuff")
MINIMUM = {"krum": 4, "multikrum": 4, "bulyan": 3}  # the robust ones need 2f + 3, 4f + 3
COMMON = {
    "min_train_clients": 1,
    "min_available_clients": 1,
    "min_evaluate_clients": 1,
    "train_config": {"lr": 0.05, "epochs": 3},
    "seed": 3,
}


def build(name: str, **kw: Any) -> Strategy:
    common = {**COMMON, "min_train_clients": MINIMUM.get(name, 1) + (name in MINIMUM)}
    return make_strategy(name, dict(PARAMS.get(name, {})), **{**common, **kw})


def _results(strategy: Strategy, round_number: int, arrays: Arrays, clients: Any) -> list[Outcome]:
    """Run the planned clients in this process (their state in ``states``)."""
    plan = strategy.configure_train(round_number, arrays, clients)
    out = []
    for cid, ins in plan:
        ctx = ClientContext(cid, seed=0, state=STATES.setdefault(cid, {}))
        out.append(Outcome(cid, "train", result=LinearClient(ctx).train(ins.arrays, ins.config)))
    return out


STATES: dict[int, dict[str, Any]] = {}


@pytest.fixture(autouse=True)
def _fresh_states() -> None:
    STATES.clear()


@pytest.fixture(params=VECTOR_PRESETS)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- the contract every preset meets ------------------------------------------------------


def test_contract_a_round_moves_the_model_and_keeps_dtypes(name: str) -> None:
    strategy, arrays = build(name), initial()
    summary = strategy.aggregate_train(1, arrays, _results(strategy, 1, arrays, range(6)))
    assert summary.clients >= 1 and not summary.failures
    for a, b in zip(summary.arrays, arrays):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert not np.allclose(summary.arrays[0], arrays[0])  # the clients' training moved it
    assert np.isfinite(summary.arrays[0]).all()


def test_contract_unchanged_models_leave_the_model_unchanged(name: str) -> None:
    strategy, arrays = build(name), initial()
    plan = strategy.configure_train(1, arrays, range(6))
    extra = len(plan[0][1].arrays) - len(arrays)  # SCAFFOLD sends its variate too
    outcomes = [
        Outcome(
            cid,
            "train",
            result=TrainRes(
                [a.copy() for a in arrays] + [np.zeros_like(a) for a in arrays][:extra],
                cid + 1,
                {"num_steps": 3, "initial_loss": 1.0},
            ),
        )
        for cid, _ in plan
    ]
    summary = strategy.aggregate_train(1, arrays, outcomes)
    for a, b in zip(summary.arrays, arrays):
        np.testing.assert_allclose(a, b, atol=1e-7)


def test_contract_bad_updates_are_rejected_and_recorded(name: str) -> None:
    strategy, arrays = build(name), initial()
    good = _results(strategy, 1, arrays, range(8))
    res = good[1].result
    assert isinstance(res, TrainRes)
    nan = [np.full_like(a, np.nan) if a.dtype.kind == "f" else a for a in res.arrays]
    outcomes = [
        *good[2:],
        Outcome(good[1].client_id, "train", result=TrainRes(nan, 5, dict(res.metrics))),
        Outcome(good[0].client_id, "train", error="timeout: still running at the deadline"),
    ]
    summary = strategy.aggregate_train(1, arrays, outcomes)
    kinds = {f.client_id: f.kind for f in summary.failures}
    assert kinds == {good[1].client_id: "rejected", good[0].client_id: "timeout"}
    assert all(np.isfinite(a).all() for a in summary.arrays)


def test_contract_state_resumes_bit_identically(name: str) -> None:
    arrays = initial()
    straight = build(name)
    for r in range(1, 5):
        arrays = straight.aggregate_train(r, arrays, _results(straight, r, arrays, range(8))).arrays

    STATES.clear()
    resumed_arrays = initial()
    first = build(name)
    for r in (1, 2):
        outcomes = _results(first, r, resumed_arrays, range(8))
        resumed_arrays = first.aggregate_train(r, resumed_arrays, outcomes).arrays
    tree, saved = pack(first.state())
    second = build(name)  # a new process: only the saved state carries over
    second.load_state(unpack(tree, saved))
    for r in (3, 4):
        outcomes = _results(second, r, resumed_arrays, range(8))
        resumed_arrays = second.aggregate_train(r, resumed_arrays, outcomes).arrays
    for a, b in zip(arrays, resumed_arrays):
        np.testing.assert_array_equal(a, b)


# -- each algorithm's server half against its definition ----------------------------------


def test_fedadam_is_adam_on_the_weighted_mean_update() -> None:
    """Reddi et al. 2021, Algorithm 2, by hand over three rounds."""
    arrays = initial()
    strategy = build("fedadam", optimizer=None)
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x = arrays[0].astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for r in (1, 2, 3):
        outcomes = _results(strategy, r, arrays, range(4))
        models = [o.result.arrays[0].astype(np.float64) for o in outcomes]  # type: ignore[union-attr]
        ns = [o.result.num_examples for o in outcomes]  # type: ignore[union-attr]
        delta = sum(n * w for n, w in zip(ns, models)) / sum(ns) - x
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta**2
        x = x + eta * m / (np.sqrt(v) + tau)
        arrays = strategy.aggregate_train(r, arrays, outcomes).arrays
        np.testing.assert_allclose(arrays[0], x.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert isinstance(strategy, FedAvg) and isinstance(strategy.optimizer, Adam)


def test_fedprox_tells_the_clients_mu_and_scaffold_sends_its_variate() -> None:
    arrays = initial()
    (_, ins), *_ = build("fedprox", min_train_clients=2).configure_train(1, arrays, range(3))
    assert ins.config["proximal_mu"] == 0.01 and len(ins.arrays) == len(arrays)
    (_, ins), *_ = build("scaffold").configure_train(1, arrays, range(3))
    assert ins.config["scaffold"] is True and len(ins.arrays) == 2 * len(arrays)
    np.testing.assert_array_equal(ins.arrays[3], 0.0)  # c starts at zero


def test_scaffold_server_variate_is_the_population_share_of_the_mean_delta_c() -> None:
    arrays = initial()
    strategy = build("scaffold", fraction_train=0.5)
    outcomes = _results(strategy, 1, arrays, range(8))  # 4 of 8 clients
    strategy.aggregate_train(1, arrays, outcomes)
    dcs = [o.result.arrays[3].astype(np.float64) for o in outcomes]  # type: ignore[union-attr]
    expected = sum(dcs) / 8  # c ← c + |S|/N · mean Δc = Σ Δc / N
    np.testing.assert_allclose(strategy.state()["algorithm"]["control"][0], expected, rtol=1e-6)


def test_fednova_normalises_by_local_steps() -> None:
    """Δ = τ_eff Σ p_k Δ_k / τ_k with p_k = n_k / n (plain SGD: a_k = τ_k)."""
    arrays = initial()
    base = arrays[0].astype(np.float64)
    updates = [(base + 1.0, 10, 2), (base + 4.0, 30, 8)]  # (model, n_k, τ_k)
    outcomes = [
        Outcome(
            i,
            "train",
            result=TrainRes([w.astype(np.float32), arrays[1], arrays[2]], n, {"num_steps": t}),
        )
        for i, (w, n, t) in enumerate(updates)
    ]
    new = build("fednova").aggregate_train(1, arrays, outcomes).arrays[0]
    p = [0.25, 0.75]
    tau_eff = p[0] * 2 + p[1] * 8
    expected = base + tau_eff * (p[0] * 1.0 / 2 + p[1] * 4.0 / 8)
    np.testing.assert_allclose(new, expected, rtol=1e-6)


def test_qfedavg_is_the_papers_update() -> None:
    """w ← w − Σ F^q Δw_k / Σ h_k, Δw_k = L(w − w_k), h_k = qF^(q−1)‖Δw_k‖² + L F^q."""
    arrays = initial()
    q, L = 0.5, 4.0
    strategy = make_strategy("qfedavg", {"q": q, "lipschitz": L}, **COMMON)
    w = arrays[0].astype(np.float64)
    cases = [(w + 0.5, 2.0), (w - 0.25, 0.5), (w + 1.0, 1.0)]  # (w_k, F_k)
    outcomes = [
        Outcome(
            i,
            "train",
            result=TrainRes([wk.astype(np.float32), arrays[1], arrays[2]], 10, {"initial_loss": f}),
        )
        for i, (wk, f) in enumerate(cases)
    ]
    num, den = np.zeros_like(w), 0.0
    for wk, f in cases:
        dw = L * (w - wk)
        num += f**q * dw
        den += q * f ** (q - 1) * float(dw @ dw) + L * f**q
    new = strategy.aggregate_train(1, arrays, outcomes).arrays[0]
    np.testing.assert_allclose(new, w - num / den, rtol=1e-6, atol=1e-7)


def test_an_update_without_what_the_algorithm_needs_is_rejected() -> None:
    arrays = initial()
    ok = TrainRes([a.copy() for a in arrays], 5, {"num_steps": 2, "initial_loss": 1.0})
    bare = TrainRes([a.copy() for a in arrays], 5, {})
    for name, key in (("fednova", "num_steps"), ("qfedavg", "initial_loss")):
        summary = build(name).aggregate_train(
            1, arrays, [Outcome(0, "train", result=ok), Outcome(1, "train", result=bare)]
        )
        assert [f.client_id for f in summary.failures] == [1]
        assert key in summary.failures[0].reason


# -- impossible combinations are refused with both parts named ----------------------------


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_aggregators_are_refused_under_central_dp_and_secure_aggregation(name: str) -> None:
    aggregator = build(name).aggregator  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=f"central DP.*{aggregator.name}"):
        CentralDP(build(name), noise_multiplier=1.0, clip=1.0, num_clients=10, clients_per_round=5)
    with pytest.raises(ConfigError, match=f"secure aggregation.*{aggregator.name}"):
        build(name).secure_terms(1, 5, 1000)


@pytest.mark.parametrize("name", ["scaffold", "fednova", "qfedavg"])
def test_per_client_weighting_is_refused_under_central_dp_and_secure_aggregation(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        CentralDP(build(name), noise_multiplier=1.0, clip=1.0, num_clients=10, clients_per_round=5)
    with pytest.raises(ConfigError, match=name):
        build(name).secure_terms(1, 5, 1000)


@pytest.mark.parametrize("name", ["scaffold", "fednova", "qfedavg"])
def test_per_client_reports_are_refused_under_local_dp(name: str) -> None:
    from pollinate.privacy import LocalDPLedger

    with pytest.raises(ConfigError, match=f"local DP.*{name}"):
        LocalDPLedger(build(name), noise_multiplier=1.0, clip=1.0)
    LocalDPLedger(build("fedprox"), noise_multiplier=1.0, clip=1.0)  # fine


def test_sum_based_presets_take_a_secure_sum() -> None:
    for name in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
        assert build(name).secure_terms(1, 5, 1000).weight_cap == 1000


def test_unknown_name_and_foreign_parameter_are_named() -> None:
    with pytest.raises(ConfigError, match="fedprox"):
        make_strategy("fedavg", {"proximal_mu": 0.1})
    with pytest.raises(ConfigError, match="not a known strategy"):
        make_strategy("fedsgd", {})


def test_a_users_strategy_by_import_path() -> None:
    strategy = make_strategy("tests.test_strategy_library:my_strategy", {}, **COMMON)
    assert isinstance(strategy, FedAvg) and strategy.optimizer.describe()["name"] == "momentum"


def my_strategy(**kw: Any) -> Strategy:
    from pollinate.strategy import FedAvgM

    return FedAvgM(server_momentum=0.5, **kw)


# -- every strategy on every backend, the same history ------------------------------------


def _run_all(backend_name: str, names: list[str]) -> dict[str, Arrays]:
    backend = make_backend(backend_name, workers=2)
    finals = {}
    backend.start(linear_app)
    try:
        for n in names:
            executor = SimulationExecutor(backend, seed=3, deterministic=True)
            result = run(build(n, fraction_train=0.5), executor, range(8), initial(), 3)
            finals[n] = result.arrays
    finally:
        backend.close()
    return finals


def test_every_strategy_gives_the_same_model_sequential_and_process() -> None:
    names = VECTOR_PRESETS
    sequential = _run_all("sequential", names)
    process = _run_all("process", names)
    for n in names:
        for a, b in zip(sequential[n], process[n]):
            np.testing.assert_array_equal(a, b, err_msg=n)


@pytest.mark.slow
def test_every_strategy_gives_the_same_model_on_ray() -> None:
    names = VECTOR_PRESETS
    sequential = _run_all("sequential", names)
    ray = _run_all("ray", names)
    for n in names:
        for a, b in zip(sequential[n], ray[n]):
            np.testing.assert_array_equal(a, b, err_msg=n)


def test_simulate_with_a_preset_reduces_the_loss() -> None:
    result = simulate(
        linear_app,
        num_clients=6,
        strategy=build("fedadam"),
        initial_arrays=initial(),
        rounds=8,
        backend="sequential",
    )
    losses = result.history.metric("federated", "loss")
    assert losses[-1] < losses[0] / 2


def test_oversized_metrics_are_rejected_and_long_strings_clipped_in_history() -> None:
    from pollinate.server import make_record
    from pollinate.strategy.base import TrainSummary

    arrays = initial()
    flood = {f"k{i}": "x" * 300 for i in range(9000)}  # 2.8 MB of strings
    ok = TrainRes([a.copy() for a in arrays], 5, {"note": "y" * 5000})
    outcomes = [
        Outcome(0, "train", result=ok),
        Outcome(1, "train", result=TrainRes([a.copy() for a in arrays], 5, flood)),
    ]
    summary = build("fedavg").aggregate_train(1, arrays, outcomes)
    assert [f.client_id for f in summary.failures] == [1]
    assert summary.failures[0].kind == "rejected"
    record = make_record(1, 0.0, summary, None, None)
    assert len(record["clients"]["0"]["train"]["note"]) < 5000
    assert isinstance(summary, TrainSummary)
