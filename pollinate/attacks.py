"""Byzantine clients for robustness testing, in simulation only (never in ``pollinate client``).

An :class:`Attack` names a kind, and which clients are attackers (a seeded
``round(fraction · N)`` of them, or explicit ids). Two places apply it:

- the *updates* of attackers are replaced in the server's process by
  :class:`AttackingExecutor`, which wraps the round loop's executor: it sees every client's
  honest result, so colluding attacks work, and it is framework-neutral (NumPy only). With
  Δ = w_k − w the attacker's honest update from the received global model w:

  - ``sign_flip``: sends w − s·Δ (``scale`` s);
  - ``scale``: sends w + s·Δ (model replacement, boosted);
  - ``gaussian``: sends w + ε, ε ~ N(0, σ²) per coordinate with σ = ‖Δ‖/√d (d coordinates),
    noise as large as the update it replaces;
  - ``little_is_enough`` (Baruch et al. 2019, "A Little Is Enough: Circumventing Defenses For
    Distributed Learning", arXiv 1902.06156): the attackers collude; with μ and σ the
    coordinate-wise mean and (population) standard deviation of the attackers' own honest
    updates this round, each sends w + μ − z_max·σ, where, for n clients in the round of
    whom f are attackers, s = ⌊n/2 + 1⌋ − f and z_max = Φ⁻¹((n − s)/n) (Φ the standard normal
    CDF): the largest shift that stays within the spread of the honest majority. (With
    attackers in the majority, s < 1, s is taken as 1.)

  Only floating-point arrays change (integer buffers are the attacker's own), and each
  attacker's train metrics get ``"attack": kind``.
- ``label_flip`` poisons the *data*: :func:`flip_labels` wraps a federated data set so that
  attackers train on labels y → C − 1 − y (C classes); their updates are then honest
  training on wrong labels. The executor only marks their metrics.

Attacks see clear updates: they do not combine with secure aggregation, whose results are
masked.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from pollinate.errors import ConfigError, DataError
from pollinate.strategy.check import squared_sum
from pollinate.types import Arrays, ClientId, Instructions, Outcome, TaskKind, TrainRes

ATTACK_KINDS = ("sign_flip", "scale", "gaussian", "label_flip", "little_is_enough")
ATTACK_KEYS = ("kind", "fraction", "clients", "scale", "seed")
METRIC = "attack"  # the train metric naming an attacker's attack


@dataclass(frozen=True)
class Attack:
    """What the attackers do, and who they are (see the module docstring for the maths)."""

    kind: str
    fraction: float = 0.2  # share of clients that attack: round(fraction · N), seeded
    clients: tuple[int, ...] = ()  # explicit attacker ids (overrides fraction)
    scale: float = 10.0  # s of sign_flip and scale
    seed: int = 0  # which clients, and the gaussian noise

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ConfigError(f"attack.kind is {self.kind!r}; use one of {', '.join(ATTACK_KINDS)}")
        if not 0 < self.fraction < 1:
            raise ConfigError(f"attack.fraction must be in (0, 1), got {self.fraction!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"attack.scale must be a finite number > 0, got {self.scale!r}")
        for cid in self.clients:
            if isinstance(cid, bool) or not isinstance(cid, numbers.Integral) or cid < 0:
                raise ConfigError(f"attack.clients must be client ids (integers >= 0), got {cid!r}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any], num_clients: int | None = None) -> Attack:
        """An ``[attack]`` table, checked; with ``num_clients``, explicit ids are range-checked."""
        unknown = sorted(set(section) - set(ATTACK_KEYS))
        if unknown:
            raise ConfigError(
                f"attack.{unknown[0]} is not a key of [attack]; use {', '.join(ATTACK_KEYS)}"
            )
        if "kind" not in section:
            raise ConfigError(f"[attack] needs kind = one of {', '.join(ATTACK_KINDS)}")
        kind = section["kind"]
        if not isinstance(kind, str):
            raise ConfigError(f"attack.kind must be a string, one of {', '.join(ATTACK_KINDS)}")
        clients = section.get("clients", ())
        if not isinstance(clients, (list, tuple)):
            raise ConfigError(f"attack.clients must be a list of client ids, got {clients!r}")
        attack = cls(
            kind=kind,
            fraction=_number(section, "fraction", cls.fraction),
            clients=tuple(clients),
            scale=_number(section, "scale", cls.scale),
            seed=_integer(section, "seed", cls.seed),
        )
        if num_clients is not None:
            attack.attackers(num_clients)
        return attack

    def attackers(self, num_clients: int) -> frozenset[int]:
        """The attackers among clients ``0..num_clients-1``: ``clients`` if given, else a
        seeded choice of ``round(fraction · num_clients)`` of them (round half to even)."""
        if num_clients < 1:
            raise ConfigError(f"an attack needs clients, got num_clients={num_clients}")
        if self.clients:
            outside = [c for c in self.clients if c >= num_clients]
            if outside:
                raise ConfigError(
                    f"attack.clients lists {outside[0]}, which is not a client id "
                    f"(0..{num_clients - 1})"
                )
            return frozenset(int(c) for c in self.clients)
        count = round(self.fraction * num_clients)
        rng = np.random.default_rng([self.seed, num_clients])
        return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def _number(section: Mapping[str, Any], key: str, default: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"attack.{key} must be a number, got {value!r}")
    return float(value)


def _integer(section: Mapping[str, Any], key: str, default: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"attack.{key} must be an integer, got {value!r}")
    return int(value)


# --- update attacks (pure NumPy) --------------------------------------------------------------


def _floats(arrays: Arrays) -> list[int]:
    return [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]


def _updates(received: Arrays, trained: Arrays, client_id: ClientId) -> list[np.ndarray]:
    """Δ = trained − received for every array, in float64 (integer arrays give zeros)."""
    if len(received) != len(trained) or any(
        np.shape(w) != np.shape(y) for w, y in zip(received, trained)
    ):
        raise ConfigError(
            f"client {client_id}'s result does not have the shapes of the arrays it was sent, "
            "so an attack cannot derive its update (attacks do not combine with secure "
            "aggregation)"
        )
    return [
        np.asarray(y, np.float64) - np.asarray(w, np.float64) for w, y in zip(received, trained)
    ]


def _sent(received: Arrays, trained: Arrays, shifts: Sequence[np.ndarray]) -> Arrays:
    """w + shift for float arrays (in the trained array's dtype); other arrays as trained."""
    out = list(trained)
    for i in _floats(trained):
        out[i] = (np.asarray(received[i], np.float64) + shifts[i]).astype(trained[i].dtype)
    return out


def poison(
    kind: str,
    received: Arrays,
    trained: Arrays,
    scale: float = 10.0,
    rng: np.random.Generator | None = None,
    client_id: ClientId = -1,
) -> Arrays:
    """The arrays one attacker sends instead of ``trained`` (``sign_flip``, ``scale``,
    ``gaussian``; ``label_flip`` sends them unchanged)."""
    if kind == "label_flip":
        return list(trained)
    delta = _updates(received, trained, client_id)
    if kind == "sign_flip":
        return _sent(received, trained, [-scale * d for d in delta])
    if kind == "scale":
        return _sent(received, trained, [scale * d for d in delta])
    if kind == "gaussian":
        rng = rng if rng is not None else np.random.default_rng()
        floats = _floats(trained)
        d = sum(delta[i].size for i in floats)
        norm = math.sqrt(sum(squared_sum(delta[i]) for i in floats))
        sigma = norm / math.sqrt(d) if d else 0.0
        return _sent(received, trained, [rng.normal(0.0, sigma, size=x.shape) for x in delta])
    raise ConfigError(f"attack kind {kind!r} does not transform one client's update alone")


def lie_z(num_clients: int, num_attackers: int) -> float:
    """z_max of "A Little Is Enough": s = ⌊n/2 + 1⌋ − f (at least 1), z = Φ⁻¹((n − s)/n)."""
    n, f = num_clients, num_attackers
    s = max(1, math.floor(n / 2 + 1) - f)
    p = (n - s) / n
    return NormalDist().inv_cdf(p) if 0 < p < 1 else 0.0


def little_is_enough(received: Arrays, trained: Sequence[Arrays], num_clients: int) -> Arrays:
    """The arrays every colluding attacker sends: w + μ − z_max·σ over their honest updates.

    ``trained`` holds the attackers' honest results, ``num_clients`` the round's clients.
    """
    if not trained:
        raise ValueError("little_is_enough needs at least one attacker's update")
    deltas = [_updates(received, y, -1) for y in trained]
    return _sent(received, trained[0], _lie_shifts(deltas, num_clients))


def _lie_shifts(deltas: Sequence[list[np.ndarray]], num_clients: int) -> list[np.ndarray]:
    """μ − z_max·σ per array, over the attackers' updates ``deltas``."""
    z = lie_z(num_clients, len(deltas))
    shifts = []
    for i in range(len(deltas[0])):
        stack = np.stack([d[i] for d in deltas])
        shifts.append(stack.mean(axis=0) - z * stack.std(axis=0))
    return shifts


# --- the executor wrapper ---------------------------------------------------------------------


class AttackingExecutor:
    """Wraps an ``Executor``: the attackers' train results are replaced as they pass.

    Honest outcomes (and every evaluate or query outcome) pass through as they come.
    Per-client kinds replace each attacker's result as it arrives; ``little_is_enough`` holds
    the attackers' results until every attacker in the round has reported (or failed), then
    hands them on, replaced. Failed attackers' outcomes pass through untouched.
    """

    def __init__(self, executor: Any, attack: Attack, attackers: frozenset[int]) -> None:
        self.executor = executor
        self.attack = attack
        self.attackers = frozenset(attackers)

    def submit(
        self,
        round_number: int,
        kind: TaskKind,
        plan: Sequence[tuple[ClientId, Instructions]],
        timeout_s: float,
    ) -> Iterator[Outcome]:
        outcomes = self.executor.submit(round_number, kind, plan, timeout_s)
        targeted = {cid: ins.arrays for cid, ins in plan if cid in self.attackers}
        if kind != "train" or not targeted:
            return outcomes  # type: ignore[no-any-return]
        if self.attack.kind == "little_is_enough":
            return self._colluding(outcomes, targeted, len(plan))
        return self._each(round_number, outcomes, targeted)

    def _each(
        self, round_number: int, outcomes: Iterator[Outcome], targeted: dict[ClientId, Arrays]
    ) -> Iterator[Outcome]:
        a = self.attack
        for outcome in outcomes:
            cid = outcome.client_id
            res = outcome.result
            if cid in targeted and outcome.ok and isinstance(res, TrainRes):
                rng = np.random.default_rng([a.seed, round_number, cid])
                sent = poison(a.kind, targeted[cid], res.arrays, a.scale, rng, cid)
                outcome = self._replaced(outcome, res, sent)
            yield outcome

    def _colluding(
        self, outcomes: Iterator[Outcome], targeted: dict[ClientId, Arrays], n: int
    ) -> Iterator[Outcome]:
        waiting = set(targeted)
        held: list[Outcome] = []
        for outcome in outcomes:
            cid = outcome.client_id
            if cid not in waiting:
                yield outcome
                continue
            waiting.discard(cid)
            if outcome.ok and isinstance(outcome.result, TrainRes):
                held.append(outcome)
            else:
                yield outcome
            if not waiting:
                yield from self._collude(held, targeted, n)
                held = []
        yield from self._collude(held, targeted, n)  # only if the stream ended early

    def _collude(
        self, held: list[Outcome], targeted: dict[ClientId, Arrays], n: int
    ) -> Iterator[Outcome]:
        if not held:
            return
        results = [o.result for o in held]
        assert all(isinstance(r, TrainRes) for r in results)
        trained = [r.arrays for r in results]  # type: ignore[union-attr]
        # the attackers were sent the same global model; each shifts the one it received
        deltas = [_updates(targeted[o.client_id], y, o.client_id) for o, y in zip(held, trained)]
        shifts = _lie_shifts(deltas, n)
        for outcome, res, y in zip(held, results, trained):
            assert isinstance(res, TrainRes)
            yield self._replaced(outcome, res, _sent(targeted[outcome.client_id], y, shifts))

    def _replaced(self, outcome: Outcome, res: TrainRes, arrays: Arrays) -> Outcome:
        metrics = {**res.metrics, METRIC: self.attack.kind}
        return dataclasses.replace(
            outcome, result=dataclasses.replace(res, arrays=arrays, metrics=metrics)
        )


# --- data poisoning ---------------------------------------------------------------------------


class LabelFlipped:
    """A federated data set whose attackers' training labels go through ``permutation``.

    ``client_train(cid)`` of an attacker returns its examples with labels
    ``permutation[y]``; everything else (other clients, every ``client_test``, the server's
    test set, ``label_counts``, …) is the wrapped data set's, unchanged. It holds a reference to
    the data set, not a copy, and pickles as cheaply as the data set itself.
    """

    def __init__(self, data: Any, attackers: frozenset[int], permutation: np.ndarray) -> None:
        self.data = data
        self.attackers = frozenset(attackers)
        self.permutation = permutation

    def client_train(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.data.client_train(cid)
        if cid not in self.attackers:
            return x, y
        labels = np.asarray(y)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.permutation)):
            raise DataError(
                f"client {cid} has labels outside 0..{len(self.permutation) - 1}; "
                "give flip_labels the data set's number of classes"
            )
        return x, self.permutation[labels].astype(labels.dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("data", "attackers", "permutation"):
            raise AttributeError(name)  # not yet set (unpickling) or a dunder
        return getattr(self.data, name)


def flip_labels(
    data: Any,
    attackers: frozenset[int] | Sequence[int],
    num_classes: int | None = None,
    permutation: Sequence[int] | None = None,
) -> LabelFlipped:
    """``data`` (a ``FederatedDataset`` or anything with ``client_train``) with the
    attackers' training labels flipped: y → C − 1 − y for C = ``num_classes`` (default
    ``data.num_classes``), or y → ``permutation[y]``."""
    classes = num_classes if num_classes is not None else getattr(data, "num_classes", None)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise ConfigError(f"label flipping needs num_classes >= 2, got {classes!r}")
    if permutation is None:
        table = np.arange(classes - 1, -1, -1, dtype=np.int64)
    else:
        table = np.asarray(permutation, dtype=np.int64)
        if sorted(table.tolist()) != list(range(classes)):
            raise ConfigError(
                f"the label permutation must list each of 0..{classes - 1} once, "
                f"got {list(permutation)}"
            )
    return LabelFlipped(data, frozenset(int(c) for c in attackers), table)
