"""The one update check every path uses: is a client's result well formed, and within bounds?

``check_outcome`` turns an outcome into ``None`` (it can be aggregated) or the ``Failure`` it
stands for: an error or timeout of the task, a result of the wrong type, bad or too many
metrics (``pollinate.limits``), a bad
example count, an update whose arrays do not match the global model (count, shapes, dtypes)
or hold NaN/inf, or a non-finite evaluation loss.

``UpdateBounds`` adds the limits that hold without differential privacy (a single client must
not take over the model):

- the L2 norm of ``Δ_k = w_k − w`` at most ``max_norm`` when set, and otherwise at most
  ``norm_factor`` times a reference norm: the median norm of the updates accepted so far in
  this round and the previous one (once three are known), else ``max(‖w‖, 1)``. Honest
  updates sit within a small factor of each other; a scaled-up one (model replacement,
  ×1e30) does not. ``on_excess = "reject"`` drops it, ``"clip"`` scales it down to the cap;
- the declared example count at most ``max_examples`` (2^31 by default) and at most
  ``examples_factor`` times the median count of the round's accepted updates so far (or the
  previous round's, from its first update on), so a zero update declaring 2^62 examples
  cannot replace the model.

The bounds are a backstop, not a defence against a careful attacker: an update just under
the cap still moves the mean. Robust aggregators (median, trimmed mean, Krum, Bulyan) are the
stronger defence when clients may be malicious; differential privacy bounds every client's
influence by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median

import numpy as np

from pollinate.errors import ConfigError
from pollinate.limits import DEFAULT_MAX_METRICS_BYTES, DEFAULT_MAX_METRICS_KEYS, check_metrics
from pollinate.strategy.base import Failure
from pollinate.types import Arrays, EvaluateRes, Outcome, QueryRes, TrainRes

ON_EXCESS = ("reject", "clip")
#: at least this many accepted updates before the round's own median is the reference
MIN_REFERENCE = 3


#: failures a simulated environment adds (``pollinate.simulation.clock``), by error prefix
FAILURE_KINDS = ("timeout", "offline", "lost", "corrupted")


def failure_kind(error: str) -> str:
    """A failed task's kind from its error: ``timeout``, ``offline``, ``lost``,
    ``corrupted`` (a simulated environment's) or ``error``."""
    for kind in FAILURE_KINDS:
        if error.startswith(kind):
            return kind
    return "error"


def check_update(template: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> str | None:
    """Why ``update`` cannot be averaged into ``template`` (None when it can)."""
    if len(update) != len(template):
        return f"expected {len(template)} arrays, got {len(update)}"
    for i, (t, u) in enumerate(zip(template, update)):
        if not isinstance(u, np.ndarray):
            return f"array {i} is {type(u).__name__}, not a NumPy array"
        if u.shape != t.shape:
            return f"array {i} has shape {u.shape}, expected {t.shape}"
        if u.dtype != t.dtype:
            return f"array {i} has dtype {u.dtype}, expected {t.dtype}"
        if u.dtype.kind in "fc" and not np.isfinite(u).all():
            return f"array {i} holds NaN or infinite values"
    return None


def check_outcome(outcome: Outcome, template: Arrays | None) -> Failure | None:
    """The failure an outcome stands for, or None if it can be aggregated.

    ``template``: what a train result's arrays must match (the global model, plus whatever
    else the strategy asked for); None skips the arrays check.
    """
    if outcome.error is not None:
        return Failure(outcome.client_id, outcome.kind, outcome.error, failure_kind(outcome.error))
    res = outcome.result
    expected = {"train": TrainRes, "evaluate": EvaluateRes, "query": QueryRes}[outcome.kind]
    if not isinstance(res, (TrainRes, EvaluateRes, QueryRes)) or not isinstance(res, expected):
        why = f"returned {type(res).__name__}, expected {expected.__name__}"
        return Failure(outcome.client_id, outcome.kind, why, "rejected")
    if not isinstance(res.metrics, dict):
        why = f"metrics must be a dict, got {type(res.metrics).__name__}"
        return Failure(outcome.client_id, outcome.kind, why, "rejected")
    too_much = check_metrics(res.metrics, DEFAULT_MAX_METRICS_KEYS, DEFAULT_MAX_METRICS_BYTES)
    if too_much is not None:
        return Failure(outcome.client_id, outcome.kind, too_much, "rejected")
    n = res.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        why = f"num_examples must be an int >= 0, got {n!r}"
        return Failure(outcome.client_id, outcome.kind, why, "rejected")
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


#: elements per chunk of the norms' float64 scratch (512 KiB: stays in cache)
_NORM_CHUNK = 1 << 16


def update_norm(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """The L2 norm of ``arrays − reference`` over the floating-point arrays, in float64."""
    return math.sqrt(squared_distance(arrays, reference))


def squared_distance(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """``‖arrays − reference‖²`` over the floating-point arrays, in float64."""
    return sum(squared_sum(a, r) for a, r in zip(arrays, reference) if r.dtype.kind == "f")


def _float_norm(arrays: Sequence[np.ndarray]) -> float:
    return math.sqrt(sum(squared_sum(a) for a in arrays if a.dtype.kind == "f"))


def squared_sum(a: np.ndarray, r: np.ndarray | None = None) -> float:
    """``Σ (a − r)²`` (``Σ a²`` without ``r``) in float64, one cache-sized chunk at a time.

    ``np.einsum`` without ``optimize`` is NumPy's own single-threaded loop: BLAS
    (``np.vdot``/``np.dot``) may start threads per call, which stall for milliseconds each
    when every core is busy, as in a simulation whose workers are training.
    """
    a = np.asarray(a).reshape(-1)
    r = None if r is None else np.asarray(r).reshape(-1)
    if r is not None and r.size != a.size:
        raise ValueError(f"an array of {a.size} values against a reference of {r.size}")
    buf = np.empty(min(a.size, _NORM_CHUNK))
    total = 0.0
    for lo in range(0, a.size, _NORM_CHUNK):
        d = buf[: min(_NORM_CHUNK, a.size - lo)]
        if r is None:
            d[...] = a[lo : lo + len(d)]
        else:
            np.subtract(a[lo : lo + len(d)], r[lo : lo + len(d)], out=d, dtype=np.float64)
        total += float(np.einsum("i,i->", d, d))
    return total


@dataclass
class UpdateBounds:
    """Caps on an update's norm and declared example count (see the module docstring).

    ``max_norm``/``max_examples``: absolute caps (0 or None: the defaults); ``norm_factor``
    and ``examples_factor``: the relative caps (0: off).
    """

    max_norm: float | None = None
    norm_factor: float = 100.0
    max_examples: int | None = None
    examples_factor: float = 100.0
    on_excess: str = "reject"
    _norms: list[float] = field(default_factory=list, repr=False)
    _examples: list[int] = field(default_factory=list, repr=False)
    _last_norm: float | None = field(default=None, repr=False)
    _last_examples: float | None = field(default=None, repr=False)

    DEFAULT_MAX_EXAMPLES = 2**31

    def __post_init__(self) -> None:
        if self.on_excess not in ON_EXCESS:
            raise ConfigError(
                f"on_excess must be one of {', '.join(ON_EXCESS)}, got {self.on_excess!r}"
            )
        for name in ("max_norm", "norm_factor", "examples_factor"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.max_examples is not None and self.max_examples < 0:
            raise ConfigError(f"max_examples must be >= 0, got {self.max_examples}")

    @classmethod
    def off(cls) -> UpdateBounds:
        """No relative caps: only the absolute example-count sanity cap (2^31)."""
        return cls(norm_factor=0.0, examples_factor=0.0)

    def start_round(self) -> None:
        """Forget the previous round's updates (keeping their medians as the reference)."""
        if len(self._norms) >= MIN_REFERENCE:
            self._last_norm = median(self._norms)
        if len(self._examples) >= MIN_REFERENCE:
            self._last_examples = median(self._examples)
        self._norms, self._examples = [], []

    def norm_cap(self, reference: Sequence[np.ndarray]) -> float:
        """The largest norm an update may have now."""
        if self.max_norm:
            return self.max_norm
        if not self.norm_factor:
            return math.inf
        known = self._norms if len(self._norms) >= MIN_REFERENCE else None
        base = median(known) if known else self._last_norm
        if base is None or base <= 0:
            base = max(_float_norm(reference), 1.0)
        return self.norm_factor * base

    def examples_cap(self) -> float:
        """The largest example count an update may declare now."""
        cap = float(self.max_examples or self.DEFAULT_MAX_EXAMPLES)
        if self.examples_factor:
            known = self._examples if len(self._examples) >= MIN_REFERENCE else None
            base = median(known) if known else self._last_examples
            if base is not None and base > 0:
                cap = min(cap, self.examples_factor * base)
        return cap

    def apply(
        self, arrays: Arrays, num_examples: int, reference: Sequence[np.ndarray]
    ) -> tuple[Arrays, str | None]:
        """``(arrays, None)`` when within bounds (clipped with ``on_excess = "clip"``), or
        ``(arrays, reason)`` for an update to reject. Accepted updates join the reference."""
        cap = self.examples_cap()
        if num_examples > cap:
            return arrays, (
                f"it declares {num_examples} examples, over the cap {cap:.6g} "
                "(strategy.max_examples / examples_factor × the round's median)"
            )
        norm = update_norm(arrays, reference)
        limit = self.norm_cap(reference)
        if norm > limit:
            if self.on_excess == "reject":
                return arrays, (
                    f"its update norm {norm:.6g} exceeds the cap {limit:.6g} "
                    "(strategy.max_norm / norm_factor × the reference norm)"
                )
            arrays = _scaled(arrays, reference, limit / norm)
            norm = limit
        self._norms.append(norm)
        self._examples.append(int(num_examples))
        return arrays, None

    def state(self) -> dict[str, float | None]:
        return {"last_norm": self._last_norm, "last_examples": self._last_examples}

    def load_state(self, state: dict[str, float | None]) -> None:
        self._last_norm = state.get("last_norm")
        self._last_examples = state.get("last_examples")


def _scaled(arrays: Arrays, reference: Sequence[np.ndarray], scale: float) -> Arrays:
    return [
        (r.astype(np.float64) + np.subtract(a, r, dtype=np.float64) * scale).astype(r.dtype)
        if r.dtype.kind == "f"
        else a
        for a, r in zip(arrays, reference)
    ]
