"""Federated Averaging, and the composed strategy every named algorithm is a preset of."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from pollinate.errors import ConfigError, RoundFailedError, UpdateRejected
from pollinate.strategy.aggregators import Aggregator, WeightedMean
from pollinate.strategy.algorithms import LocalAlgorithm, as_float64
from pollinate.strategy.base import (
    EvaluateSummary,
    Failure,
    SecureSum,
    SecureTerms,
    Strategy,
    TrainSummary,
)
from pollinate.strategy.check import UpdateBounds, check_outcome
from pollinate.strategy.metrics import MetricsMean
from pollinate.strategy.optimizers import Plain, ServerOptimizer
from pollinate.strategy.selection import SelectionPolicy, Uniform
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


class UpdateTransform(Protocol):
    """A transform of the clients' updates with a server half (``pollinate.compression``'s
    ``Compression``): how the model is sent, and how a client's payload is read back."""

    def encode_model(self, arrays: Arrays) -> Arrays: ...

    def decode_update(self, res_arrays: Arrays, global_arrays: Arrays) -> Arrays: ...


ConfigFn = Callable[[int], Config]
EvaluateFn = Callable[[Arrays], tuple[float, Metrics]]
Accepted = list[tuple[ClientId, int, Metrics]]


def decode_outcome(
    outcome: Outcome, transforms: Sequence[UpdateTransform], sent: Arrays
) -> tuple[Outcome, Failure | None]:
    """A train outcome with its arrays decoded by the transforms' server halves (last
    first), against ``sent``: the model the client started from as it was before the
    downlink's encoding. A payload that cannot be decoded is a rejection."""
    res = outcome.result
    if not (transforms and outcome.ok and isinstance(res, TrainRes)):
        return outcome, None
    payload = list(res.arrays)
    try:
        for transform in reversed(transforms):
            payload = transform.decode_update(payload, sent)
    except UpdateRejected as exc:
        why = f"update rejected: {exc}"
        return outcome, Failure(outcome.client_id, "train", why, "rejected")
    return replace(outcome, result=replace(res, arrays=payload)), None


class FedAvg(Strategy):
    """Federated Averaging (McMahan et al. 2017, arXiv:1602.05629), built from parts.

    Each round a fraction of the clients trains the global model ``w`` locally; client ``k``
    returns ``w_k`` trained on ``n_k`` examples, and by default the next global model is the
    example-weighted mean ``w ← Σ_k n_k w_k / Σ_k n_k``, folded one result at a time into a
    running sum. The round, part by part (each a value passed in):

    1. ``selection`` picks the round's clients (``Uniform`` by default: without replacement,
       seeded by ``(seed, round)``, so the same seed samples the same clients everywhere);
    2. ``algorithm`` says what else each client is told and sends back (FedProx's proximal
       term, SCAFFOLD's control variates, …);
    3. every result passes the one update check (``check_outcome``: types, shapes, dtypes,
       finite values) and the ``bounds`` (norm and example-count caps: ``UpdateBounds()``;
       off by default in Python, on by default from a run config); a failing one is
       recorded as rejected, never aggregated;
    4. ``aggregator`` reduces the accepted results (weighted mean, median, Krum …);
    5. ``optimizer`` applies ``Δ = aggregate − w`` to the model (``Plain(1.0)``: FedAvg).

    The round fails (``RoundFailedError``) when fewer than ``min_train_clients`` updates
    were accepted. Named algorithms (``FedAdam``, ``FedProx``, ``Krum`` …) are presets of
    these parts (``pollinate.strategy.presets``).
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
        seed: int | None = 0,
        selection: SelectionPolicy | None = None,
        aggregator: Aggregator | None = None,
        optimizer: ServerOptimizer | None = None,
        algorithm: LocalAlgorithm | None = None,
        bounds: UpdateBounds | None = None,
        transforms: Sequence[UpdateTransform] = (),
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
        if not round_timeout_s > 0:
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
        self.selection = selection if selection is not None else Uniform()
        self.aggregator = aggregator if aggregator is not None else WeightedMean(accumulate_dtype)
        self.optimizer = optimizer if optimizer is not None else Plain()
        self.algorithm = algorithm if algorithm is not None else LocalAlgorithm()
        self.bounds = bounds if bounds is not None else UpdateBounds.off()
        self.transforms = list(transforms)
        self._sent: Arrays = []  # this round's arrays as the clients start from them
        self._entropy = np.random.default_rng()  # secret randomness when seed is None

    def describe(self) -> dict[str, Any]:
        """The parts, for the run's record."""
        return {
            "selection": self.selection.describe(),
            "algorithm": {"name": self.algorithm.name, **self.algorithm.describe()},
            "aggregator": self.aggregator.describe(),
            "optimizer": self.optimizer.describe(),
        }

    @property
    def sum_based(self) -> bool:
        """Whether the strategy needs only the weighted sum of the round's models."""
        return bool(self.aggregator.sum_based and self.algorithm.sum_based)

    def rng(self, round_number: int, purpose: int) -> np.random.Generator:
        """The generator for one round's draws (secret when ``seed`` is None)."""
        if self.seed is None:
            return self._entropy
        return np.random.default_rng([self.seed, round_number, purpose])

    # 1.-2. selection and instructions ------------------------------------------------------

    def _available(self, round_number: int, clients: Sequence[ClientId]) -> None:
        if len(clients) < self.min_available_clients:
            raise RoundFailedError(
                f"round {round_number}: {len(clients)} clients available, fewer than "
                f"min_available_clients={self.min_available_clients}"
            )

    @staticmethod
    def _config(source: Config | ConfigFn | None, round_number: int) -> Config:
        base = source(round_number) if callable(source) else dict(source or {})
        return {**base, "round": round_number}

    def configure_train(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, TrainIns]]:
        self._available(round_number, clients)
        picked = self.selection.select(
            round_number,
            clients,
            self.fraction_train,
            self.min_train_clients,
            self.rng(round_number, 0),
        )
        return self.instruct(round_number, arrays, picked, len(clients))

    def instruct(
        self, round_number: int, arrays: Arrays, picked: Sequence[ClientId], population: int
    ) -> list[tuple[ClientId, TrainIns]]:
        """The training plan for clients already picked (one broadcast to all of them)."""
        self.algorithm.start(arrays, population)
        sent, extra = self.algorithm.instructions(arrays)
        self._sent = sent
        for transform in self.transforms:  # e.g. the downlink's compression
            sent = transform.encode_model(sent)
        ins = TrainIns(sent, {**self._config(self.train_config, round_number), **extra})
        return [(cid, ins) for cid in picked]

    def configure_evaluate(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, EvaluateIns]]:
        self._available(round_number, clients)
        picked = Uniform().select(
            round_number,
            clients,
            self.fraction_evaluate,
            self.min_evaluate_clients,
            self.rng(round_number, 1),
        )
        sent = arrays
        for transform in self.transforms:
            sent = transform.encode_model(sent)
        ins = EvaluateIns(sent, self._config(self.evaluate_config, round_number))
        return [(cid, ins) for cid in picked]

    # 3.-5. aggregation ---------------------------------------------------------------------

    def aggregate_train(
        self, round_number: int, arrays: Arrays, outcomes: Iterable[Outcome]
    ) -> TrainSummary:
        expected = self.algorithm.expected(arrays)
        model_size = len(arrays)
        acc = self.aggregator.start(as_float64(arrays))
        self.bounds.start_round()
        accepted: Accepted = []
        failures: list[Failure] = []
        durations: dict[ClientId, float] = {}  # for the selection policy
        for outcome in outcomes:
            if outcome.elapsed_s is not None:
                durations[outcome.client_id] = outcome.elapsed_s
            outcome, failure = self.checked(outcome, expected)  # 3. decode, then check
            res = outcome.result
            if failure is None:
                assert isinstance(res, TrainRes)
                model, why = self.bounds.apply(
                    list(res.arrays[:model_size]), int(res.num_examples), arrays
                )
                weighed = (
                    self.algorithm.weigh(
                        [*model, *res.arrays[model_size:]],
                        int(res.num_examples),
                        res.metrics,
                        arrays,
                    )
                    if why is None
                    else why
                )
                if isinstance(weighed, str):
                    failure = Failure(
                        outcome.client_id, "train", f"update rejected: {weighed}", "rejected"
                    )
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
            assert isinstance(res, TrainRes) and not isinstance(weighed, str)
            try:
                acc.add(*weighed)  # 4. the aggregator, as results arrive
            except UpdateRejected as exc:  # e.g. boosted trees for another problem
                failures.append(
                    Failure(outcome.client_id, "train", f"update rejected: {exc}", "rejected")
                )
                continue
            accepted.append((outcome.client_id, int(res.num_examples), res.metrics))
        self._enough(round_number, len(accepted), acc.total_weight, failures)
        try:
            aggregate = acc.result()
        except ConfigError as exc:  # e.g. Krum with fewer updates than it needs
            raise RoundFailedError(f"round {round_number}: {exc}") from exc
        delta = self.algorithm.finish(aggregate, arrays)
        return self.conclude(round_number, arrays, delta, accepted, failures, durations)

    def checked(self, outcome: Outcome, expected: Arrays | None) -> tuple[Outcome, Failure | None]:
        """The outcome with its arrays decoded by the transforms' server halves, and the
        failure it stands for (``check_outcome``; a payload that cannot be decoded is
        rejected)."""
        outcome, failure = decode_outcome(outcome, self.transforms, self._sent)
        return outcome, failure or check_outcome(outcome, expected)

    def _enough(
        self, round_number: int, count: int, weight: float, failures: Sequence[Failure]
    ) -> None:
        if count < max(1, self.min_train_clients) or weight <= 0:
            raise RoundFailedError(
                f"round {round_number}: only {count} client updates were accepted "
                f"(min_train_clients={self.min_train_clients}); {len(failures)} failed: "
                + "; ".join(f"client {f.client_id}: {f.reason}" for f in failures[:5])
            )

    def conclude(
        self,
        round_number: int,
        arrays: Arrays,
        delta: Arrays,
        accepted: Accepted,
        failures: list[Failure],
        durations: Mapping[ClientId, float] | None = None,
    ) -> TrainSummary:
        """5. The server optimizer's step with the round's update ``delta``, and the round's
        bookkeeping (metrics, per-client entries; the selection policy's memory, told each
        client's task ``durations`` where known)."""
        new = self.optimizer.step(arrays, delta)
        metrics = MetricsMean()
        per_client: dict[ClientId, tuple[int, Metrics]] = {}
        for cid, n, client_metrics in accepted:
            metrics.add(client_metrics, n)
            per_client[cid] = (n, client_metrics)
        self.selection.observe(
            round_number,
            {cid: m for cid, (_, m) in per_client.items()},
            {f.client_id: f.kind for f in failures},
            examples={cid: n for cid, (n, _) in per_client.items()},
            durations=durations or {},
        )
        return TrainSummary(new, metrics.result(), len(accepted), failures, per_client)

    # secure aggregation: the sum instead of the updates ------------------------------------

    def secure_terms(self, round_number: int, num_clients: int, weight_cap: int) -> SecureTerms:
        self.require_sum_based("secure aggregation")
        return SecureTerms(weight_cap=weight_cap)

    def require_sum_based(self, what: str) -> None:
        """Raise ``ConfigError`` naming both parts when the strategy cannot run on a sum."""
        if not self.aggregator.sum_based:
            raise ConfigError(
                f"{what} delivers only the sum of the updates, but the aggregator "
                f"{self.aggregator.name!r} needs the individual updates; use the weighted "
                f"mean (FedAvg, FedAdam …) with {what}, or turn {what} off"
            )
        if not self.algorithm.sum_based:
            raise ConfigError(
                f"{what} delivers only the sum of the updates, but {self.algorithm.name} "
                "weighs each client's update by what that client reports; use it without "
                f"{what}"
            )

    def aggregate_sum(self, round_number: int, arrays: Arrays, summed: SecureSum) -> TrainSummary:
        self.require_sum_based("secure aggregation")
        accepted: Accepted = []
        durations: dict[ClientId, float] = {}
        for o in summed.survivors:
            if o.elapsed_s is not None:
                durations[o.client_id] = o.elapsed_s
            res = o.result
            if isinstance(res, TrainRes):
                accepted.append((o.client_id, int(res.num_examples), res.metrics))
        self._enough(round_number, len(accepted), summed.weight, summed.failures)
        delta = unflatten(summed.total / summed.weight, arrays)
        failures = list(summed.failures)
        return self.conclude(round_number, arrays, delta, accepted, failures, durations)

    # evaluation ----------------------------------------------------------------------------

    def aggregate_evaluate(
        self, round_number: int, outcomes: Iterable[Outcome]
    ) -> EvaluateSummary | None:
        loss_sum, weight = 0.0, 0
        metrics = MetricsMean()
        failures: list[Failure] = []
        per_client: dict[ClientId, tuple[float, Metrics]] = {}
        for outcome in outcomes:
            failure = check_outcome(outcome, None)
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
            if not failures:
                if weight:
                    log.warning(
                        "round %d: federated evaluation skipped: %d clients answered "
                        "(min_evaluate_clients=%d)",
                        round_number,
                        len(per_client),
                        self.min_evaluate_clients,
                    )
                return None
            log.warning(
                "round %d: federated evaluation skipped: %d clients answered, %d failed "
                "(min_evaluate_clients=%d)",
                round_number,
                len(per_client),
                len(failures),
                self.min_evaluate_clients,
            )
            return EvaluateSummary(None, {}, len(per_client), failures, {})
        return EvaluateSummary(
            loss_sum / weight, metrics.result(), len(per_client), failures, per_client
        )

    def evaluate(self, round_number: int, arrays: Arrays) -> tuple[float, Metrics] | None:
        if self.evaluate_fn is None:
            return None
        return self.evaluate_fn(arrays)

    # state that lasts ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        parts = {
            "selection": self.selection.state(),
            "algorithm": self.algorithm.state(),
            "optimizer": self.optimizer.state(),
            "bounds": self.bounds.state(),
        }
        return {k: v for k, v in parts.items() if v}

    def load_state(self, state: dict[str, Any]) -> None:
        self.selection.load_state(state.get("selection", {}))
        self.algorithm.load_state(state.get("algorithm", {}))
        self.optimizer.load_state(state.get("optimizer", {}))
        self.bounds.load_state(state.get("bounds", {}))


def unflatten(flat: np.ndarray, arrays: Arrays) -> Arrays:
    """A float64 vector over the float arrays of ``arrays`` (model order) as a ``Δ`` with one
    array per model array; non-float arrays get a zero ``Δ`` (they keep their value)."""
    out: Arrays = []
    offset = 0
    for a in arrays:
        if a.dtype.kind != "f":
            out.append(np.zeros(a.shape, np.float64))
            continue
        out.append(flat[offset : offset + a.size].reshape(a.shape))
        offset += a.size
    return out
