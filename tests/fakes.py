"""Small NumPy clients for engine tests (real arithmetic, no ML framework needed)."""

from __future__ import annotations

import os
import time

import numpy as np

from pollinate.client import ClientContext
from pollinate.types import Arrays, Config, EvaluateRes, QueryRes, TrainRes


class MeanClient:
    """Client ``i`` holds ``i + 1`` examples of value ``i``; training returns its data's mean.

    FedAvg over these clients is therefore the example-weighted mean of client ids, which
    tests can compute by hand.
    """

    def __init__(self, ctx: ClientContext, behaviour: dict[int, str]) -> None:
        self.ctx = ctx
        self.cid = ctx.client_id
        self.behaviour = behaviour.get(self.cid, "")

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        b = self.behaviour
        if b == "raise":
            raise RuntimeError(f"client {self.cid} exploded")
        if b == "sleep":
            time.sleep(float(config.get("sleep_s", 30)))
        if b == "die":
            os._exit(3)
        value = np.full_like(arrays[0], float(self.cid))
        if b == "nan":
            value[...] = np.nan
        if b == "shape":
            value = np.zeros(arrays[0].shape + (2,), dtype=arrays[0].dtype)
        if b == "dtype":
            value = value.astype(np.float64)
        self.ctx.state["rounds"] = self.ctx.state.get("rounds", 0) + 1
        self.ctx.worker["builds"] = self.ctx.worker.get("builds", 0) + 1
        return TrainRes(
            [value, arrays[1] + 1],
            num_examples=self.cid + 1,
            metrics={
                "loss": float(self.cid),
                "seed": int(config["seed"]) % 1000,
                "state_rounds": self.ctx.state["rounds"],
                "worker_pid": os.getpid(),
            },
        )

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        if self.behaviour == "raise":
            raise RuntimeError("boom")
        loss = float(np.abs(arrays[0] - self.cid).mean())
        return EvaluateRes(loss, num_examples=self.cid + 1, metrics={"accuracy": 1.0 / (1 + loss)})

    def query(self, arrays: Arrays, config: Config) -> QueryRes:
        """Local sums of the client's data (``cid + 1`` values ``cid``): [n, Σx, Σx²]."""
        if self.behaviour == "raise":
            raise RuntimeError("refused")
        n = self.cid + 1
        sums = np.array([n, n * self.cid, n * self.cid**2], dtype=np.float64)
        return QueryRes([sums * float(config.get("scale", 1.0))], num_examples=n)


class MeanClientFn:
    """Picklable ``client_fn`` building ``MeanClient``s; ``behaviour`` maps ids to faults."""

    def __init__(self, behaviour: dict[int, str] | None = None) -> None:
        self.behaviour = behaviour or {}

    def __call__(self, ctx: ClientContext) -> MeanClient:
        return MeanClient(ctx, self.behaviour)


def initial() -> Arrays:
    return [np.zeros((3, 4), dtype=np.float32), np.zeros((2,), dtype=np.int64)]


class CacheClient:
    """Reports how often its worker built the "model" and how many tasks the worker ran."""

    def __init__(self, ctx: ClientContext) -> None:
        worker = ctx.worker
        if "model" not in worker:  # the expensive build a real client does once per worker
            worker["model_builds"] = worker.get("model_builds", 0) + 1
            worker["model"] = np.zeros(3)
        worker["tasks"] = worker.get("tasks", 0) + 1
        self.worker = worker

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        metrics = {
            "worker_pid": os.getpid(),
            "model_builds": self.worker["model_builds"],
            "worker_tasks": self.worker["tasks"],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        }
        return TrainRes(list(arrays), num_examples=1, metrics=metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return EvaluateRes(0.0, num_examples=1)


def cache_client_fn(ctx: ClientContext) -> CacheClient:
    """A module-level (picklable) ``client_fn`` building ``CacheClient``s."""
    return CacheClient(ctx)


class SlowStartClientFn(MeanClientFn):
    """A ``MeanClientFn`` that takes ``delay_s`` to unpickle: a worker that is slow to start."""

    def __init__(self, behaviour: dict[int, str] | None = None, delay_s: float = 3.0) -> None:
        super().__init__(behaviour)
        self.delay_s = delay_s

    def __setstate__(self, state: dict[str, object]) -> None:
        time.sleep(float(state["delay_s"]))  # type: ignore[arg-type]
        self.__dict__.update(state)


class CarryClient:
    """Carries a large array through its saved state: each train task returns the state's
    ``carry`` plus one as the new ``carry``, and ``arrays[0] + client_id`` as the update."""

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx = ctx

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        carry = self.ctx.state["carry"]
        self.ctx.state["carry"] = carry + 1.0
        return TrainRes([arrays[0] + np.float32(self.ctx.client_id)], num_examples=1)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return EvaluateRes(0.0, num_examples=1)


def carry_client_fn(ctx: ClientContext) -> CarryClient:
    """A module-level (picklable) ``client_fn`` building ``CarryClient``s."""
    return CarryClient(ctx)
