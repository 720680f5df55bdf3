"""Federated Averaging."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from pollinate.errors import ConfigError, RoundFailedError
from pollinate.strategy.aggregate import MetricsMean, WeightedMean, check_update
from pollinate.strategy.base import EvaluateSummary, Failure, Strategy, TrainSummary
from pollinate.types import (
    Arrays,
    ClientId,
    Config,
    EvaluateIns,
    EvaluateRes,
    Metrics,
    Outcome,
    TrainIns,
    TrainRes,
)

log = logging.getLogger("pollinate")

ConfigFn = Callable[[int], Config]
EvaluateFn = Callable[[Arrays], tuple[float, Metrics]]


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al. 2017, arXiv:1602.05629).

    Each round a fraction of the clients trains the global model ``w`` locally; client ``k``
    returns ``w_k`` trained on ``n_k`` examples, and the next global model is the
    example-weighted mean ``w ← Σ_k n_k w_k / Σ_k n_k``. The mean is a running sum fed one
    result at a time. An update with other shapes or dtypes than ``w``, or with NaN/inf, is
    rejected and recorded, never averaged in. The round fails (``RoundFailedError``) when
    fewer than ``min_train_clients`` updates were accepted.

    Client sampling is uniform without replacement, seeded by ``(seed, round)``, so the same
    seed samples the same clients on every backend.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        min_train_clients: int = 2,
        min_available_clients: int = 2,
        fraction_evaluate: float = 1.0,
        min_evaluate_clients: int = 2,
        round_timeout_s: float = 600.0,
        train_config: Config | ConfigFn | None = None,
        evaluate_config: Config | ConfigFn | None = None,
        evaluate_fn: EvaluateFn | None = None,
        accumulate_dtype: str = "float64",
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("fraction_train", fraction_train),
            ("fraction_evaluate", fraction_evaluate),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"strategy.{name} must be in [0, 1], got {value}")
        for name, count in (
            ("min_train_clients", min_train_clients),
            ("min_available_clients", min_available_clients),
            ("min_evaluate_clients", min_evaluate_clients),
        ):
            if count < 0:
                raise ConfigError(f"strategy.{name} must be >= 0, got {count}")
        if fraction_train == 0:
            raise ConfigError("strategy.fraction_train must be > 0: no client would train")
        if round_timeout_s <= 0:
            raise ConfigError(f"strategy.round_timeout_s must be > 0, got {round_timeout_s}")
        if accumulate_dtype not in ("float64", "float32"):
            raise ConfigError(
                f"accumulate_dtype must be 'float64' or 'float32', got {accumulate_dtype!r}"
            )
        self.fraction_train = fraction_train
        self.min_train_clients = min_train_clients
        self.min_available_clients = min_available_clients
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_clients = min_evaluate_clients
        self.round_timeout_s = round_timeout_s
        self.train_config = train_config
        self.evaluate_config = evaluate_config
        self.evaluate_fn = evaluate_fn
        self.accumulate_dtype = accumulate_dtype
        self.seed = seed

    # 1. sampling and configuration -------------------------------------------------------

    def _sample(
        self,
        round_number: int,
        clients: Sequence[ClientId],
        fraction: float,
        minimum: int,
        salt: int,
    ) -> list[ClientId]:
        available = len(clients)
        if available < self.min_available_clients:
            raise RoundFailedError(
                f"round {round_number}: {available} clients available, fewer than "
                f"min_available_clients={self.min_available_clients}"
            )
        if fraction <= 0:
            return []
        # round first: 0.07 * 100 is 7.000000000000001 in floating point, which must give 7
        k = min(available, max(minimum, math.ceil(round(fraction * available, 6))))
        if k == available:
            return list(clients)
        rng = np.random.default_rng([self.seed, round_number, salt])
        picked = np.sort(rng.choice(available, size=k, replace=False))
        return [clients[int(i)] for i in picked]

    @staticmethod
    def _config(source: Config | ConfigFn | None, round_number: int) -> Config:
        base = source(round_number) if callable(source) else dict(source or {})
        return {**base, "round": round_number}

    def configure_train(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, TrainIns]]:
        picked = self._sample(round_number, clients, self.fraction_train, self.min_train_clients, 0)
        ins = TrainIns(arrays, self._config(self.train_config, round_number))
        return [(cid, ins) for cid in picked]

    def configure_evaluate(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, EvaluateIns]]:
        picked = self._sample(
            round_number, clients, self.fraction_evaluate, self.min_evaluate_clients, 1
        )
        ins = EvaluateIns(arrays, self._config(self.evaluate_config, round_number))
        return [(cid, ins) for cid in picked]

    # 3. aggregation ----------------------------------------------------------------------

    def aggregate_train(
        self, round_number: int, arrays: Arrays, outcomes: Iterable[Outcome]
    ) -> TrainSummary:
        mean = WeightedMean(arrays, self.accumulate_dtype)
        metrics = MetricsMean()
        failures: list[Failure] = []
        per_client: dict[ClientId, tuple[int, Metrics]] = {}
        for outcome in outcomes:
            failure = _failure_of(outcome, arrays)
            if failure is not None:
                failures.append(failure)
                log.warning(
                    "round %d: client %s %s: %s",
                    round_number,
                    failure.client_id,
                    failure.kind,
                    failure.reason,
                )
                continue
            res = outcome.result
            assert isinstance(res, TrainRes)
            mean.add(res.arrays, res.num_examples)
            metrics.add(res.metrics, res.num_examples)
            per_client[outcome.client_id] = (res.num_examples, res.metrics)
        if mean.count < max(1, self.min_train_clients) or mean.total_weight <= 0:
            raise RoundFailedError(
                f"round {round_number}: only {mean.count} client updates were accepted "
                f"(min_train_clients={self.min_train_clients}); {len(failures)} failed: "
                + "; ".join(f"client {f.client_id}: {f.reason}" for f in failures[:5])
            )
        return TrainSummary(mean.result(), metrics.result(), mean.count, failures, per_client)

    def aggregate_evaluate(
        self, round_number: int, outcomes: Iterable[Outcome]
    ) -> EvaluateSummary | None:
        loss_sum, weight = 0.0, 0
        metrics = MetricsMean()
        failures: list[Failure] = []
        per_client: dict[ClientId, tuple[float, Metrics]] = {}
        for outcome in outcomes:
            failure = _failure_of(outcome, None)
            if failure is not None:
                failures.append(failure)
                continue
            res = outcome.result
            assert isinstance(res, EvaluateRes)
            loss_sum += res.loss * res.num_examples
            weight += res.num_examples
            metrics.add(res.metrics, res.num_examples)
            per_client[outcome.client_id] = (res.loss, res.metrics)
        if weight == 0 or len(per_client) < self.min_evaluate_clients:
            if weight or failures:
                log.warning(
                    "round %d: federated evaluation skipped: %d clients answered "
                    "(min_evaluate_clients=%d)",
                    round_number,
                    len(per_client),
                    self.min_evaluate_clients,
                )
            return None
        return EvaluateSummary(
            loss_sum / weight, metrics.result(), len(per_client), failures, per_client
        )

    # 4. centralized evaluation -----------------------------------------------------------

    def evaluate(self, round_number: int, arrays: Arrays) -> tuple[float, Metrics] | None:
        if self.evaluate_fn is None:
            return None
        return self.evaluate_fn(arrays)


def _failure_of(outcome: Outcome, template: Arrays | None) -> Failure | None:
    """The failure an outcome stands for, or None if it can be aggregated."""
    if outcome.error is not None:
        kind = "timeout" if outcome.error.startswith("timeout") else "error"
        return Failure(outcome.client_id, outcome.kind, outcome.error, kind)
    res = outcome.result
    expected = TrainRes if outcome.kind == "train" else EvaluateRes
    if not isinstance(res, expected):
        return Failure(
            outcome.client_id,
            outcome.kind,
            f"returned {type(res).__name__}, expected {expected.__name__}",
            "rejected",
        )
    if not isinstance(res.metrics, dict):
        return Failure(
            outcome.client_id,
            outcome.kind,
            f"metrics must be a dict, got {type(res.metrics).__name__}",
            "rejected",
        )
    n = res.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        return Failure(
            outcome.client_id,
            outcome.kind,
            f"num_examples must be an int >= 0, got {n!r}",
            "rejected",
        )
    if isinstance(res, TrainRes) and template is not None:
        reason = (
            check_update(template, res.arrays)
            if isinstance(res.arrays, (list, tuple))
            else f"arrays must be a list of NumPy arrays, got {type(res.arrays).__name__}"
        )
        if reason:
            return Failure(
                outcome.client_id, outcome.kind, f"update rejected: {reason}", "rejected"
            )
    if isinstance(res, EvaluateRes) and (
        not isinstance(res.loss, (int, float, np.number)) or not math.isfinite(res.loss)
    ):
        return Failure(outcome.client_id, outcome.kind, f"non-finite loss {res.loss}", "rejected")
    return None
