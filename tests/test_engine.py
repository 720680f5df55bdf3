"""simulate(): whole runs with virtual clients, checked against numbers computed by hand."""

from __future__ import annotations

import copy
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate.client import ClientContext, MemoryStateStore, task_seed
from pollinate.errors import ConfigError, RoundFailedError
from pollinate.server import Callback, History
from pollinate.simulation import simulate
from pollinate.strategy.fedavg import FedAvg
from pollinate.types import Arrays, Outcome
from tests.fakes import MeanClient, MeanClientFn, initial


def _strategy(**kwargs: Any) -> FedAvg:
    return FedAvg(**{"min_train_clients": 1, "min_available_clients": 1, **kwargs})


def _comparable(history: History) -> dict[str, Any]:
    """The history without what legitimately differs between backends (time, worker pid)."""
    data = copy.deepcopy(history.to_dict())
    for record in data["rounds"]:
        del record["wall_s"]
        del record["train"]["metrics"]["worker_pid"]
        for client in record["clients"].values():
            client.get("train", {}).pop("worker_pid", None)
    return data


def test_simulate_end_to_end_matches_the_hand_computed_mean() -> None:
    n, rounds = 5, 3
    result = simulate(
        MeanClientFn(),
        num_clients=n,
        strategy=_strategy(min_train_clients=2, min_evaluate_clients=2),
        initial_arrays=initial(),
        rounds=rounds,
        backend="sequential",
        seed=11,
    )
    weights = np.arange(1, n + 1)  # client i holds i + 1 examples of value i
    mean = float((np.arange(n) * weights).sum() / weights.sum())  # 40 / 15
    value, counter = result.arrays
    assert value.dtype == np.float32 and counter.dtype == np.int64
    np.testing.assert_allclose(value, np.full((3, 4), mean), rtol=1e-6)
    np.testing.assert_array_equal(counter, [rounds, rounds])  # every client adds one per round

    history = result.history
    assert [r["round"] for r in history.rounds] == [1, 2, 3]
    losses = np.abs(mean - np.arange(n))
    for r, record in enumerate(history.rounds, start=1):
        assert record["train"] == {
            "clients": n,
            "failures": 0,
            "timeouts": 0,
            "rejected": 0,
            "metrics": record["train"]["metrics"],
        }
        metrics = record["train"]["metrics"]
        assert metrics["loss"] == pytest.approx(mean)  # loss = client id, example-weighted
        assert metrics["state_rounds"] == pytest.approx(r)
        federated = record["federated"]
        assert federated["clients"] == n
        assert federated["loss"] == pytest.approx(float((losses * weights).sum() / weights.sum()))
        accuracy = float((weights / (1 + losses)).sum() / weights.sum())
        assert federated["accuracy"] == pytest.approx(accuracy, rel=1e-5)
        assert "centralized" not in record  # not computed: absent, never faked
        for cid in range(n):
            entry = record["clients"][str(cid)]
            assert entry["num_examples"] == cid + 1
            assert entry["train"]["seed"] == task_seed(11, r, cid) % 1000
            assert entry["evaluate"]["loss"] == pytest.approx(losses[cid], rel=1e-5)
        assert record["failures"] == []


def test_centralized_evaluation_is_recorded() -> None:
    seen: list[float] = []

    def evaluate_fn(arrays: Arrays) -> tuple[float, dict[str, float]]:
        seen.append(float(arrays[0].mean()))
        return 1.5, {"accuracy": 0.5}

    result = simulate(
        MeanClientFn(),
        num_clients=3,
        strategy=_strategy(evaluate_fn=evaluate_fn, fraction_evaluate=0.0),
        initial_arrays=initial(),
        rounds=2,
        backend="sequential",
    )
    assert result.history.metric("centralized", "accuracy") == [0.5, 0.5]
    assert result.history.metric("federated", "loss") == [None, None]
    assert seen == pytest.approx([4 / 3, 4 / 3])  # evaluated on the new global model


def test_process_and_sequential_give_identical_histories() -> None:
    def once(backend: str) -> tuple[History, Arrays]:
        result = simulate(
            MeanClientFn({3: "raise", 6: "nan"}),
            num_clients=9,
            strategy=_strategy(fraction_train=0.7, fraction_evaluate=0.5, seed=5),
            initial_arrays=[np.full((3, 4), 0.1, np.float32), np.zeros(2, np.int64)],
            rounds=3,
            backend=backend,
            workers=2,
            seed=5,
            deterministic=True,
        )
        return result.history, result.arrays

    seq_history, seq_arrays = once("sequential")
    proc_history, proc_arrays = once("process")
    assert _comparable(proc_history) == _comparable(seq_history)
    for a, b in zip(proc_arrays, seq_arrays):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    failed = {(f["client_id"], f["kind"]) for r in seq_history.rounds for f in r["failures"]}
    assert failed  # the comparison covered failures too


def test_too_few_clients_fails_the_round_naming_them() -> None:
    with pytest.raises(RoundFailedError) as info:
        simulate(
            MeanClientFn({0: "raise", 1: "raise", 2: "nan"}),
            num_clients=4,
            strategy=_strategy(min_train_clients=2),
            initial_arrays=initial(),
            rounds=2,
            backend="sequential",
        )
    message = str(info.value)
    assert "round 1" in message and "min_train_clients=2" in message
    assert "client 0: RuntimeError: client 0 exploded" in message
    assert "client 1: RuntimeError: client 1 exploded" in message
    assert "client 2: update rejected" in message


def test_history_records_failures_per_round() -> None:
    result = simulate(
        MeanClientFn({1: "raise"}),
        num_clients=4,
        strategy=_strategy(),
        initial_arrays=initial(),
        rounds=2,
        backend="sequential",
    )
    for record in result.history.rounds:
        assert record["train"]["clients"] == 3 and record["train"]["failures"] == 1
        assert record["federated"]["clients"] == 3
        assert sorted((f["client_id"], f["task"], f["kind"]) for f in record["failures"]) == [
            (1, "evaluate", "error"),
            (1, "train", "error"),
        ]
        assert "exploded" in next(f["reason"] for f in record["failures"] if f["task"] == "train")
        assert "1" not in record["clients"]


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_run_start(self, rounds: int, start_round: int) -> None:
        self.events.append(("run_start", rounds, start_round))

    def on_round_start(self, round_number: int) -> None:
        self.events.append(("round_start", round_number))

    def on_task_done(self, round_number: int, outcome: Outcome, done: int, total: int) -> None:
        self.events.append(("task", round_number, outcome.kind, outcome.client_id, done, total))

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        self.events.append(("round_end", record["round"], float(arrays[0][0, 0])))

    def on_run_end(self, history: History, error: BaseException | None) -> None:
        self.events.append(("run_end", len(history.rounds), type(error).__name__))


@pytest.mark.parametrize("backend", ["sequential", "process"])
def test_callbacks_receive_every_task(backend: str) -> None:
    recorder = Recorder()
    simulate(
        MeanClientFn({2: "raise"}),
        num_clients=4,
        strategy=_strategy(),
        initial_arrays=initial(),
        rounds=2,
        backend=backend,
        callbacks=[recorder],
    )
    events = recorder.events
    assert events[0] == ("run_start", 2, 1)
    assert events[-1] == ("run_end", 2, "NoneType")
    for r in (1, 2):
        tasks = [e for e in events if e[0] == "task" and e[1] == r]
        for kind in ("train", "evaluate"):
            mine = [e for e in tasks if e[2] == kind]
            assert sorted(e[3] for e in mine) == [0, 1, 2, 3]  # failures are tasks too
            assert [e[4] for e in mine] == [1, 2, 3, 4] and {e[5] for e in mine} == {4}
    starts = [i for i, e in enumerate(events) if e[0] == "round_start"]
    ends = [i for i, e in enumerate(events) if e[0] == "round_end"]
    assert len(starts) == len(ends) == 2 and starts[0] < ends[0] < starts[1] < ends[1]
    mean = (0 * 1 + 1 * 2 + 3 * 4) / 7
    assert events[ends[0]][2] == pytest.approx(mean)


def test_callbacks_see_the_error_that_stops_a_run() -> None:
    recorder = Recorder()
    with pytest.raises(RoundFailedError):
        simulate(
            MeanClientFn({0: "raise", 1: "raise"}),
            num_clients=2,
            strategy=_strategy(),
            initial_arrays=initial(),
            rounds=3,
            backend="sequential",
            callbacks=[recorder],
        )
    assert recorder.events[-1] == ("run_end", 0, "RoundFailedError")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"rounds": 0}, "rounds"),
        ({"backend": "gpu"}, "simulation.backend"),
        ({"backend": "process", "workers": 0}, "workers"),
        ({"backend": "process", "threads_per_worker": 0}, "threads_per_worker"),
        ({"backend": "ray", "workers": 0}, "workers"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = dict(
        num_clients=3, strategy=_strategy(), initial_arrays=initial(), rounds=1
    )
    with pytest.raises(ConfigError, match=match):
        simulate(MeanClientFn(), **{**args, **kwargs})


def test_a_lambda_client_fn_with_the_process_backend_explains_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ConfigError, match="module level") as info:
        simulate(
            lambda ctx: MeanClient(ctx, {}),
            num_clients=2,
            strategy=_strategy(),
            initial_arrays=initial(),
            rounds=1,
            backend="process",
        )
    assert "sequential" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the half-started backend was cleaned up


def test_a_lambda_client_fn_works_with_the_sequential_backend() -> None:
    result = simulate(
        lambda ctx: MeanClient(ctx, {}),
        num_clients=2,
        strategy=_strategy(),
        initial_arrays=initial(),
        rounds=1,
        backend="sequential",
    )
    assert result.history.rounds[0]["train"]["clients"] == 2


class CountingClientFn(MeanClientFn):
    """A ``MeanClientFn`` that counts the clients it builds."""

    def __init__(self) -> None:
        super().__init__()
        self.built: list[int] = []

    def __call__(self, ctx: ClientContext) -> MeanClient:
        self.built.append(ctx.client_id)
        return super().__call__(ctx)


def _sparse_run(num_clients: int) -> tuple[int, CountingClientFn, MemoryStateStore, History]:
    client_fn, store = CountingClientFn(), MemoryStateStore()
    strategy = FedAvg(
        fraction_train=3 / num_clients,
        min_train_clients=3,
        fraction_evaluate=2 / num_clients,
        min_evaluate_clients=2,
        seed=1,
    )
    tracemalloc.start()
    try:
        result = simulate(
            client_fn,
            num_clients=num_clients,
            strategy=strategy,
            initial_arrays=initial(),
            rounds=3,
            backend="sequential",
            state_store=store,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, client_fn, store, result.history


def test_memory_is_flat_in_unsampled_clients() -> None:
    peak_small, *_ = _sparse_run(1_000)
    peak, client_fn, store, history = _sparse_run(1_000_000)
    assert len(client_fn.built) == 3 * (3 + 2)  # only sampled clients were ever built
    assert all(0 <= cid < 1_000_000 for cid in client_fn.built)
    assert len(store) <= 9  # state only for clients that trained
    assert all(len(r["clients"]) <= 5 for r in history.rounds)
    assert peak < peak_small + 1_000_000  # a per-client list of a million would be 8 MB+


def test_clients_failing_alike_log_one_traceback_and_a_count(caplog) -> None:
    """1,000 clients with the same fault must not print 1,000 tracebacks; the history still
    names every failed client."""
    failing = {cid: "raise" for cid in range(2, 9)}  # evaluate raises "boom" in each
    with caplog.at_level("WARNING", logger="pollinate"):
        result = simulate(
            MeanClientFn(failing),
            num_clients=10,
            strategy=_strategy(min_evaluate_clients=1),
            initial_arrays=initial(),
            rounds=1,
            backend="sequential",
        )
    evaluate_lines = [r.getMessage() for r in caplog.records if "in evaluate" in r.getMessage()]
    assert len(evaluate_lines) == 2, evaluate_lines
    assert "client 2 failed in evaluate:\nTraceback" in evaluate_lines[0]
    assert evaluate_lines[1] == (
        "round 1: 6 more clients failed in evaluate with the same error (RuntimeError: boom), "
        "e.g. clients 3, 4, 5, 6, 7"
    )
    # train errors differ ("client 2 exploded", "client 3 exploded" …): one traceback each
    assert sum("failed in train:\nTraceback" in r.getMessage() for r in caplog.records) == 7
    failures = result.history.rounds[0]["failures"]
    assert sorted(f["client_id"] for f in failures if f["task"] == "evaluate") == list(range(2, 9))
