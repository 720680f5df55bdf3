"""What only the Ray backend does: own or reuse a Ray, reach clusters, match the others.

The backend contract (timeouts, dead actors, failures, caches) is in test_backends.py.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pollinate.errors import BackendError, ConfigError, MissingDependencyError
from pollinate.server import Callback, History
from pollinate.simulation import simulate
from pollinate.simulation.backends.ray import RayBackend
from pollinate.strategy.fedavg import FedAvg
from pollinate.types import Arrays, Task
from tests.fakes import MeanClient, MeanClientFn, SlowStartClientFn, cache_client_fn, initial
from tests.waiting import patience


def _comparable(history: History) -> dict[str, Any]:
    data = copy.deepcopy(history.to_dict())
    for record in data["rounds"]:
        del record["wall_s"]
        del record["train"]["metrics"]["worker_pid"]
        for client in record["clients"].values():
            client.get("train", {}).pop("worker_pid", None)
    return data


def test_missing_ray_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'pollinate\[ray\]'"):
        RayBackend().start(MeanClientFn())


@pytest.mark.parametrize("kwargs", [{"workers": 0}, {"threads_per_worker": 0}])
def test_bad_sizes_are_config_errors(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        RayBackend(**kwargs)


def test_run_before_start_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="before start"):
        next(RayBackend().run(initial(), [Task(0, "train", {})], time.monotonic() + 1))


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "localhost:1"])
def test_unreachable_cluster_is_a_clear_backend_error(address: str) -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")
    backend = RayBackend(address=address, connect_timeout_s=5)
    with pytest.raises(BackendError, match="cannot reach a Ray cluster") as info:
        backend.start(MeanClientFn())
    assert address in str(info.value) and "ray start --head" in str(info.value)
    assert not ray.is_initialized()
    backend.close()


class _RayWatcher(Callback):
    def __init__(self) -> None:
        self.running: list[bool] = []

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        import ray

        self.running.append(ray.is_initialized())


@pytest.mark.slow
def test_local_ray_is_started_and_stopped_and_matches_sequential() -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray is already running in this process")

    def once(backend: str, callbacks: list[Callback]) -> tuple[History, Arrays]:
        result = simulate(
            MeanClientFn({2: "raise", 4: "nan"}),
            num_clients=7,
            strategy=FedAvg(fraction_train=0.8, min_train_clients=1, seed=3),
            initial_arrays=[np.full((3, 4), 0.3, np.float32), np.zeros(2, np.int64)],
            rounds=2,
            backend=backend,
            workers=2,
            seed=3,
            deterministic=True,
            callbacks=callbacks,
        )
        return result.history, result.arrays

    watcher = _RayWatcher()
    ray_history, ray_arrays = once("ray", [watcher])
    assert watcher.running == [True, True]  # the backend started a local Ray …
    assert not ray.is_initialized()  # … and stopped it on close
    seq_history, seq_arrays = once("sequential", [])
    assert _comparable(ray_history) == _comparable(seq_history)
    for a, b in zip(ray_arrays, seq_arrays):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    """A Ray this module starts itself; backends must reuse it and leave it running."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
        )
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_a_running_ray_is_reused_and_left_running(ray_session: Any) -> None:
    tasks = [Task(cid, "train", {"seed": cid}) for cid in range(6)]
    pids = []
    for _ in range(2):  # start → run → close twice on the same Ray
        backend = RayBackend(workers=2, threads_per_worker=2)
        backend.start(cache_client_fn)
        try:
            outcomes = list(backend.run(initial(), tasks, time.monotonic() + 60))
        finally:
            backend.close()
        assert ray_session.is_initialized()
        assert sorted(o.client_id for o in outcomes) == list(range(6))
        assert all(o.ok for o in outcomes)
        assert {o.result.metrics["omp_num_threads"] for o in outcomes} == {"2"}
        pids.append({o.result.metrics["worker_pid"] for o in outcomes})
    assert not pids[0] & pids[1]  # close() killed the first backend's actors


@pytest.mark.slow
def test_a_lambda_client_fn_runs_on_ray(ray_session: Any) -> None:
    result = simulate(
        lambda ctx: MeanClient(ctx, {}),  # Ray's serializer takes what pickle cannot
        num_clients=3,
        strategy=FedAvg(min_train_clients=3, fraction_evaluate=0.0),
        initial_arrays=initial(),
        rounds=1,
        backend=RayBackend(workers=2),
    )
    np.testing.assert_allclose(result.arrays[0], (0 * 1 + 1 * 2 + 2 * 3) / 6)
    assert ray_session.is_initialized()


@pytest.mark.slow
def test_actors_that_cannot_start_are_a_backend_error(ray_session: Any) -> None:
    backend = RayBackend(workers=1, threads_per_worker=64, connect_timeout_s=3)
    with pytest.raises(BackendError, match="enough CPUs"):
        backend.start(MeanClientFn())
    assert ray_session.is_initialized()


@pytest.mark.slow
def test_a_replacement_actor_takes_tasks_only_once_it_is_up(ray_session: Any) -> None:
    # every actor takes 3 s to start; client 5 sleeps past each round's 2 s deadline (both
    # scaled alike on a busy machine, so the quick clients still finish in time)
    scale = patience(1.0)
    backend = RayBackend(workers=2)
    backend.start(SlowStartClientFn({5: "sleep"}, delay_s=3.0 * scale))
    try:
        tasks = [Task(cid, "train", {"seed": cid, "sleep_s": 60}) for cid in range(6)]
        rounds = [
            list(backend.run(initial(), tasks, time.monotonic() + 2 * scale)) for _ in range(2)
        ]
        for ref in list(backend._starting):  # wait for the replacements to come up
            ray_session.get(ref, timeout=patience(60))
        third = list(backend.run(initial(), tasks[:5], time.monotonic() + 60))
    finally:
        backend.close()
    assert all(o.ok for o in third)
    served = {o.result.metrics["worker_pid"] for o in third}
    first = {o.result.metrics["worker_pid"] for o in rounds[0] if o.ok}
    survivor = {o.result.metrics["worker_pid"] for o in rounds[1] if o.ok}
    # both actors that ran the sleeper were replaced; both replacements serve, no killed one
    assert len(served) == 2 and not served & (first | survivor)
    for outcomes in rounds[:2]:
        assert sorted(o.client_id for o in outcomes) == list(range(6))
        failed = [(o.client_id, o.error) for o in outcomes if not o.ok]
        assert failed == [(5, "timeout: still running at the round deadline")]
    # round 2 began while the sleeper's replacement was still starting: the other actor
    # served every task instead of one waiting 3 s for the newcomer and missing the deadline
    assert len({o.result.metrics["worker_pid"] for o in rounds[1] if o.ok}) == 1
