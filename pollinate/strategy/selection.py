"""Client selection: which of the available clients take part in a round.

A policy is a value handed to the strategy. ``select`` is given the round's available
clients, the strategy's ``fraction`` and ``minimum``, and a generator seeded by the caller
(``(seed, round, purpose)``), so every backend samples the same clients; it returns its
picks in the order of ``clients``. ``observe`` tells the policy how the round went (train
metrics of the clients that succeeded, the failure kind of those that did not); policies
that learn from it keep that memory in ``state()`` so a resumed run selects the same clients.

``sample_size`` is the one formula for the number of clients per round.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pollinate.errors import ConfigError
from pollinate.types import ClientId, Metrics

#: how a client's task can fail (``Failure.kind``)
FAILURE_KINDS = ("error", "timeout", "rejected")


def sample_size(fraction: float, available: int, minimum: int) -> int:
    """Clients per round: ``min(available, max(minimum, ⌈fraction · available⌉))``.

    The product is rounded to 6 decimals first (0.07 · 100 is 7.000000000000001 in floating
    point, which must give 7). ``fraction <= 0`` gives 0: nobody (e.g. no federated
    evaluation).
    """
    if fraction <= 0:
        return 0
    return min(available, max(minimum, math.ceil(round(fraction * available, 6))))


def _in_order(clients: Sequence[ClientId], positions: np.ndarray) -> list[ClientId]:
    return [clients[int(i)] for i in np.sort(positions)]


def finite_metric(metrics: Metrics, name: str) -> float | None:
    """``metrics[name]`` as a float when it is a finite number (not a bool), else None."""
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value) if math.isfinite(value) else None


class SelectionPolicy(ABC):
    """Chooses a round's clients; may learn from how earlier rounds went."""

    name: str = ""

    @abstractmethod
    def select(
        self,
        round_number: int,
        clients: Sequence[ClientId],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> list[ClientId]:
        """The clients of round ``round_number``, in the order of ``clients``."""

    def observe(
        self,
        round_number: int,
        results: Mapping[ClientId, Metrics],
        failed: Mapping[ClientId, str],
        *,
        examples: Mapping[ClientId, int] | None = None,
        durations: Mapping[ClientId, float] | None = None,
    ) -> None:
        """Learn from a finished round: ``results`` holds the train metrics of the clients
        that succeeded, ``failed`` the failure kind ("error" | "timeout" | "rejected") of
        those that did not, ``examples`` the example count of each success, ``durations``
        how long each task took where known (simulated seconds on a virtual clock, else
        measured ones; a failed client may have one too). Stateless policies ignore it."""

    def state(self) -> dict[str, Any]:
        """What the policy learnt, JSON-safe (str keys, ints, floats, lists, dicts)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Resume from what ``state()`` returned."""
        if not isinstance(state, Mapping):
            raise ConfigError(f"{self.name} selection state must be a dict, got {state!r}")

    def describe(self) -> dict[str, Any]:
        """The name and parameters: ``make_policy(**policy.describe())`` rebuilds it."""
        return {"name": self.name}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({params})"


class FixedSizePolicy(SelectionPolicy):
    """A policy that picks exactly ``sample_size(fraction, available, minimum)`` clients."""

    def select(
        self,
        round_number: int,
        clients: Sequence[ClientId],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> list[ClientId]:
        return self.pick(round_number, clients, sample_size(fraction, len(clients), minimum), rng)

    @abstractmethod
    def pick(
        self, round_number: int, clients: Sequence[ClientId], k: int, rng: np.random.Generator
    ) -> list[ClientId]:
        """``k`` of ``clients`` (``0 <= k <= len(clients)``), in the order of ``clients``."""


class Uniform(FixedSizePolicy):
    """``k = sample_size(…)`` clients uniformly at random without replacement (McMahan et al.
    2017); all of them when ``k`` is every available client, without drawing."""

    name = "uniform"

    def pick(
        self, round_number: int, clients: Sequence[ClientId], k: int, rng: np.random.Generator
    ) -> list[ClientId]:
        if k <= 0:
            return []
        if k == len(clients):
            return list(clients)
        return _in_order(clients, rng.choice(len(clients), size=k, replace=False))


class Poisson(SelectionPolicy):
    """Poisson sampling: every client takes part independently with probability ``rate``,
    so the round size is Binomial(available, rate); ``fraction`` and ``minimum`` are ignored.

    Drawn as ``k ~ Binomial(available, q)``, then ``k`` distinct clients uniformly: the same
    distribution as independent coin flips, and the draw DP-FedAvg's privacy accounting
    assumes (privacy amplification by Poisson subsampling; Abadi et al. 2016,
    arXiv:1607.00133; McMahan et al. 2018, arXiv:1710.06963). A round may have no clients.
    """

    name = "poisson"

    def __init__(self, rate: float = 0.1) -> None:
        if not (
            isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 < rate <= 1.0
        ):
            raise ConfigError(f"poisson rate must be in (0, 1], got {rate!r}")
        self.rate = float(rate)

    def select(
        self,
        round_number: int,
        clients: Sequence[ClientId],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> list[ClientId]:
        k = int(rng.binomial(len(clients), self.rate))
        return _in_order(clients, rng.choice(len(clients), size=k, replace=False))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rate": self.rate}


class PowerOfChoice(FixedSizePolicy):
    """Power-of-choice selection (Cho, Wang & Joshi 2022, "Towards Understanding Biased Client
    Selection in Federated Learning", AISTATS, arXiv:2010.01243), the rpow-d variant.

    Each round: draw ``d = candidates`` clients uniformly without replacement (``d`` is
    raised to ``k`` when smaller, and capped at the number available), then keep the ``k``
    with the highest local loss. rpow-d ranks candidates by the last train ``metric``
    ("loss") each one reported when it last trained (``observe``), so it needs no extra
    communication: pow-d's fresh loss evaluation on every candidate costs ``d`` extra
    round trips. Clients never seen yet rank first (their loss is unknown, so they are
    worth a look); equal losses are ordered by ``rng``. Failures leave a client's loss as
    it was.

    Favouring high-loss clients speeds up convergence on heterogeneous (non-IID) data, at
    the price of a bias towards those clients' objective that grows with ``d``; ``d = k``
    is uniform sampling.
    """

    name = "power_of_choice"

    def __init__(self, candidates: int = 10, metric: str = "loss") -> None:
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ConfigError(f"power_of_choice candidates must be an int >= 1, got {candidates!r}")
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"power_of_choice metric must be a metric name, got {metric!r}")
        self.candidates = candidates
        self.metric = metric
        self._losses: dict[ClientId, float] = {}

    def pick(
        self, round_number: int, clients: Sequence[ClientId], k: int, rng: np.random.Generator
    ) -> list[ClientId]:
        if k <= 0:
            return []
        if k == len(clients):
            return list(clients)
        d = min(len(clients), max(self.candidates, k))
        drawn = rng.choice(len(clients), size=d, replace=False)
        losses = np.array([self._losses.get(clients[int(i)], math.inf) for i in drawn])
        order = np.lexsort((rng.random(d), -losses))  # highest loss first, ties at random
        return _in_order(clients, drawn[order[:k]])

    def observe(
        self,
        round_number: int,
        results: Mapping[ClientId, Metrics],
        failed: Mapping[ClientId, str],
        *,
        examples: Mapping[ClientId, int] | None = None,
        durations: Mapping[ClientId, float] | None = None,
    ) -> None:
        for cid, metrics in results.items():
            if (loss := finite_metric(metrics, self.metric)) is not None:
                self._losses[cid] = loss

    def state(self) -> dict[str, Any]:
        return {"losses": {str(cid): loss for cid, loss in self._losses.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        losses = state.get("losses", {})
        try:
            self._losses = {int(cid): float(loss) for cid, loss in losses.items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise ConfigError(
                f"power_of_choice state 'losses' must map client ids to losses: {e}"
            ) from e

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "candidates": self.candidates, "metric": self.metric}


class CoolDown(SelectionPolicy):
    """Skips clients that failed recently; wraps any other policy.

    A client whose task failed with a kind in ``kinds`` (by default "error" and "timeout",
    not "rejected": a rejected update says nothing about the client's health) in round ``r``
    is left out of rounds ``r+1 … r+rounds``; succeeding again clears it. The wrapped
    policy chooses among the others. With a fixed-size policy, if fewer than
    ``k = sample_size(fraction, available, minimum)`` clients remain, the round is filled up
    to ``k`` from the cooling clients, least recently failed first (then in the order of
    ``clients``), so a round never shrinks below what was asked. A ``Poisson`` policy draws
    among the remaining clients only and is never filled; note that leaving clients out
    changes the sampling that DP accounting assumes.
    """

    name = "cooldown"

    def __init__(
        self,
        policy: SelectionPolicy | None = None,
        rounds: int = 3,
        kinds: Sequence[str] = ("error", "timeout"),
    ) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"cooldown rounds must be an int >= 1, got {rounds!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not kinds or not set(kinds) <= set(FAILURE_KINDS):
            raise ConfigError(
                f"cooldown kinds must be some of {', '.join(FAILURE_KINDS)}, got {list(kinds)}"
            )
        if isinstance(policy, CoolDown):
            raise ConfigError("cooldown cannot wrap another cooldown")
        self.policy = Uniform() if policy is None else policy
        self.rounds = rounds
        self.kinds = kinds
        self._failed: dict[ClientId, int] = {}  # client → last round it failed in

    def cooling(self, round_number: int) -> dict[ClientId, int]:
        """The clients left out of round ``round_number``, with the round each last failed."""
        return {c: r for c, r in self._failed.items() if round_number - r <= self.rounds}

    def select(
        self,
        round_number: int,
        clients: Sequence[ClientId],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> list[ClientId]:
        cooling = self.cooling(round_number)
        eligible = [c for c in clients if c not in cooling]
        if not isinstance(self.policy, FixedSizePolicy):
            return self.policy.select(round_number, eligible, fraction, minimum, rng)
        k = sample_size(fraction, len(clients), minimum)
        picked = self.policy.pick(round_number, eligible, min(k, len(eligible)), rng)
        position = {c: i for i, c in enumerate(clients)}
        if len(picked) < k:
            waiting = sorted(
                (c for c in clients if c in cooling), key=lambda c: (cooling[c], position[c])
            )
            picked += waiting[: k - len(picked)]
        return sorted(picked, key=position.__getitem__)

    def observe(
        self,
        round_number: int,
        results: Mapping[ClientId, Metrics],
        failed: Mapping[ClientId, str],
        *,
        examples: Mapping[ClientId, int] | None = None,
        durations: Mapping[ClientId, float] | None = None,
    ) -> None:
        for cid in results:
            self._failed.pop(cid, None)
        for cid, kind in failed.items():
            if kind in self.kinds:
                self._failed[cid] = round_number
        # forget failures that can no longer cool a client in the rounds to come
        self._failed = self.cooling(round_number + 1)
        self.policy.observe(round_number, results, failed, examples=examples, durations=durations)

    def state(self) -> dict[str, Any]:
        return {
            "failed": {str(cid): r for cid, r in self._failed.items()},
            "policy": self.policy.state(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        try:
            self._failed = {int(cid): int(r) for cid, r in state.get("failed", {}).items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise ConfigError(f"cooldown state 'failed' must map client ids to rounds: {e}") from e
        self.policy.load_state(state.get("policy", {}))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "policy": self.policy.describe(),
            "rounds": self.rounds,
            "kinds": list(self.kinds),
        }


POLICIES: dict[str, type[SelectionPolicy]] = {
    cls.name: cls for cls in (Uniform, Poisson, PowerOfChoice, CoolDown)
}


def policies() -> dict[str, type[SelectionPolicy]]:
    """Every selection policy by name (``POLICIES`` and those in their own modules)."""
    from pollinate.strategy.oort import Oort  # its own module; it builds on this one

    return {**POLICIES, Oort.name: Oort}


def make_policy(name: str, **params: Any) -> SelectionPolicy:
    """The selection policy called ``name`` ("uniform", "poisson", "power_of_choice",
    "cooldown", "oort") built with ``params``. CoolDown's ``policy`` may be a policy, a
    name, or a dict as ``describe()`` returns. ConfigError names the choices when either is
    wrong."""
    known = policies()
    cls = known.get(name)
    if cls is None:
        raise ConfigError(f"unknown selection policy {name!r}; choose one of: {', '.join(known)}")
    allowed = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"selection policy {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(allowed) or 'none'}"
        )
    inner = params.get("policy")
    if isinstance(inner, str):
        params["policy"] = make_policy(inner)
    elif isinstance(inner, Mapping):
        params["policy"] = make_policy(**inner)
    return cls(**params)
