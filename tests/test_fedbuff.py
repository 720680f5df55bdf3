"""FedBuff (Nguyen et al. 2022): staleness weights and server steps computed by hand, the
event order on the virtual clock, reproducibility, failures, and the run config."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate.asynchronous import run_async
from pollinate.compression import Compression
from pollinate.config import from_dict, load
from pollinate.deploy import Security, serve
from pollinate.errors import ConfigError, RoundFailedError
from pollinate.experiment import build_run, run_experiment
from pollinate.simulation.async_clock import AsyncClock
from pollinate.simulation.backends.sequential import SequentialBackend
from pollinate.simulation.engine import SimulationExecutor, simulate
from pollinate.simulation.environment import Environment
from pollinate.state import ServerState
from pollinate.strategy.aggregators import Median
from pollinate.strategy.fedbuff import FedBuff, Staleness
from pollinate.strategy.presets import make_strategy
from pollinate.types import Outcome, TrainRes
from tests.fakes import MeanClientFn, initial

ROOT = Path(__file__).resolve().parents[1]


def _result(cid: int, value: float, n: int = 1) -> Outcome:
    arrays = [np.full((3, 4), value, dtype=np.float32), np.zeros(2, dtype=np.int64)]
    return Outcome(cid, "train", TrainRes(arrays, n, {"loss": float(cid)}))


def _strip(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A history without what measures this machine: wall time and worker pids."""
    out = []
    for r in rounds:
        r = {k: v for k, v in r.items() if k != "wall_s"}
        r["train"] = {**r["train"], "metrics": {**r["train"]["metrics"], "worker_pid": 0}}
        r["clients"] = {
            cid: {**c, "train": {**c["train"], "worker_pid": 0}} for cid, c in r["clients"].items()
        }
        out.append(r)
    return out


# staleness and the server step, by hand --------------------------------------------------


def test_staleness_functions_by_hand() -> None:
    assert [Staleness("constant")(t) for t in (0, 3, 100)] == [1.0, 1.0, 1.0]
    assert Staleness("sqrt")(0) == 1.0 and Staleness("sqrt")(3) == 0.5  # 1/√(1+3)
    assert Staleness("sqrt")(8) == pytest.approx(1 / 3)
    hinge = Staleness("hinge", a=10, b=4)
    assert [hinge(t) for t in (0, 4)] == [1.0, 1.0]
    assert hinge(5) == pytest.approx(1 / 11) and hinge(6) == pytest.approx(1 / 21)
    with pytest.raises(ConfigError, match="one of constant, sqrt, hinge"):
        Staleness("linear")
    with pytest.raises(ConfigError, match="hinge_a"):
        Staleness("hinge", a=-1)


def test_three_clients_with_known_updates_and_versions_give_the_exact_model() -> None:
    """M = 2, s(τ) = 1/√(1+τ), plain step η = 1, model x₀ = 0. Clients 1 and 2 start from
    x₀ and return 1 and 2: Δ̄ = (1 + 2)/2, x₁ = 1.5. Client 3 started from x₀ too and returns
    3 one step stale (τ = 1); client 4 starts from x₁ and returns 4 (τ = 0):
    Δ̄ = ((3 − 0)/√2 + (4 − 1.5))/2, x₂ = 1.5 + Δ̄."""
    fb = FedBuff(concurrency=3, buffer_size=2, staleness="sqrt")
    x0 = initial()
    ins0 = fb.instructions(x0)
    assert fb.instructions(x0) is ins0 and fb.instructions(x0) is ins0  # one per version
    assert ins0.config["round"] == 1
    assert fb.fold(_result(1, 1.0), 0) is None and not fb.full
    assert fb.fold(_result(2, 2.0), 0) is None and fb.full
    x1, summary, staleness = fb.step(x0)
    assert staleness == [0, 0] and summary.clients == 2 and fb.version == 1
    np.testing.assert_allclose(x1[0], 1.5)
    np.testing.assert_array_equal(x1[1], [0, 0])  # integer arrays take no update
    assert fb.instructions(x1).config["round"] == 2
    assert fb.fold(_result(3, 3.0), 0) is None
    assert fb.versions_held() == 1  # x₀ is dropped once no client in flight started from it
    assert fb.fold(_result(4, 4.0), 1) is None
    x2, summary, staleness = fb.step(x1)
    assert staleness == [1, 0]
    expected = 1.5 + (3 / math.sqrt(2) + 2.5) / 2
    np.testing.assert_allclose(x2[0], expected, rtol=1e-6)
    assert x2[0].dtype == np.float32 and fb.version == 2


def test_a_client_twice_in_one_step_is_recorded_once_with_both_results() -> None:
    """A fast client can finish, be picked again and finish again before the step: both
    results count (M = 2), and its record sums the examples (3 + 1) and averages the loss
    by examples ((3·1.0 + 1·5.0)/4 = 2.0)."""
    fb = FedBuff(concurrency=2, buffer_size=2)
    x0 = initial()
    fb.instructions(x0)
    fb.instructions(x0)
    arrays = initial()
    for loss, n in ((1.0, 3), (5.0, 1)):
        assert fb.fold(Outcome(7, "train", TrainRes(arrays, n, {"loss": loss})), 0) is None
    _, summary, _ = fb.step(x0)
    assert summary.clients == 2 and summary.per_client == {7: (4, {"loss": 2.0})}
    assert summary.metrics["loss"] == 2.0


def test_the_step_goes_through_the_server_optimizer_and_hinge_weights() -> None:
    """η = 0.5 with hinge(a = 1, b = 0): x₀ = 0, a fresh result 2 (weight 1) and a result 4
    one step stale (weight 1/(1·1 + 1) = 1/2) from x₀ after x₁ = 0.5·1 = 0.5 (M = 1)."""
    fb = FedBuff(concurrency=2, buffer_size=1, staleness="hinge", hinge_a=1, hinge_b=0)
    fb.optimizer = make_strategy("fedbuff", {"server_lr": 0.5}).optimizer  # type: ignore[attr-defined]
    x0 = initial()
    fb.instructions(x0)
    fb.instructions(x0)
    fb.fold(_result(0, 1.0), 0)
    x1, _, _ = fb.step(x0)
    np.testing.assert_allclose(x1[0], 0.5)
    fb.fold(_result(1, 4.0), 0)  # τ = 1: weight 1/2, Δ = 4 − 0
    x2, _, staleness = fb.step(x1)
    assert staleness == [1]
    np.testing.assert_allclose(x2[0], 0.5 + 0.5 * (0.5 * 4.0))


def test_a_bad_update_is_counted_never_buffered() -> None:
    fb = FedBuff(concurrency=2, buffer_size=1)
    x0 = initial()
    fb.instructions(x0)
    fb.instructions(x0)
    failure = fb.fold(_result(0, float("nan")), 0)
    assert failure is not None and failure.kind == "rejected" and "NaN" in failure.reason
    crashed = fb.fold(Outcome(1, "train", error="RuntimeError: boom"), 0)
    assert crashed is not None and crashed.kind == "error"
    assert not fb.full and fb.buffered == 0


def test_parts_fedbuff_cannot_use_are_refused_naming_both() -> None:
    with pytest.raises(ConfigError, match="fedbuff with the aggregator 'median'"):
        FedBuff(aggregator=Median())
    with pytest.raises(ConfigError, match="concurrency must be an integer >= 1"):
        FedBuff(concurrency=0)


# on the virtual clock --------------------------------------------------------------------


def _evaluate(arrays: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
    return float(arrays[0].mean()), {"mean": float(arrays[0].mean())}


def test_events_on_the_virtual_clock_by_hand(tmp_path: Path) -> None:
    """Clients 0, 1, 2 hold 1, 2, 3 examples (MeanClient returns its id) at 5, 0.5 and 1
    simulated s per example: they take 5, 1 and 3 s. K = 3, M = 1, sqrt staleness, x₀ = 0.
    t = 1: client 1 (τ 0), x₁ = 1; client 1, the only idle one, starts again: t = 2, x₂ = 1;
    and again: at t = 3 client 2 (dispatched at 0, τ = 2) and client 1 (dispatched at 2) tie,
    and the earlier dispatch goes first: x₃ = 1 + (2 − 0)/√3."""
    trace = tmp_path / "clients.csv"
    trace.write_text("seconds_per_example\n5\n0.5\n1\n")
    result = simulate(
        MeanClientFn(),
        num_clients=3,
        strategy=FedBuff(concurrency=3, buffer_size=1, evaluate_fn=_evaluate),
        initial_arrays=initial(),
        rounds=3,
        backend="sequential",
        environment=Environment.from_trace(trace, 3),
    )
    steps = result.history.rounds
    assert [r["environment"]["clock_s"] for r in steps] == [1.0, 2.0, 3.0]
    assert [r["environment"]["simulated_time_s"] for r in steps] == [1.0, 1.0, 1.0]
    assert [list(r["clients"]) for r in steps] == [["1"], ["1"], ["2"]]
    assert [r["async"]["max_staleness"] for r in steps] == [0, 0, 2]
    assert [r["async"]["dispatched"] for r in steps] == [3, 4, 5]  # before the refill
    np.testing.assert_allclose(result.arrays[0], 1 + 2 / math.sqrt(3), rtol=1e-6)
    assert steps[-1]["centralized"]["mean"] == pytest.approx(1 + 2 / math.sqrt(3), rel=1e-6)


def _three_steps_compressed(tmp_path: Path, compression: Compression) -> Any:
    """The by-hand run (M = 1, three clients at 5, 0.5 and 1 s an example) with
    ``compression``."""
    trace = tmp_path / "clients.csv"
    trace.write_text("seconds_per_example\n5\n0.5\n1\n")
    return simulate(
        compression.client(MeanClientFn()),
        num_clients=3,
        strategy=FedBuff(concurrency=3, buffer_size=1, transforms=[compression]),
        initial_arrays=initial(),
        rounds=3,
        backend="sequential",
        environment=Environment.from_trace(trace, 3),
    )


def test_compressed_updates_are_decoded_against_the_model_their_client_started_from(
    tmp_path: Path,
) -> None:
    """The by-hand run above with fp16 updates Δ = w − x_v (exact here): client 2's update
    arrives two steps late and must be decoded against x₀ = 0, not the current x₂ = 1."""
    result = _three_steps_compressed(tmp_path, Compression(uplink="fp16"))
    assert [list(r["clients"]) for r in result.history.rounds] == [["1"], ["1"], ["2"]]
    np.testing.assert_allclose(result.arrays[0], 1 + 2 / math.sqrt(3), rtol=1e-6)


def test_compressed_downlink_and_uplink_decode_against_the_model_before_encoding(
    tmp_path: Path,
) -> None:
    """The same run with the model also sent as fp16: the clients receive an encoded model,
    but their updates are decoded against the model before encoding (as FedAvg does), so
    every update is accepted and the steps are those computed by hand above."""
    result = _three_steps_compressed(tmp_path, Compression(uplink="fp16", downlink="fp16"))
    assert all(r["train"]["failures"] == 0 for r in result.history.rounds)
    assert [list(r["clients"]) for r in result.history.rounds] == [["1"], ["1"], ["2"]]
    np.testing.assert_allclose(result.arrays[0], 1 + 2 / math.sqrt(3), rtol=1e-3)


def test_without_an_environment_every_client_takes_1_ms_per_example() -> None:
    result = simulate(
        MeanClientFn(),
        num_clients=3,
        strategy=FedBuff(concurrency=3, buffer_size=1),
        initial_arrays=initial(),
        rounds=1,
        backend="sequential",
    )
    record = result.history.rounds[0]
    assert record["environment"]["clock_s"] == 0.001 and list(record["clients"]) == ["0"]


TIERS = [
    {"share": 0.8, "seconds_per_example": 0.01, "downlink_mbps": 1, "latency_ms": 50},
    {"share": 0.2, "seconds_per_example": 0.2, "latency_ms": 500, "online": 0.7, "loss": 0.4},
]


def _tiered_run(backend: str, seed: int = 1) -> Any:
    return simulate(
        MeanClientFn({cid: "raise" for cid in range(0, 40, 5)}),
        num_clients=40,
        strategy=FedBuff(concurrency=8, buffer_size=3, evaluate_fn=_evaluate, evaluate_every=5),
        initial_arrays=initial(),
        rounds=15,
        backend=backend,
        workers=2,
        environment=Environment.from_tiers(TIERS, 40, seed=seed),
        deadline_s=1.5,
    )


def test_the_same_seed_gives_the_same_history_on_the_sequential_and_process_backends() -> None:
    sequential = _tiered_run("sequential")
    process = _tiered_run("process")
    assert _strip(sequential.history.rounds) == _strip(process.history.rounds)
    assert _strip(_tiered_run("sequential").history.rounds) == _strip(sequential.history.rounds)
    for a, b in zip(sequential.arrays, process.arrays):
        np.testing.assert_array_equal(a, b)
    steps = sequential.history.rounds
    assert len(steps) == 15 and all(r["async"]["applied"] == 3 for r in steps)
    assert [("centralized" in r) for r in steps] == [(s % 5 == 0) for s in range(1, 16)]
    clocks = [r["environment"]["clock_s"] for r in steps]
    assert clocks == sorted(clocks) and clocks[0] > 0
    # failures of every kind are counted and their slots refilled, never averaged in
    kinds = {f["kind"] for r in steps for f in r["failures"]}
    assert {"offline", "lost", "error", "timeout"} <= kinds, kinds
    for kind in ("offline", "lost"):  # the clock's counts are the failures of each step
        assert [r["environment"]["train"][kind] for r in steps] == [
            sum(f["kind"] == kind for f in r["failures"]) for r in steps
        ]
    assert sum(r["environment"]["bytes_down"] for r in steps) > 0
    assert _strip(_tiered_run("sequential", seed=2).history.rounds) != _strip(steps)


class _NoPrefetch(AsyncClock):
    prefetch = None  # type: ignore[assignment]  # the loop then never trains ahead


def _drive(clock_type: type[AsyncClock]) -> tuple[list[dict[str, Any]], int]:
    """FedBuff through ``run_async`` by hand, on a clock that trains ahead or not; returns
    the history and how many tasks the backend ran."""
    backend = SequentialBackend()
    backend.start(MeanClientFn())
    ran = 0
    executor = SimulationExecutor(backend, seed=4)
    submit = executor.submit_tasks

    def counted(*args: Any, **kw: Any) -> Any:
        nonlocal ran
        for outcome in submit(*args, **kw):
            ran += 1
            yield outcome

    executor.submit_tasks = counted  # type: ignore[method-assign]
    tiers = [
        {"share": 0.7, "seconds_per_example": 0.01, "latency_ms": 50},
        {"share": 0.3, "seconds_per_example": 0.05},
    ]
    env = Environment.from_tiers(tiers, 30, seed=4)
    clock = clock_type(executor, env, timeout_s=60.0)
    strategy = FedBuff(concurrency=10, buffer_size=4, seed=4)
    result = run_async(strategy, clock, range(30), initial(), 20, clock=lambda: clock.now)
    backend.close()
    return _strip(result.history.rounds), ran


def test_training_ahead_changes_nothing_but_the_batches() -> None:
    """Results trained ahead of their dispatch (in the same batch as a needed one) give the
    same history as training each client when the clock needs it, client state included:
    MeanClient counts its trainings in its state, and each client's count goes 1, 2, 3 …"""
    ahead, ran_ahead = _drive(AsyncClock)
    plain, ran_plain = _drive(_NoPrefetch)
    assert ahead == plain
    assert ran_ahead >= ran_plain  # wrong guesses cost work, never results
    counts: dict[str, list[int]] = {}
    for record in ahead:
        for cid, entry in record["clients"].items():
            counts.setdefault(cid, []).append(entry["train"]["state_rounds"])
    assert all(c == sorted(set(c)) for c in counts.values()), counts
    assert max(len(c) for c in counts.values()) >= 3


def test_a_run_where_no_client_can_deliver_stops_with_a_clear_error() -> None:
    everyone_offline = Environment.from_tiers([{"share": 1.0, "online": 0.0}], 5)
    with pytest.raises(RoundFailedError, match="failed in a row.*offline"):
        simulate(
            MeanClientFn(),
            num_clients=5,
            strategy=FedBuff(concurrency=2, buffer_size=1),
            initial_arrays=initial(),
            rounds=2,
            backend="sequential",
            environment=everyone_offline,
        )


# the run config --------------------------------------------------------------------------


def _cfg(**strategy: Any) -> dict[str, Any]:
    return {"data": {"num_clients": 10}, "strategy": {"name": "fedbuff", **strategy}}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"privacy": {"mode": "central"}}, "'fedbuff' with privacy.mode = 'central'"),
        ({"secure_aggregation": {"enabled": True}}, "'fedbuff' with secure_aggregation"),
        ({"attack": {"kind": "sign_flip"}}, "'fedbuff' with attack.kind = 'sign_flip'"),
        ({"strategy": {"selection": "poisson"}}, "'fedbuff' with strategy.selection"),
        ({"strategy": {"staleness": "linear"}}, "staleness = 'linear' is not allowed"),
        ({"strategy": {"hinge_a": 2.0}}, "set strategy.staleness = 'hinge' too"),
        ({"strategy": {"concurrency": 11}}, "concurrency = 11 exceeds data.num_clients = 10"),
        ({"strategy": {"buffer_size": 0}}, "buffer_size must be >= 1"),
    ],
)
def test_config_refuses_what_fedbuff_cannot_do(extra: dict[str, Any], message: str) -> None:
    raw = _cfg()
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_concurrency_defaults_to_10_or_every_client() -> None:
    from pollinate.experiment import build_strategy

    few = from_dict({"data": {"num_clients": 4}, "strategy": {"name": "fedbuff"}})
    assert build_strategy(few, None).concurrency == 4  # type: ignore[attr-defined]
    assert build_strategy(from_dict(_cfg()), None).concurrency == 10  # type: ignore[attr-defined]


def test_fedbuff_keys_belong_to_fedbuff_only() -> None:
    with pytest.raises(ConfigError, match="concurrency does not apply to strategy 'fedavg'"):
        from_dict({"strategy": {"concurrency": 4}})
    cfg = from_dict(_cfg(concurrency=4, buffer_size=2, staleness="hinge", hinge_b=2.0))
    assert (cfg.strategy.concurrency, cfg.strategy.staleness) == (4, "hinge")


def test_example_config_runs_writes_server_steps_and_refuses_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load(
        ROOT / "examples" / "fedbuff.toml",
        [f"run.output={out.as_posix()}", "run.rounds=6", "strategy.evaluate_every=3"],
    )
    result = run_experiment(cfg, quiet=True)
    steps = result.history.rounds
    assert [r["round"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["async"]["applied"] == 3 for r in steps)
    assert [("centralized" in r) for r in steps] == [False, False, True, False, False, True]
    assert steps[-1]["centralized"]["accuracy"] > 0.5  # digits: chance is 0.1
    assert steps[-1]["environment"]["clock_s"] > 0
    for name in ("history.json", "accuracy.png", "accuracy_time.png", "checkpoints/last.npz"):
        assert (out / name).is_file(), name
    with pytest.raises(ConfigError, match="fedbuff cannot resume.*--fresh"):
        run_experiment(cfg, quiet=True)


@pytest.mark.slow
def test_the_readme_fedbuff_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "FedBuff(" in b)
    (tmp_path / "example.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    clock_s, accuracy = map(float, re.findall(r"\d+\.\d+", proc.stdout.splitlines()[-1]))
    assert clock_s > 0 and accuracy > 0.6


def test_a_server_refuses_to_resume_a_fedbuff_run(tmp_path: Path) -> None:
    """A deployed FedBuff run stopped after a server step is refused with the way out, before
    the server listens."""
    cfg = from_dict(
        {
            "run": {"output": (tmp_path / "deployed").as_posix()},
            "data": {"num_clients": 4},
            "strategy": {"name": "fedbuff", "concurrency": 2, "buffer_size": 2},
        }
    )
    arrays = build_run(cfg).initial_arrays
    state = ServerState.open(cfg.output_dir / "server.sqlite", cfg.to_dict())
    state.record_round(1, {"round": 1}, arrays, strategy_state={"version": 1})
    state.close()
    with pytest.raises(ConfigError, match="fedbuff cannot resume.*--fresh"):
        serve(cfg, "127.0.0.1:0", Security(insecure=True), quiet=True)
