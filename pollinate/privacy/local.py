"""Local differential privacy: each client clips and noises its own update before it leaves.

``LocalDP`` wraps any client. ``LocalDPLedger`` wraps the server's strategy: it checks that
updates claim the configured mechanism, counts each client's releases and records the
worst-off client's ε per round (and stops before a round that would take a client past
``max_epsilon``).

The mechanism on one client, per round: ``Δ = w_k − w`` clipped to L2 norm C, plus
``N(0, (z·C)² I)``. Two neighbouring inputs are any two local data sets, so the clipped
update can move by up to 2C and the release is the Gaussian mechanism with noise-to-
sensitivity ratio ``z / 2``: (ε, δ)-DP with ε from the analytic Gaussian mechanism (Balle &
Wang 2018, ``dp_accounting.get_epsilon_gaussian``; the same value as dp_accounting's PLD
accountant for ``GaussianDpEvent(z)`` under replace-one adjacency). ``r`` releases by the
same client compose exactly as one Gaussian mechanism with ratio ``z / (2√r)``. No
amplification by sampling applies: the server knows who took part.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pollinate.client import Client, ClientContext, ClientFn, is_client
from pollinate.errors import ConfigError
from pollinate.privacy.accounting import PrivacyBudgetExceeded, load_dp_accounting
from pollinate.privacy.dp import clip_update, is_private
from pollinate.strategy.base import Failure, Strategy, StrategyWrapper, TrainSummary
from pollinate.types import (
    Arrays,
    ClientId,
    Config,
    EvaluateRes,
    Metrics,
    Outcome,
    TrainIns,
    TrainRes,
)


def local_epsilon(noise_multiplier: float, delta: float, releases: int = 1) -> float:
    """ε at ``delta`` of ``releases`` locally clipped-and-noised updates by one client."""
    if releases < 1:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    ratio = noise_multiplier / (2 * math.sqrt(releases))
    return float(load_dp_accounting().get_epsilon_gaussian(ratio, delta))


def local_noise_multiplier(epsilon: float, delta: float, releases: int = 1) -> float:
    """The noise multiplier z that makes ``releases`` local releases (ε, δ)-DP."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    return float(2 * math.sqrt(releases) * load_dp_accounting().get_sigma_gaussian(epsilon, delta))


class LocalDP:
    """Local DP around any client: clip ``Δ`` to C and add ``N(0, (z·C)²)`` on the client.

    ``LocalDP(client, clip=1.0, noise_multiplier=2.0)`` wraps a client;
    ``LocalDP(client_fn, ...)`` is itself a ``client_fn``. Give ``noise_multiplier``, or
    ``epsilon`` (per round, at ``delta``) to have z solved. Every update reports its
    mechanism in its metrics: ``dp_epsilon`` and ``dp_delta`` for this round,
    ``dp_noise_multiplier``, ``dp_clip``, and, when built from a ``client_fn`` (the client
    state is kept), ``dp_releases`` and ``dp_epsilon_total`` over the client's releases so far.

    Nothing else leaves the client in the clear unless asked: the example count is reported
    as 1 (it would tell the data size), training metrics are dropped unless
    ``keep_metrics=True``, and non-float arrays (counters) are sent back unchanged.
    Federated evaluation results (``evaluate``) are not privatized; disable federated
    evaluation for a strict local guarantee.

    ``seed=None`` (the default) draws the noise from the OS: a seed, combined with the round
    and client id, makes it reproducible, and so removable by whoever knows the seed.
    """

    def __init__(
        self,
        inner: Client | ClientFn,
        *,
        clip: float,
        noise_multiplier: float | None = None,
        epsilon: float | None = None,
        delta: float = 1e-5,
        keep_metrics: bool = False,
        seed: int | None = None,
        _context: ClientContext | None = None,
    ) -> None:
        if not (clip > 0 and math.isfinite(clip)):
            raise ConfigError(f"clip must be > 0, got {clip}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if (noise_multiplier is None) == (epsilon is None):
            raise ConfigError("give exactly one of noise_multiplier or epsilon (per round)")
        if epsilon is not None:
            noise_multiplier = local_noise_multiplier(epsilon, delta)
        assert noise_multiplier is not None
        if not noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.inner = inner
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.keep_metrics = keep_metrics
        self.seed = seed
        self.context = _context
        self.epsilon = local_epsilon(self.noise_multiplier, self.delta)

    def __call__(self, context: ClientContext) -> LocalDP:
        if is_client(self.inner) or not callable(self.inner):
            raise TypeError("this LocalDP wraps a client, not a client_fn")
        return LocalDP(
            self.inner(context),
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            delta=self.delta,
            keep_metrics=self.keep_metrics,
            seed=self.seed,
            _context=context,
        )

    def _client(self) -> Client:
        if not is_client(self.inner) or not isinstance(self.inner, Client):
            raise TypeError("this LocalDP wraps a client_fn: call it with a context")
        return self.inner

    def _rng(self, config: Config) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        cid = self.context.client_id if self.context is not None else 0
        return np.random.default_rng([self.seed, int(config.get("round", 0)), int(cid)])

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        res = self._client().train(arrays, config)
        clipped, _ = clip_update(res.arrays, arrays, self.clip)
        rng = self._rng(config)
        stddev = self.noise_multiplier * self.clip
        released: Arrays = []
        for a, w in zip(clipped, arrays):
            if not is_private(w):
                released.append(w.copy())
                continue
            noised = a.astype(np.float64)
            if stddev > 0:
                noised += rng.normal(0.0, stddev, size=w.shape)
            released.append(noised.astype(w.dtype))
        metrics: Metrics = dict(res.metrics) if self.keep_metrics else {}
        metrics.update(
            dp_epsilon=self.epsilon,
            dp_delta=self.delta,
            dp_noise_multiplier=self.noise_multiplier,
            dp_clip=self.clip,
        )
        if self.context is not None:
            releases = int(self.context.state.get("dp_releases", 0)) + 1
            self.context.state["dp_releases"] = releases
            metrics["dp_releases"] = releases
            metrics["dp_epsilon_total"] = local_epsilon(self.noise_multiplier, self.delta, releases)
        return TrainRes(released, 1, metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return self._client().evaluate(arrays, config)


class LocalDPLedger(StrategyWrapper):
    """The server's side of local DP: wraps any strategy, checks and records the mechanism.

    Updates that do not report at least the configured noise multiplier, or report a larger
    clip, are rejected (a misconfigured client, not an attack: the server cannot verify
    noise). Each client's releases are counted (every update that arrived, rejected or
    not); the round's ``privacy`` entry holds the worst-off client's ε over its releases so
    far (``epsilon``) and one release's (``epsilon_round``). With ``max_epsilon``, a round
    that would take a sampled client past it is refused (``PrivacyBudgetExceeded``).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clip: float,
        delta: float = 1e-5,
        max_epsilon: float | None = None,
    ) -> None:
        if max_epsilon is not None and not max_epsilon > 0:
            raise ConfigError(f"max_epsilon must be > 0 (or None: no limit), got {max_epsilon}")
        algorithm = getattr(strategy, "algorithm", None)
        if algorithm is not None and not algorithm.sum_based:
            raise ConfigError(
                f"local DP noises each client's model update only, but {algorithm.name} also "
                "needs what a client reports beside it (control variates, step counts or its "
                "loss), which would leave the client unprotected or be dropped; use local DP "
                "with FedAvg, FedProx or a server optimizer (FedAdam …)"
            )
        super().__init__(strategy)
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.delta = float(delta)
        self.max_epsilon = max_epsilon
        self.releases: dict[ClientId, int] = {}
        self._epsilon: dict[int, float] = {}

    def epsilon(self, releases: int) -> float:
        """ε of one client after ``releases`` releases."""
        if releases not in self._epsilon:
            self._epsilon[releases] = local_epsilon(self.noise_multiplier, self.delta, releases)
        return self._epsilon[releases]

    def configure_train(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, TrainIns]]:
        plan = self.strategy.configure_train(round_number, arrays, clients)
        if self.max_epsilon is not None and plan:
            worst = max(self.releases.get(cid, 0) for cid, _ in plan)
            spent, after = self.epsilon(worst), self.epsilon(worst + 1)
            if after > self.max_epsilon:
                raise PrivacyBudgetExceeded(
                    f"privacy budget: round {round_number} would raise a client's local ε "
                    f"from {spent:.4g} to {after:.4g} (δ = {self.delta:g}), over "
                    f"max_epsilon = {self.max_epsilon:g}; training stopped after round "
                    f"{round_number - 1}",
                    round_number,
                    spent,
                    after,
                )
        return plan

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        """On resume, count each client's releases again from the completed rounds: every
        client whose update reached the server, accepted or rejected, released once."""
        super().restore(records)
        self.releases = {}
        for record in records:
            released = {
                int(cid) for cid, entry in record.get("clients", {}).items() if "train" in entry
            }
            released |= {
                int(f["client_id"])
                for f in record.get("failures", [])
                if f.get("task") == "train" and f.get("kind") == "rejected"
            }
            for cid in released:
                self.releases[cid] = self.releases.get(cid, 0) + 1

    def _mismatch(self, metrics: Metrics) -> str | None:
        z, c = metrics.get("dp_noise_multiplier"), metrics.get("dp_clip")
        if not isinstance(z, (int, float)) or not isinstance(c, (int, float)):
            return "it reports no local DP mechanism (wrap the client in LocalDP)"
        if z < self.noise_multiplier * (1 - 1e-9) or c > self.clip * (1 + 1e-9):
            return (
                f"its local DP (noise multiplier {z:g}, clip {c:g}) is weaker than configured "
                f"(noise multiplier {self.noise_multiplier:g}, clip {self.clip:g})"
            )
        return None

    def aggregate_train(
        self, round_number: int, arrays: Arrays, outcomes: Iterable[Outcome]
    ) -> TrainSummary:
        rejected: list[Failure] = []

        def checked() -> Iterable[Outcome]:
            for outcome in outcomes:
                res = outcome.result
                if outcome.error is None and isinstance(res, TrainRes):
                    cid = outcome.client_id
                    self.releases[cid] = self.releases.get(cid, 0) + 1
                    why = self._mismatch(res.metrics) if isinstance(res.metrics, dict) else None
                    if why is not None:
                        rejected.append(
                            Failure(cid, "train", f"update rejected: {why}", "rejected")
                        )
                        continue
                yield outcome

        summary = self.strategy.aggregate_train(round_number, arrays, checked())
        privacy: dict[str, Any] = {
            "epsilon": self.epsilon(max(self.releases.values(), default=0)),
            "delta": self.delta,
            "accountant": "analytic_gaussian",
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "mode": "local",
            "epsilon_round": self.epsilon(1),
        }
        return dataclasses.replace(
            summary, failures=[*summary.failures, *rejected], privacy=privacy
        )
