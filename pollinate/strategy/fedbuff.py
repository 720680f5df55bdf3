"""FedBuff: buffered asynchronous aggregation (Nguyen et al. 2022, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS, arXiv:2106.06639, Algorithm 1).

``K`` clients (``concurrency``) train at once, each from the global model as it was when it
started. The server has a version ``t`` (the number of server steps taken). A result arriving
from client ``k``, which started from version ``v_k``, is folded into a buffer at once:

    τ_k = t − v_k                      (staleness: server steps taken while k trained)
    Δ_k = w_k − x_{v_k}                (k's update, against the model it was sent)
    S   ← S + s(τ_k) · Δ_k             (a running weighted sum: O(model) memory)

and the freed slot goes to another client at once. When the buffer holds ``M`` results
(``buffer_size``) the server takes a step with their mean and empties the buffer:

    Δ̄ = S / M,   x_{t+1} = optimizer.step(x_t, Δ̄),   t ← t + 1

With the ``Plain(η)`` optimizer that is the paper's ``x ← x − η_g Δ̄`` (its Δ is ``x − w``,
ours ``w − x``); any server optimizer of ``pollinate.strategy.optimizers`` can take the step
(momentum, Adam …). As in the paper the mean divides by ``M``, not by ``Σ s(τ)``: stale
results shrink the step rather than only re-weighting it, and results are not weighted by
their example counts.

Staleness functions ``s(τ)`` (``Staleness``): ``constant`` 1; ``sqrt`` ``1/√(1+τ)`` (the
paper's default); ``hinge`` 1 for ``τ ≤ b``, else ``1/(a(τ − b) + 1)`` (Xie, Koyejo & Gupta
2019, "Asynchronous Federated Optimization", arXiv:1903.03934), with ``a = hinge_a`` (how
fast the weight falls, default 10) and ``b = hinge_b`` (staleness forgiven, default 4).

Every result passes the one update check (``pollinate.strategy.check.check_outcome``) and the
update bounds against the model its client started from; a failing one is counted as a
failure and never enters the buffer. The server keeps each model version that a client in
flight started from (at most ``K + 1`` versions, usually a few) to compute ``Δ_k``.

The loop that drives this strategy is ``pollinate.asynchronous.run_async``; ``simulate()``
and ``pollinate server`` use it when given a ``FedBuff``. A history record is one server
step (``"round"`` holds the step number).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pollinate.errors import ConfigError
from pollinate.strategy.aggregators import Aggregator, WeightedMean
from pollinate.strategy.algorithms import LocalAlgorithm
from pollinate.strategy.base import EvaluateSummary, Failure, Strategy, TrainSummary
from pollinate.strategy.check import UpdateBounds, check_outcome
from pollinate.strategy.fedavg import ConfigFn, EvaluateFn, UpdateTransform, decode_outcome
from pollinate.strategy.metrics import MetricsMean
from pollinate.strategy.optimizers import Momentum, Plain, ServerOptimizer
from pollinate.strategy.selection import SelectionPolicy, Uniform
from pollinate.types import (
    Arrays,
    ClientId,
    Config,
    EvaluateIns,
    Metrics,
    Outcome,
    TrainIns,
    TrainRes,
)

STALENESS = ("constant", "sqrt", "hinge")


@dataclass(frozen=True)
class Staleness:
    """The weight ``s(τ)`` of a result ``τ`` server steps stale (see the module docstring):
    ``constant``: 1; ``sqrt``: ``1/√(1+τ)``; ``hinge``: 1 if ``τ ≤ b`` else
    ``1/(a(τ − b) + 1)``."""

    name: str = "sqrt"
    a: float = 10.0
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.name not in STALENESS:
            raise ConfigError(
                f"strategy.staleness must be one of {', '.join(STALENESS)}, got {self.name!r}"
            )
        for key, value, low in (("hinge_a", self.a, 0.0), ("hinge_b", self.b, 0.0)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
                raise ConfigError(f"strategy.{key} must be a finite number >= 0, got {value!r}")

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau}")
        if self.name == "constant":
            return 1.0
        if self.name == "sqrt":
            return 1.0 / math.sqrt(1.0 + tau)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)

    def describe(self) -> dict[str, Any]:
        if self.name == "hinge":
            return {"name": self.name, "a": self.a, "b": self.b}
        return {"name": self.name}


@dataclass
class _Version:
    """A model version some client in flight started from."""

    reference: Arrays  # x_v: what Δ_k is measured against and updates are decoded against
    ins: TrainIns  # x_v as the clients receive it (after the downlink's transforms)
    users: int = 0


@dataclass
class _Buffer:
    """The running weighted sum ``S = Σ s(τ_k) Δ_k`` and the step's bookkeeping."""

    total: list[np.ndarray] | None = None
    count: int = 0
    staleness: list[int] = field(default_factory=list)
    accepted: list[tuple[ClientId, int, Metrics]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def add(self, delta: Sequence[np.ndarray], weight: float, dtype: str) -> None:
        if self.total is None:
            self.total = [np.zeros(d.shape, dtype=dtype) for d in delta]
        for acc, d in zip(self.total, delta):
            acc += weight * d  # in place: no per-update temporaries kept


class FedBuff(Strategy):
    """Buffered asynchronous aggregation (Nguyen et al. 2022; the maths in the module
    docstring): ``concurrency`` clients train at once, and the server steps every
    ``buffer_size`` results, each weighted by ``staleness``.

    ``optimizer``: the server step (default ``Plain(server_lr)``, or ``Momentum(server_lr,
    server_momentum)`` when ``server_momentum > 0``). ``round_timeout_s``: how long one
    client's task may take before its slot is given to another client (counted as a
    timeout). ``evaluate_every``: centralized evaluation (``evaluate_fn``) every that many
    server steps, and always at the last one. Clients are picked uniformly at random among
    those not training now, seeded by ``(seed, dispatch number)``.

    The remaining keywords are ``FedAvg``'s, so that a run config builds either: the update
    ``bounds``, ``transforms`` (compression), ``train_config``, ``seed``,
    ``min_available_clients``, ``accumulate_dtype``. Sampling fractions and per-round
    minimums do not apply (``concurrency`` replaces them) and are ignored; an ``aggregator``
    other than the weighted mean, a local ``algorithm`` or a ``selection`` policy other than
    uniform are refused, naming both parts. No federated evaluation runs.
    """

    def __init__(
        self,
        *,
        concurrency: int = 10,
        buffer_size: int = 5,
        staleness: str | Staleness = "sqrt",
        hinge_a: float = 10.0,
        hinge_b: float = 4.0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        evaluate_every: int = 1,
        fraction_train: float = 1.0,
        min_train_clients: int = 2,
        min_available_clients: int = 1,
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
            ("concurrency", concurrency),
            ("buffer_size", buffer_size),
            ("evaluate_every", evaluate_every),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"strategy.{name} must be an integer >= 1, got {value!r}")
        if not round_timeout_s > 0:
            raise ConfigError(f"strategy.round_timeout_s must be > 0, got {round_timeout_s}")
        if accumulate_dtype not in ("float64", "float32"):
            raise ConfigError(
                f"accumulate_dtype must be 'float64' or 'float32', got {accumulate_dtype!r}"
            )
        if aggregator is not None and not isinstance(aggregator, WeightedMean):
            raise ConfigError(
                f"strategy fedbuff with the aggregator {aggregator.name!r}: FedBuff averages a "
                "running sum of the buffered updates, so it cannot hold the individual updates "
                "a robust aggregator needs; use a synchronous strategy for robust aggregation"
            )
        if algorithm is not None and type(algorithm) is not LocalAlgorithm:
            raise ConfigError(
                f"strategy fedbuff with the local algorithm {algorithm.name!r}: FedBuff sends "
                "the plain model and averages plain updates; use it without a local algorithm"
            )
        if selection is not None and not isinstance(selection, Uniform):
            raise ConfigError(
                f"strategy fedbuff with strategy.selection = {selection.name!r}: FedBuff hands "
                "each freed slot to an idle client picked uniformly at random; set "
                "strategy.selection = 'uniform'"
            )
        if optimizer is None:
            optimizer = (
                Momentum(server_lr=server_lr, momentum=server_momentum)
                if server_momentum
                else Plain(server_lr)
            )
        self.concurrency = concurrency
        self.buffer_size = buffer_size
        self.staleness = (
            staleness
            if isinstance(staleness, Staleness)
            else Staleness(staleness, float(hinge_a), float(hinge_b))
        )
        self.evaluate_every = evaluate_every
        self.min_available_clients = min_available_clients
        self.round_timeout_s = round_timeout_s
        self.train_config = train_config
        self.evaluate_fn = evaluate_fn
        self.accumulate_dtype = accumulate_dtype
        self.seed = seed
        self.optimizer = optimizer
        self.bounds = bounds if bounds is not None else UpdateBounds.off()
        self.transforms = list(transforms)
        self.version = 0  # server steps taken
        self._versions: dict[int, _Version] = {}
        self._buffer = _Buffer()
        self._entropy = np.random.default_rng()

    def describe(self) -> dict[str, Any]:
        """The parts, for the run's record."""
        return {
            "concurrency": self.concurrency,
            "buffer_size": self.buffer_size,
            "staleness": self.staleness.describe(),
            "optimizer": self.optimizer.describe(),
        }

    # 1. who trains, from which model --------------------------------------------------------

    def pick(
        self, dispatch: int, clients: Sequence[ClientId], busy: Iterable[ClientId]
    ) -> ClientId | None:
        """An idle client (not in ``busy``) uniformly at random, seeded by ``(seed,
        dispatch)``; None when every client is busy. Rejection sampling while most clients
        are idle (flat in the population), else a draw among the idle ones."""
        busy = set(busy)
        n = len(clients)
        if n == 0:
            return None
        rng = (
            self._entropy
            if self.seed is None
            else np.random.default_rng([self.seed, dispatch, 0xFB])
        )
        if len(busy) * 2 <= n:
            while True:
                cid = clients[int(rng.integers(n))]
                if cid not in busy:
                    return cid
        idle = [c for c in clients if c not in busy]
        return idle[int(rng.integers(len(idle)))] if idle else None

    def instructions(self, arrays: Arrays) -> TrainIns:
        """What a client starting now trains with: the current model (version
        ``self.version``), encoded by the transforms, one object per version so every client
        of a version shares one broadcast. The version is held until that client's outcome
        is folded (``fold``)."""
        ins = self.peek_instructions(arrays)
        self._versions[self.version].users += 1
        return ins

    def peek_instructions(self, arrays: Arrays) -> TrainIns:
        """``instructions`` without counting a client that starts from them (for a
        simulation that trains expected dispatches ahead)."""
        v = self._versions.get(self.version)
        if v is None:
            sent = [np.asarray(a) for a in arrays]
            for transform in self.transforms:  # e.g. the downlink's compression
                sent = transform.encode_model(sent)
            base = self.train_config
            config = base(self.version + 1) if callable(base) else dict(base or {})
            ins = TrainIns(sent, {**config, "round": self.version + 1})
            v = self._versions[self.version] = _Version(list(arrays), ins)
        return v.ins

    # 2. a result arrives ---------------------------------------------------------------------

    def fold(self, outcome: Outcome, version: int) -> Failure | None:
        """Fold one client's outcome (it started from ``version``) into the buffer; return
        the failure it stands for (None: it was added). The version is released."""
        v = self._versions[version]
        try:
            failure, delta = self._checked(outcome, v)
            if failure is None:
                assert delta is not None and isinstance(outcome.result, TrainRes)
                tau = self.version - version
                self._buffer.add(delta, self.staleness(tau), self.accumulate_dtype)
                self._buffer.count += 1
                self._buffer.staleness.append(tau)
                res = outcome.result
                self._buffer.accepted.append(
                    (outcome.client_id, int(res.num_examples), res.metrics)
                )
                return None
            self._buffer.failures.append(failure)
            return failure
        finally:
            v.users -= 1
            if v.users <= 0 and version != self.version:
                del self._versions[version]

    def _checked(self, outcome: Outcome, v: _Version) -> tuple[Failure | None, Arrays | None]:
        """The decode (transforms' server halves), the one update check and the bounds;
        then ``Δ_k = w_k − x_v`` over the float arrays (zero for the others)."""
        outcome, failure = decode_outcome(outcome, self.transforms, v.reference)
        failure = failure or check_outcome(outcome, v.reference)
        if failure is not None:
            return failure, None
        res = outcome.result
        assert isinstance(res, TrainRes)
        model, why = self.bounds.apply(list(res.arrays), int(res.num_examples), v.reference)
        if why is not None:
            return Failure(outcome.client_id, "train", f"update rejected: {why}", "rejected"), None
        delta = [
            np.subtract(w, x, dtype=np.float64)
            if x.dtype.kind == "f"
            else np.zeros(x.shape, np.float64)
            for w, x in zip(model, v.reference)
        ]
        return None, delta

    @property
    def full(self) -> bool:
        """Whether the buffer holds ``buffer_size`` results: time for a server step."""
        return self._buffer.count >= self.buffer_size

    @property
    def buffered(self) -> int:
        """Results in the buffer now."""
        return self._buffer.count

    # 3. the server step ----------------------------------------------------------------------

    def step(self, arrays: Arrays) -> tuple[Arrays, TrainSummary, list[int]]:
        """The server step with the buffer's mean ``Δ̄ = S / M``; returns the new model, the
        step's summary and the staleness of each result applied. Empties the buffer."""
        buf = self._buffer
        if buf.total is None or buf.count == 0:
            raise ConfigError("FedBuff.step called with an empty buffer")
        mean = [acc / buf.count for acc in buf.total]
        new = self.optimizer.step(arrays, mean)
        metrics = MetricsMean()
        by_client: dict[ClientId, tuple[int, MetricsMean]] = {}
        for cid, n, client_metrics in buf.accepted:
            metrics.add(client_metrics, n)
            # a fast client may land twice in one step: its examples summed, metrics averaged
            seen, mean_of_client = by_client.get(cid, (0, MetricsMean()))
            mean_of_client.add(client_metrics, n)
            by_client[cid] = (seen + n, mean_of_client)
        per_client = {cid: (n, m.result()) for cid, (n, m) in by_client.items()}
        summary = TrainSummary(new, metrics.result(), buf.count, list(buf.failures), per_client)
        staleness = list(buf.staleness)
        self._buffer = _Buffer()
        self.bounds.start_round()
        old = self._versions.get(self.version)
        if old is not None and old.users <= 0:
            del self._versions[self.version]
        self.version += 1
        return new, summary, staleness

    def versions_held(self) -> int:
        """How many model versions the server holds for clients in flight."""
        return len(self._versions)

    # the synchronous interface does not apply -------------------------------------------------

    def configure_train(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, TrainIns]]:
        raise ConfigError(
            "FedBuff is asynchronous: it has no rounds; run it with simulate() or "
            "pollinate.asynchronous.run_async (pollinate run and pollinate server do so for "
            "strategy.name = 'fedbuff')"
        )

    def aggregate_train(
        self, round_number: int, arrays: Arrays, outcomes: Iterable[Outcome]
    ) -> TrainSummary:
        return self.configure_train(round_number, arrays, [])  # type: ignore[return-value]

    def configure_evaluate(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, round_number: int, outcomes: Iterable[Outcome]
    ) -> EvaluateSummary | None:
        return None

    def evaluate(self, round_number: int, arrays: Arrays) -> tuple[float, Metrics] | None:
        if self.evaluate_fn is None:
            return None
        return self.evaluate_fn(arrays)

    # state that lasts --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        parts = {
            "version": self.version,
            "optimizer": self.optimizer.state(),
            "bounds": self.bounds.state(),
        }
        return {k: v for k, v in parts.items() if v or k == "version"}

    def load_state(self, state: dict[str, Any]) -> None:
        self.version = int(state.get("version", 0))
        self.optimizer.load_state(state.get("optimizer", {}))
        self.bounds.load_state(state.get("bounds", {}))
