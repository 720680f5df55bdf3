"""Small NumPy clients for engine tests (real arithmetic, no ML framework needed)."""

from __future__ import annotations

import os
import time

import numpy as np

from pollinate.client import ClientContext
from pollinate.types import Arrays, Config, EvaluateRes, TrainRes


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


class MeanClientFn:
    """Picklable ``client_fn`` building ``MeanClient``s; ``behaviour`` maps ids to faults."""

    def __init__(self, behaviour: dict[int, str] | None = None) -> None:
        self.behaviour = behaviour or {}

    def __call__(self, ctx: ClientContext) -> MeanClient:
        return MeanClient(ctx, self.behaviour)


def initial() -> Arrays:
    return [np.zeros((3, 4), dtype=np.float32), np.zeros((2,), dtype=np.int64)]
