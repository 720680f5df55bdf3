"""What an algorithm asks of the clients, and what the server does with their answers.

A ``LocalAlgorithm`` is the part of a strategy that differs between FedAvg, FedProx,
SCAFFOLD, FedNova and q-FedAvg: the extra instructions a client gets (train-config keys, and
arrays sent with the model), what a client's result holds, how each result is weighted
before the aggregator sees it, and how the aggregate becomes the update ``Δ`` that the server
optimizer applies. The client halves live in the framework adapters, which read these
train-config keys:

- ``proximal_mu`` (FedProx): add ``μ(w − w_global)`` to each gradient;
- ``scaffold`` (SCAFFOLD): the task's arrays are the model then the server's control variate
  ``c``; the client corrects each gradient by ``c − c_i`` and returns its model then
  ``Δc_i``;
- ``report_initial_loss`` (q-FedAvg): report the received model's training loss as
  ``initial_loss``;
- every client reports ``num_steps``, its local optimizer steps (FedNova reads it).

The aggregator works on the clients' models (or inputs derived from them); every aggregator
here commutes with a shift, so aggregating models or updates ``Δ_k = w_k − w`` is the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pollinate.errors import ConfigError
from pollinate.strategy.check import squared_distance
from pollinate.types import Arrays, Config, Metrics

#: train-config keys the client halves read
PROXIMAL_MU = "proximal_mu"
SCAFFOLD = "scaffold"
REPORT_INITIAL_LOSS = "report_initial_loss"
#: train-metric keys the server halves read
NUM_STEPS = "num_steps"
INITIAL_LOSS = "initial_loss"


def as_float64(arrays: Sequence[np.ndarray]) -> Arrays:
    """Float arrays as float64 (complex as complex128); others unchanged (the aggregator
    rounds integer arrays)."""
    out: Arrays = []
    for a in arrays:
        if a.dtype.kind == "f":
            out.append(a.astype(np.float64))
        elif a.dtype.kind == "c":
            out.append(a.astype(np.complex128))
        else:
            out.append(a)
    return out


def difference(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> Arrays:
    """``arrays − reference`` in float64 (complex128 for complex arrays), every array."""
    return [
        np.subtract(a, r, dtype=np.complex128 if r.dtype.kind == "c" else np.float64)
        for a, r in zip(arrays, reference)
    ]


class LocalAlgorithm:
    """Plain local training (FedAvg; McMahan et al. 2017): no extra instructions, each
    model weighted by its example count ``n_k``, ``Δ = aggregate − w``.

    Subclasses override the steps they change. ``sum_based``: whether the server half still
    works when only the weighted sum of the models is known (secure aggregation, central DP).
    """

    name = "fedavg"
    sum_based = True

    def start(self, arrays: Arrays, population: int) -> None:
        """A new round over ``arrays``; ``population``: the clients it samples from."""

    def instructions(self, arrays: Arrays) -> tuple[Arrays, Config]:
        """The arrays sent to each client and the extra train-config keys."""
        return arrays, {}

    def expected(self, arrays: Arrays) -> Arrays | None:
        """What a client's result arrays must match (shapes and dtypes; None: no check)."""
        return arrays

    def weigh(
        self, result: Arrays, num_examples: int, metrics: Metrics, arrays: Arrays
    ) -> tuple[Arrays, float] | str:
        """What the aggregator receives for one result, and its weight (or why the result
        is rejected)."""
        return result, float(num_examples)

    def finish(self, aggregate: Arrays, arrays: Arrays) -> Arrays:
        """The update ``Δ`` from the aggregate of the round's inputs."""
        return difference(aggregate, arrays)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}


class ProximalTerm(LocalAlgorithm):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks",
    arXiv:1812.06127): each client minimises ``F_k(w) + μ/2 ‖w − w_global‖²``, which keeps
    local models near the global one when clients' data differ. The server side is FedAvg's.
    """

    name = "fedprox"

    def __init__(self, proximal_mu: float = 0.01) -> None:
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ConfigError(
                f"fedprox: proximal_mu must be a finite number >= 0, got {proximal_mu}"
            )
        self.proximal_mu = float(proximal_mu)

    def instructions(self, arrays: Arrays) -> tuple[Arrays, Config]:
        return arrays, {PROXIMAL_MU: self.proximal_mu}

    def describe(self) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}


class ControlVariates(LocalAlgorithm):
    """SCAFFOLD, option II (Karimireddy et al. 2020, arXiv:1910.06378).

    The server keeps a control variate ``c`` (zeros at first) and sends it with the model;
    client ``i`` keeps its own ``c_i`` and corrects every local gradient by ``c − c_i``
    (client drift), then sets ``c_i⁺ = c_i − c + (x − y_i)/(K η)`` after ``K`` steps of
    learning rate ``η`` and returns ``y_i`` and ``Δc_i = c_i⁺ − c_i``. The server averages
    the models as FedAvg does (example-weighted) and updates
    ``c ← c + |S|/N · mean_i Δc_i`` (``S`` the round's accepted clients, ``N`` the
    population). ``c`` is part of the strategy's saved state.
    """

    name = "scaffold"
    sum_based = False  # Δc needs its own sum

    def __init__(self) -> None:
        self.control: Arrays | None = None
        self._sum: Arrays = []
        self._count = 0
        self._population = 1

    def start(self, arrays: Arrays, population: int) -> None:
        if self.control is None:
            self.control = [np.zeros_like(a) for a in arrays]
        self._sum = [np.zeros(a.shape, np.float64) for a in arrays]
        self._count = 0
        self._population = max(1, population)

    def instructions(self, arrays: Arrays) -> tuple[Arrays, Config]:
        assert self.control is not None, "start() first"
        return [*arrays, *self.control], {SCAFFOLD: True}

    def expected(self, arrays: Arrays) -> Arrays:
        return [*arrays, *arrays]

    def weigh(
        self, result: Arrays, num_examples: int, metrics: Metrics, arrays: Arrays
    ) -> tuple[Arrays, float] | str:
        n = len(arrays)
        for s, dc in zip(self._sum, result[n:]):
            np.add(s, dc, out=s, casting="unsafe")
        self._count += 1
        return result[:n], float(num_examples)

    def finish(self, aggregate: Arrays, arrays: Arrays) -> Arrays:
        assert self.control is not None
        if self._count:
            share = 1.0 / self._population  # |S|/N · mean = Σ/N
            self.control = [
                (c.astype(np.float64) + s * share).astype(c.dtype)
                for c, s in zip(self.control, self._sum)
            ]
        return difference(aggregate, arrays)

    def state(self) -> dict[str, Any]:
        return {"control": self.control} if self.control is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        control = state.get("control")
        self.control = [np.array(a) for a in control] if control is not None else None


class NormalizedAveraging(LocalAlgorithm):
    """FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", arXiv:2007.07481): normalised averaging.

    Clients that take more local steps move further; plain averaging then favours them.
    With ``τ_k`` local steps (``num_steps``) of SGD with momentum ρ, client ``k``'s
    normalising factor is ``a_k = τ_k`` (ρ = 0) or
    ``a_k = [τ_k − ρ(1 − ρ^τ_k)/(1 − ρ)] / (1 − ρ)``; the server computes
    ``Δ = τ_eff · Σ_k p_k Δ_k / a_k`` with ``p_k = n_k / Σ n`` and ``τ_eff = Σ_k p_k a_k``.
    (For other local optimizers, e.g. Adam, ``a_k = τ_k`` is used.)
    """

    name = "fednova"
    sum_based = False  # the weights depend on each client's step count

    def __init__(self, momentum: float = 0.0) -> None:
        if not 0 <= momentum < 1:
            raise ConfigError(f"fednova: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self._weighted_a = 0.0
        self._weights = 0.0

    def start(self, arrays: Arrays, population: int) -> None:
        self._weighted_a = self._weights = 0.0

    def norm_factor(self, steps: int) -> float:
        """``a_k`` for ``steps`` local steps."""
        rho = self.momentum
        if rho == 0:
            return float(steps)
        return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)

    def weigh(
        self, result: Arrays, num_examples: int, metrics: Metrics, arrays: Arrays
    ) -> tuple[Arrays, float] | str:
        steps = metrics.get(NUM_STEPS)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            return f"FedNova needs the client's {NUM_STEPS!r} (>= 1) in its metrics, got {steps!r}"
        a = self.norm_factor(int(steps))
        self._weighted_a += num_examples * a
        self._weights += num_examples
        normalised = [
            w.astype(np.float64) + d / a if w.dtype.kind == "f" else r
            for w, d, r in zip(arrays, difference(result, arrays), result)
        ]
        return normalised, float(num_examples)

    def finish(self, aggregate: Arrays, arrays: Arrays) -> Arrays:
        tau_eff = self._weighted_a / self._weights if self._weights else 0.0
        return [
            d * tau_eff if w.dtype.kind == "f" else d
            for d, w in zip(difference(aggregate, arrays), arrays)
        ]

    def describe(self) -> dict[str, Any]:
        return {"momentum": self.momentum}


class FairWeighting(LocalAlgorithm):
    """q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated Learning",
    arXiv:1905.10497): clients with a higher loss get more weight, for fairer accuracy.

    Each client reports ``F_k``, the loss of the received model ``w`` on its training data
    (``initial_loss``). With ``L`` the inverse of the local learning rate (``lipschitz``),
    ``Δw_k = L(w − w_k)``, ``h_k = q F_k^(q−1) ‖Δw_k‖² + L F_k^q`` and
    ``w ← w − Σ_k F_k^q Δw_k / Σ_k h_k``; ``q = 0`` is a uniform average of the models.
    """

    name = "qfedavg"
    sum_based = False

    def __init__(self, q: float = 0.1, lipschitz: float = 20.0) -> None:
        if not (math.isfinite(q) and q >= 0):
            raise ConfigError(f"qfedavg: q must be a finite number >= 0, got {q}")
        if not (math.isfinite(lipschitz) and lipschitz > 0):
            raise ConfigError(f"qfedavg: lipschitz must be > 0 (1 / the local lr), got {lipschitz}")
        self.q = float(q)
        self.lipschitz = float(lipschitz)
        self._weights = 0.0
        self._h = 0.0

    def start(self, arrays: Arrays, population: int) -> None:
        self._weights = self._h = 0.0

    def instructions(self, arrays: Arrays) -> tuple[Arrays, Config]:
        return arrays, {REPORT_INITIAL_LOSS: True}

    def weigh(
        self, result: Arrays, num_examples: int, metrics: Metrics, arrays: Arrays
    ) -> tuple[Arrays, float] | str:
        loss = metrics.get(INITIAL_LOSS)
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not loss >= 0:
            return (
                f"q-FedAvg needs the client's {INITIAL_LOSS!r} (>= 0) in its metrics, got {loss!r}"
            )
        f = max(float(loss), 1e-10)
        L, q = self.lipschitz, self.q
        sq = L * L * squared_distance(result, arrays)
        weight = L * f**q
        self._weights += weight
        self._h += q * f ** (q - 1) * sq + L * f**q
        return result, weight

    def finish(self, aggregate: Arrays, arrays: Arrays) -> Arrays:
        scale = self._weights / self._h if self._h else 0.0
        return [
            d * scale if w.dtype.kind == "f" else d
            for d, w in zip(difference(aggregate, arrays), arrays)
        ]

    def describe(self) -> dict[str, Any]:
        return {"q": self.q, "lipschitz": self.lipschitz}
