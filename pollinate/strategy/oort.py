"""Oort: guided participant selection, trading statistical utility against time.

Lai, Zhu, Madhyastha & Chowdhury 2021, "Oort: Efficient Federated Learning via Guided
Participant Selection", OSDI '21 (arXiv:2010.06081), Section 4 and Algorithm 1.

For every client ``i`` already tried ("explored"), with ``R`` the current round:

- **statistical utility** ``U_i = |B_i| · sqrt(1/|B_i| · Σ_{k∈B_i} loss(k)²)`` over the
  samples ``B_i`` of its last training. Clients report one number per task, so ``U_i`` is
  computed as ``n_i · ℓ_i`` with ``n_i`` the reported example count and ``ℓ_i`` the
  reported ``metric`` (default ``"loss"``): exact when the client reports the root mean
  square of its per-example losses, and a lower bound (Jensen) when it reports their mean,
  as pollinate's built-in clients do;
- the utilities are divided by their largest value, so they lie in ``(0, 1]`` and the
  staleness bonus below has the same weight whatever the loss scale (the authors'
  implementation normalises them likewise);
- **staleness bonus** ``+ sqrt(0.1 · log(R) / L_i)``, ``L_i`` the last round client ``i``
  was picked in: the utility of a client not heard from for long grows uncertain, so it is
  given a chance again;
- **system penalty**: if the client's expected duration ``t_i`` exceeds the preferred round
  duration ``T``, the utility is multiplied by ``(T / t_i)^α``. ``t_i`` is the duration the
  client's last task took as the round saw it (``Outcome.elapsed_s``: the simulated duration
  on the virtual clock, else the measured seconds), failed tasks included, so a client that
  keeps missing the deadline is penalised. ``T`` is ``preferred_duration_s`` (0: no
  penalty; built from a config, it defaults to the run's round deadline); ``α = alpha``
  (2 in the paper).

Each round of ``k`` picks, with exploration fraction
``ε_R = max(min_exploration, exploration · exploration_decay^(R−1))``:

1. **exploration**: ``min(round(ε_R · k), #unexplored)`` clients drawn uniformly among those
   never tried (the paper draws them by speed where it is known beforehand; here nothing is
   known about a client before it has run);
2. **exploitation**: the remaining ``k'`` picks come from the explored clients whose
   utility is at least ``cutoff`` (0.95) × the ``k'``-th highest utility, drawn without
   replacement with probability proportional to utility; if fewer than ``k'`` clients were
   explored, unexplored ones fill the round.

Left out: the **pacer**, which raises ``T`` when the accumulated statistical utility stops
growing, and the removal of outliers (clients picked too often, or with utilities beyond a
percentile). ``T`` stays fixed, which is right when it is a hard deadline the run must meet.

Everything the policy learnt (per client: the last utility, duration and round picked) is in
``state()``, so a resumed run picks the same clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pollinate.errors import ConfigError
from pollinate.strategy.selection import FixedSizePolicy, finite_metric
from pollinate.types import ClientId, Metrics


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check(name: str, value: Any, low: float, high: float, closed_low: bool = True) -> float:
    ok = _number(value) and (value >= low if closed_low else value > low) and value <= high
    if not ok or not math.isfinite(float(value)):
        lo = "[" if closed_low else "("
        raise ConfigError(
            f"oort {name} must be a number in {lo}{low}, {high}] "
            f"(strategy.oort_{name} in a config), got {value!r}"
        )
    return float(value)


def statistical_utility(num_examples: int, loss: float) -> float:
    """``U = n · sqrt(ℓ²) = n · |ℓ|``: Oort's ``|B|·sqrt(1/|B|·Σ loss²)`` when ``ℓ`` is the
    root mean square of the ``n`` per-example losses."""
    return float(num_examples) * abs(float(loss))


def system_penalty(preferred_s: float, duration_s: float | None, alpha: float) -> float:
    """``(T / t)^α`` when the expected duration ``t`` exceeds ``T``, else 1."""
    if duration_s is None or duration_s <= preferred_s:
        return 1.0
    if math.isinf(duration_s):
        return 0.0
    return float((preferred_s / duration_s) ** alpha)


def staleness_bonus(round_number: int, last_round: int) -> float:
    """``sqrt(0.1 · log(R) / L)``: the uncertainty of a utility last measured in round L."""
    return math.sqrt(0.1 * math.log(round_number) / max(1, last_round))


class Oort(FixedSizePolicy):
    """Oort selection (Lai et al. 2021); the maths is in the module docstring."""

    name = "oort"

    def __init__(
        self,
        alpha: float = 2.0,
        preferred_duration_s: float = 0.0,
        exploration: float = 0.9,
        exploration_decay: float = 0.98,
        min_exploration: float = 0.3,
        cutoff: float = 0.95,
        metric: str = "loss",
    ) -> None:
        self.alpha = _check("alpha", alpha, 0.0, math.inf)
        self.preferred_duration_s = _check("preferred_duration_s", preferred_duration_s, 0, 1e12)
        self.exploration = _check("exploration", exploration, 0.0, 1.0)
        self.exploration_decay = _check("exploration_decay", exploration_decay, 0.0, 1.0, False)
        self.min_exploration = _check("min_exploration", min_exploration, 0.0, 1.0)
        if self.min_exploration > self.exploration:
            raise ConfigError(
                f"oort min_exploration ({self.min_exploration}) must not exceed exploration "
                f"({self.exploration}): lower strategy.oort_min_exploration"
            )
        self.cutoff = _check("cutoff", cutoff, 0.0, 1.0, False)
        if not isinstance(metric, str) or not metric:
            raise ConfigError(f"oort metric must be a train metric name, got {metric!r}")
        self.metric = metric
        # client → [statistical utility or None, duration or None, last round picked]
        self._clients: dict[ClientId, list[Any]] = {}

    # the maths ------------------------------------------------------------------------------

    def exploration_at(self, round_number: int) -> float:
        """``ε_R = max(min_exploration, exploration · exploration_decay^(R−1))``."""
        decayed = self.exploration * self.exploration_decay ** max(0, round_number - 1)
        return max(self.min_exploration, decayed)

    def utilities(self, round_number: int, clients: Sequence[ClientId]) -> np.ndarray:
        """The Oort utility of each of ``clients`` (all explored) in round ``round_number``."""
        stats = [self._clients[c][0] for c in clients]
        top = max((u for u in stats if u is not None), default=0.0)
        out = np.empty(len(clients))
        for i, cid in enumerate(clients):
            stat, duration, last = self._clients[cid]
            u = (stat / top if stat is not None and top > 0 else 0.0) + staleness_bonus(
                round_number, last
            )
            if self.preferred_duration_s > 0:
                u *= system_penalty(self.preferred_duration_s, duration, self.alpha)
            out[i] = u
        return out

    # selection ------------------------------------------------------------------------------

    def pick(
        self, round_number: int, clients: Sequence[ClientId], k: int, rng: np.random.Generator
    ) -> list[ClientId]:
        if k <= 0:
            return []
        if k == len(clients):
            picked = list(clients)
        else:
            explored = [c for c in clients if c in self._clients]
            fresh = [c for c in clients if c not in self._clients]
            n_explore = min(len(fresh), round(self.exploration_at(round_number) * k))
            n_exploit = min(len(explored), k - n_explore)
            n_explore = k - n_exploit  # too few explored: fresh clients fill the round
            picked = self._exploit(round_number, explored, n_exploit, rng)
            if n_explore:
                drawn = rng.choice(len(fresh), size=n_explore, replace=False)
                picked += [fresh[int(i)] for i in drawn]
        for cid in picked:  # L_i: the last round each one was picked in
            self._clients.setdefault(cid, [None, None, round_number])[2] = round_number
        position = {c: i for i, c in enumerate(clients)}
        return sorted(picked, key=position.__getitem__)

    def _exploit(
        self, round_number: int, explored: list[ClientId], k: int, rng: np.random.Generator
    ) -> list[ClientId]:
        if k <= 0:
            return []
        util = self.utilities(round_number, explored)
        threshold = self.cutoff * np.sort(util)[::-1][k - 1]
        admitted = np.flatnonzero(util >= threshold)
        weights = util[admitted]
        positive = admitted[weights > 0]
        if len(positive) >= k:
            p = util[positive] / util[positive].sum()
            chosen = rng.choice(positive, size=k, replace=False, p=p)
        else:  # not enough clients with a utility: the rest at random among the admitted
            rest = admitted[weights <= 0]
            chosen = np.concatenate(
                [positive, rng.choice(rest, size=k - len(positive), replace=False)]
            )
        return [explored[int(i)] for i in chosen]

    # learning -------------------------------------------------------------------------------

    def observe(
        self,
        round_number: int,
        results: Mapping[ClientId, Metrics],
        failed: Mapping[ClientId, str],
        *,
        examples: Mapping[ClientId, int] | None = None,
        durations: Mapping[ClientId, float] | None = None,
    ) -> None:
        examples = examples or {}
        for cid in (*results, *failed):
            self._clients.setdefault(cid, [None, None, round_number])
        for cid, metrics in results.items():
            loss, n = finite_metric(metrics, self.metric), examples.get(cid)
            if loss is not None and n is not None:
                self._clients[cid][0] = statistical_utility(int(n), loss)
        for cid, seconds in (durations or {}).items():
            if cid in self._clients and math.isfinite(seconds) and seconds >= 0:
                self._clients[cid][1] = float(seconds)

    def state(self) -> dict[str, Any]:
        return {"clients": {str(cid): list(entry) for cid, entry in self._clients.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        try:
            clients: dict[ClientId, list[Any]] = {}
            for cid, (stat, duration, last) in state.get("clients", {}).items():
                clients[int(cid)] = [
                    None if stat is None else float(stat),
                    None if duration is None else float(duration),
                    int(last),
                ]
        except (AttributeError, TypeError, ValueError) as e:
            raise ConfigError(
                f"oort state 'clients' must map client ids to [utility, duration, round]: {e}"
            ) from e
        self._clients = clients

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alpha": self.alpha,
            "preferred_duration_s": self.preferred_duration_s,
            "exploration": self.exploration,
            "exploration_decay": self.exploration_decay,
            "min_exploration": self.min_exploration,
            "cutoff": self.cutoff,
            "metric": self.metric,
        }
