"""Client apps for deployment tests, loaded by ``pollinate client --app deploy_apps:NAME``."""

from __future__ import annotations

import os
import time
from functools import cache
from typing import Any

from pollinate import config
from pollinate.client import ClientContext, ClientFn
from pollinate.deploy import config_client_fn
from pollinate.types import Arrays, Config, EvaluateRes, TrainRes


@cache
def _inner(partition: int) -> ClientFn:
    cfg = config.load(os.environ["POLLINATE_TEST_CONFIG"])
    return config_client_fn(cfg, partition)


class _Sleepy:
    """The config's classification client, but it stalls in one round's training."""

    def __init__(self, inner: Any, sleep_round: int) -> None:
        self.inner = inner
        self.sleep_round = sleep_round

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        if config.get("round") == self.sleep_round:
            print(f"stalling in round {self.sleep_round}", flush=True)
            time.sleep(300)
        result: TrainRes = self.inner.train(arrays, config)
        return result

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        result: EvaluateRes = self.inner.evaluate(arrays, config)
        return result


class _Gated(_Sleepy):
    """The config's classification client, but one round's training waits for a file."""

    def __init__(self, inner: Any, gate_round: int, gate: str) -> None:
        super().__init__(inner, 0)
        self.gate_round, self.gate = gate_round, gate

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        if config.get("round") == self.gate_round:
            print(f"waiting at the gate in round {self.gate_round}", flush=True)
            while not os.path.exists(self.gate):
                time.sleep(0.1)
        return super().train(arrays, config)


def gated(ctx: ClientContext) -> _Gated:
    """Holds round ``POLLINATE_GATE_ROUND`` until ``POLLINATE_GATE_FILE`` exists, so a test
    can act while the server is certainly in that round."""
    inner = _inner(ctx.client_id)(ctx)
    return _Gated(inner, int(os.environ["POLLINATE_GATE_ROUND"]), os.environ["POLLINATE_GATE_FILE"])


def sleepy(ctx: ClientContext) -> _Sleepy:
    """Stalls in round ``POLLINATE_SLEEP_ROUND`` (0: never) so a test can kill it mid-round."""
    inner = _inner(ctx.client_id)(ctx)
    return _Sleepy(inner, int(os.environ.get("POLLINATE_SLEEP_ROUND", "0")))


class _Failing(_Sleepy):
    """The config's classification client, but one round's training raises until a file
    exists."""

    def __init__(self, inner: Any, fail_round: int, fixed: str) -> None:
        super().__init__(inner, 0)
        self.fail_round, self.fixed = fail_round, fixed

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        if config.get("round") == self.fail_round and not os.path.exists(self.fixed):
            print(f"failing in round {self.fail_round}", flush=True)
            raise RuntimeError(f"this client breaks in round {self.fail_round}")
        return super().train(arrays, config)


def failing(ctx: ClientContext) -> _Failing:
    """Fails round ``POLLINATE_FAIL_ROUND`` until ``POLLINATE_FIXED_FILE`` exists."""
    inner = _inner(ctx.client_id)(ctx)
    return _Failing(
        inner, int(os.environ["POLLINATE_FAIL_ROUND"]), os.environ["POLLINATE_FIXED_FILE"]
    )
