"""Server optimizers: how the aggregated update Δ moves the global model w.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR, arXiv:2003.00295) treat
``Δ_t = aggregate_k(w_k − w_t)`` as a pseudo-gradient (pointing downhill) and apply a server
optimizer to it. ``Plain(1.0)`` is FedAvg; ``Momentum`` is FedAvgM; ``Adam``, ``Yogi`` and
``Adagrad`` are FedAdam, FedYogi and FedAdagrad of Algorithm 2 (no bias correction).

Pure NumPy. The moments are float64 (complex128 for complex arrays) and are the optimizer's
whole state: ``state()`` returns them, ``load_state()`` restores them, and a resumed run
continues bit-identically. The new model comes back in the model's dtypes. Integer and
boolean arrays (counters, masks) take ``w + rint(Δ)`` and have no optimizer state.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from pollinate.errors import ConfigError, UpdateRejected
from pollinate.types import Arrays, Scalar


def _check_real(name: str, value: float, low: float, high: float, *, open_low: bool) -> float:
    ok = (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if open_low else value >= low)
        and value < high
    )
    if not ok:
        left = "(" if open_low else "["
        raise ConfigError(f"{name} must be a finite number in {left}{low}, {high}), got {value!r}")
    return float(value)


def _lr(value: float) -> float:
    return _check_real("server_lr", value, 0.0, math.inf, open_low=True)


def _beta(name: str, value: float) -> float:
    return _check_real(name, value, 0.0, 1.0, open_low=False)


class ServerOptimizer(ABC):
    """Applies the aggregated update Δ to the global model w, keeping its own state."""

    name: str = ""
    #: names of the per-array state (moments), in the order ``state()`` lists them
    _slots: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: dict[str, list[np.ndarray]] | None = None  # created by the first step
        self.rounds = 0

    def step(self, arrays: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Arrays:
        """The next model ``w ← w + update(Δ)``, in the dtypes of ``arrays``."""
        if len(delta) != len(arrays):
            raise UpdateRejected(f"delta has {len(delta)} arrays, the model has {len(arrays)}")
        arrays = [np.asarray(w) for w in arrays]
        deltas = [np.asarray(d) for d in delta]
        for i, (w, d) in enumerate(zip(arrays, deltas)):
            if d.shape != w.shape:
                raise UpdateRejected(f"delta array {i} has shape {d.shape}, expected {w.shape}")
        inexact = [w for w in arrays if w.dtype.kind in "fc"]
        if self._state is None:
            self._check_arrays(inexact)
            self._state = {slot: [self._initial(slot, w) for w in inexact] for slot in self._slots}
        self._check_state(inexact)
        out: Arrays = []
        j = 0  # index among the inexact arrays, which alone have state
        for w, d in zip(arrays, deltas):
            if w.dtype.kind in "fc":
                wide = np.complex128 if w.dtype.kind == "c" else np.float64
                moments = {slot: values[j] for slot, values in self._state.items()}
                new = self._update(w.astype(wide), d.astype(wide), **moments)
                out.append(new.astype(w.dtype))
                j += 1
            else:
                out.append((w.astype(np.float64) + np.rint(d.astype(np.float64))).astype(w.dtype))
        self.rounds += 1
        return out

    @abstractmethod
    def _update(self, w: np.ndarray, d: np.ndarray, **moments: np.ndarray) -> np.ndarray:
        """The next value of one array, from its float64 ``w`` and ``Δ``; updates the
        moments in place."""

    def _initial(self, slot: str, w: np.ndarray) -> np.ndarray:
        return np.zeros(w.shape, dtype=np.complex128 if w.dtype.kind == "c" else np.float64)

    def _check_arrays(self, inexact: Sequence[np.ndarray]) -> None:
        """Refuse arrays this optimizer cannot handle (before any state is made)."""

    def _check_state(self, inexact: Sequence[np.ndarray]) -> None:
        assert self._state is not None
        for slot, values in self._state.items():
            shapes = [v.shape for v in values]
            if shapes != [w.shape for w in inexact]:
                raise ConfigError(
                    f"{self.name} optimizer state {slot!r} holds arrays of shapes {shapes}, but "
                    f"the model's float arrays have shapes {[w.shape for w in inexact]}: the "
                    "saved state is for another model; start the run afresh"
                )

    def state(self) -> dict[str, Any]:
        """Everything needed to resume: name, rounds, and a copy of each moment list."""
        moments = {slot: [v.copy() for v in values] for slot, values in (self._state or {}).items()}
        return {"name": self.name, "rounds": self.rounds, **moments}

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from what ``state()`` returned."""
        if state.get("name") != self.name:
            raise ConfigError(
                f"optimizer state is for {state.get('name')!r}, not {self.name!r}: resume with "
                "the optimizer the run was started with"
            )
        rounds = state.get("rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ConfigError(f"optimizer state 'rounds' must be an int >= 0, got {rounds!r}")
        present = [slot for slot in self._slots if slot in state]
        if present and len(present) != len(self._slots):
            raise ConfigError(
                f"{self.name} optimizer state must hold all of {list(self._slots)}, got {present}"
            )
        loaded: dict[str, list[np.ndarray]] | None = None
        if present:
            loaded = {}
            for slot in self._slots:
                values = state[slot]
                if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, np.ndarray) and v.dtype.kind in "fc" for v in values
                ):
                    raise ConfigError(
                        f"{self.name} optimizer state {slot!r} must be a list of float arrays"
                    )
                loaded[slot] = [
                    v.astype(np.complex128 if v.dtype.kind == "c" else np.float64) for v in values
                ]
        self._state, self.rounds = loaded, rounds

    def describe(self) -> dict[str, Scalar]:
        """The name and parameters: ``make_optimizer(**opt.describe())`` rebuilds it."""
        return {"name": self.name, **self._params()}

    @abstractmethod
    def _params(self) -> dict[str, Scalar]: ...

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"


class Plain(ServerOptimizer):
    """``w ← w + η Δ``: with ``η = 1`` and Δ the weighted mean of ``w_k − w``, this is FedAvg
    (McMahan et al. 2017, arXiv:1602.05629), computed as ``(w in float64 + Δ)`` cast back to
    the model's dtype. ``η ≠ 1`` is FedAvg with a server learning rate (Reddi et al. 2021).
    No state."""

    name = "plain"

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__()
        self.server_lr = _lr(server_lr)

    def _update(self, w: np.ndarray, d: np.ndarray, **moments: np.ndarray) -> np.ndarray:
        return w + self.server_lr * d  # 1.0 · Δ is Δ exactly: η = 1 is FedAvg to the bit

    def _params(self) -> dict[str, Scalar]:
        return {"server_lr": self.server_lr}


class Momentum(ServerOptimizer):
    """Server momentum, FedAvgM (Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification", arXiv:1909.06335).

    ``v ← β v + Δ`` (``v₀ = 0``), then ``w ← w + η v``. Momentum accumulates the consistent
    part of successive updates and damps the client-sampling noise, which helps most when
    clients are non-IID and few take part per round. ``0 <= β < 1``.
    """

    name = "momentum"
    _slots = ("velocity",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr = _lr(server_lr)
        self.momentum = _beta("momentum", momentum)

    def _update(self, w: np.ndarray, d: np.ndarray, **moments: np.ndarray) -> np.ndarray:
        v = moments["velocity"]
        v *= self.momentum
        v += d
        return w + self.server_lr * v

    def _params(self) -> dict[str, Scalar]:
        return {"server_lr": self.server_lr, "momentum": self.momentum}


class _Adaptive(ServerOptimizer):
    """Algorithm 2 of Reddi et al. 2021: first moment, a second-moment rule, the step."""

    _slots = ("m", "v")

    def __init__(self, server_lr: float, beta_1: float, tau: float) -> None:
        super().__init__()
        self.server_lr = _lr(server_lr)
        self.beta_1 = _beta("beta_1", beta_1)
        self.tau = _check_real("tau", tau, 0.0, math.inf, open_low=True)

    def _initial(self, slot: str, w: np.ndarray) -> np.ndarray:
        # m_{-1} = 0 and v_{-1} = τ², as in the paper
        return np.full(w.shape, 0.0 if slot == "m" else self.tau**2)

    def _check_arrays(self, inexact: Sequence[np.ndarray]) -> None:
        for i, w in enumerate(inexact):
            if w.dtype.kind == "c":
                raise ConfigError(
                    f"{self.name} needs real arrays, but float array {i} is {w.dtype}: use "
                    "server optimizer 'plain' or 'momentum'"
                )

    def _update(self, w: np.ndarray, d: np.ndarray, **moments: np.ndarray) -> np.ndarray:
        m, v = moments["m"], moments["v"]
        m *= self.beta_1
        m += (1.0 - self.beta_1) * d
        self._second_moment(v, d * d)
        return w + self.server_lr * m / (np.sqrt(v) + self.tau)

    @abstractmethod
    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        """Update ``v`` in place from ``Δ²``."""

    def _params(self) -> dict[str, Scalar]:
        return {"server_lr": self.server_lr, "beta_1": self.beta_1, "tau": self.tau}


class Adam(_Adaptive):
    """FedAdam (Reddi et al. 2021, arXiv:2003.00295, Algorithm 2, no bias correction).

    ``m_t = β₁ m_{t−1} + (1 − β₁) Δ_t``, ``v_t = β₂ v_{t−1} + (1 − β₂) Δ_t²``,
    ``w_{t+1} = w_t + η m_t / (√v_t + τ)``, with ``m_{−1} = 0`` and ``v_{−1} = τ²``. A
    per-coordinate step size that forgets old updates: robust to badly scaled parameters and
    to the scale of the server learning rate; τ bounds the step where ``v`` is tiny.
    Defaults: η = 0.1, β₁ = 0.9, β₂ = 0.99, τ = 1e-3.
    """

    name = "adam"

    def __init__(
        self, server_lr: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(server_lr, beta_1, tau)
        self.beta_2 = _beta("beta_2", beta_2)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        v *= self.beta_2
        v += (1.0 - self.beta_2) * d2

    def _params(self) -> dict[str, Scalar]:
        return {**super()._params(), "beta_2": self.beta_2}


class Yogi(Adam):
    """FedYogi (Reddi et al. 2021, arXiv:2003.00295, Algorithm 2; Yogi: Zaheer et al. 2018).

    As ``Adam`` except ``v_t = v_{t−1} − (1 − β₂) Δ_t² sign(v_{t−1} − Δ_t²)``: ``v`` moves
    towards Δ² by an additive step instead of a multiplicative one, so a sudden large update
    raises it slowly and a quiet spell does not collapse it, which keeps the step size more
    stable than Adam's when updates are heterogeneous.
    """

    name = "yogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        v -= (1.0 - self.beta_2) * d2 * np.sign(v - d2)


class Adagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021, arXiv:2003.00295, Algorithm 2).

    ``v_t = v_{t−1} + Δ_t²`` (never forgets, so steps shrink over the run), with the same
    first moment ``m_t = β₁ m_{t−1} + (1 − β₁) Δ_t`` and step
    ``w_{t+1} = w_t + η m_t / (√v_t + τ)`` as FedAdam. Algorithm 2 keeps ``β₁`` for all three
    optimizers; here it defaults to 0 (``m_t = Δ_t``: Adagrad without momentum); set
    ``beta_1=0.9`` for the momentum form. Suits sparse or rarely-updated parameters.
    """

    name = "adagrad"

    def __init__(self, server_lr: float = 0.1, beta_1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(server_lr, beta_1, tau)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        v += d2


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (Plain, Momentum, Adam, Yogi, Adagrad)
}


def make_optimizer(name: str, **params: Any) -> ServerOptimizer:
    """The server optimizer called ``name`` ("plain", "momentum", "adam", "yogi", "adagrad")
    built with ``params``; ConfigError names the choices when either is wrong."""
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown server optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}"
        )
    allowed = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"server optimizer {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(allowed)}"
        )
    return cls(**params)
