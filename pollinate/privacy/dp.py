"""Central differential privacy: clipped updates, a noised sum, adaptive clipping.

The pieces, smallest first:

- ``update_norm`` / ``clip_update``: the L2 norm of an update ``Δ = w_k − w`` over the model's
  floating-point arrays, and ``Δ`` scaled down to norm ``C`` (``clip_update`` re-checks the
  norm after the cast back to the model's dtype, so a float32 model never ends up over ``C``).
- ``ClippedSum``: a running O(model) sum of clipped updates, the part a secure aggregation
  protocol replaces with a masked sum.
- ``AdaptiveClipping``: C follows a privately estimated quantile of the update norms.
- ``CentralDP``: the strategy wrapper (DP-FedAvg), and ``ClientClipping``: the client wrapper
  that clips before the update leaves the client.

Model arrays that are not floating point (integer counters such as BatchNorm's
``num_batches_tracked``, boolean masks) are neither clipped nor noised: they are excluded
from the update and keep the global model's value, since averaging them in the clear would
leak (a batch count tells the data size). Float buffers (BatchNorm's running statistics) are
part of the update and are clipped and noised with the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pollinate.client import Client, ClientContext, ClientFn, is_client
from pollinate.errors import ConfigError, RoundFailedError
from pollinate.privacy.accounting import (
    ACCOUNTANTS,
    SAMPLINGS,
    PrivacyAccountant,
    PrivacyBudgetExceeded,
    PrivacyError,
)
from pollinate.strategy.base import (
    Failure,
    SecureSum,
    SecureTerms,
    Strategy,
    StrategyWrapper,
    TrainSummary,
)
from pollinate.strategy.check import check_outcome, squared_sum, update_norm
from pollinate.strategy.selection import Poisson, Uniform
from pollinate.types import (
    Arrays,
    ClientId,
    Config,
    EvaluateRes,
    Outcome,
    TrainIns,
    TrainRes,
)

log = logging.getLogger("pollinate")

#: an update whose norm exceeds C by more than this relative margin was not clipped to C
NORM_TOLERANCE = 1e-6
#: the train-config key that tells a client wrapped in ``ClientClipping`` its clip
CLIP_KEY = "dp_clip"
#: the train-metrics key with a client's clipping bit 1[‖Δ‖ <= C] (for adaptive clipping)
BELOW_CLIP_KEY = "dp_below_clip"
CLIP_ON = ("server", "client")


def is_private(array: np.ndarray) -> bool:
    """Whether ``array`` is part of the update that is clipped and noised (floating point)."""
    return bool(array.dtype.kind == "f")


def clip_update(
    arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray], clip: float
) -> tuple[Arrays, float]:
    """``reference + Δ·min(1, C/‖Δ‖)`` in the model's dtypes, and ‖Δ‖ before clipping.

    The result's ``update_norm`` is at most ``clip``, measured the way the server measures
    it (after the cast to float32, say); if rounding keeps it above ``clip`` after a few
    corrections, the update becomes zero. Non-float arrays are passed through.
    """
    norm = update_norm(arrays, reference)
    if norm <= clip:
        return list(arrays), norm
    target = clip
    for _ in range(8):
        scale = target / norm
        out = [
            (r.astype(np.float64) + np.subtract(a, r, dtype=np.float64) * scale).astype(r.dtype)
            if is_private(r)
            else a
            for a, r in zip(arrays, reference)
        ]
        got = update_norm(out, reference)
        if got <= clip:
            return out, norm
        target *= clip / got * (1 - 1e-6)
    log.warning("could not clip an update to %g in its dtype; sending a zero update", clip)
    return [r.copy() if is_private(r) else a for a, r in zip(arrays, reference)], norm


class ClippedSum:
    """Running sum of clipped updates ``Σ_k Δ_k·min(1, C/‖Δ_k‖)`` in float64, O(model) memory.

    ``add(arrays)`` clips on arrival (server-side clipping); ``add(arrays, verify=True)``
    accepts only updates already within ``C`` (client-side clipping) and returns False for
    the others. Non-float arrays are not summed.
    """

    def __init__(self, reference: Sequence[np.ndarray], clip: float) -> None:
        self.reference = list(reference)
        self.clip = clip
        self.sums = [np.zeros(r.shape, np.float64) if is_private(r) else None for r in reference]
        self._scratch = [
            np.empty(r.shape, np.float64) if is_private(r) else None for r in reference
        ]
        self.count = 0

    def add(self, arrays: Sequence[np.ndarray], verify: bool = False) -> tuple[bool, float]:
        """Fold one update in; returns (accepted, its norm before clipping)."""
        total = 0.0
        for a, r, d in zip(arrays, self.reference, self._scratch):
            if d is not None:
                np.subtract(a, r, out=d, dtype=np.float64)
                total += squared_sum(d)
        norm = math.sqrt(total)
        if verify and norm > self.clip * (1 + NORM_TOLERANCE):
            return False, norm
        scale = 1.0 if norm <= self.clip else self.clip / norm
        for s, d in zip(self.sums, self._scratch):
            if s is not None and d is not None:
                if scale != 1.0:
                    np.multiply(d, scale, out=d)
                np.add(s, d, out=s)
        self.count += 1
        return True, norm

    def noised_sum(self, stddev: float, rng: np.random.Generator) -> np.ndarray:
        """``Σ + N(0, stddev²)`` over the float arrays, as one float64 vector in model order
        (the noise drawn array by array, in order)."""
        parts = []
        for s in self.sums:
            if s is not None:
                parts.append(
                    (s + rng.normal(0.0, stddev, size=s.shape) if stddev > 0 else s).ravel()
                )
        return np.concatenate(parts) if parts else np.zeros(0)

    def load(self, flat: np.ndarray) -> None:
        """Set the sum from one float64 vector over the float arrays (secure aggregation)."""
        offset = 0
        for s in self.sums:
            if s is not None:
                s[...] = flat[offset : offset + s.size].reshape(s.shape)
                offset += s.size

    def noised_model(self, stddev: float, denominator: float, rng: np.random.Generator) -> Arrays:
        """``w + (Σ + N(0, stddev²)) / denominator`` in the model's dtypes (non-floats: ``w``)."""
        out: Arrays = []
        for r, s in zip(self.reference, self.sums):
            if s is None:
                out.append(r.copy())
                continue
            total = s + rng.normal(0.0, stddev, size=s.shape) if stddev > 0 else s.copy()
            total /= denominator
            total += r
            out.append(total.astype(r.dtype, copy=False))
        return out


@dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive clipping (Andrew et al. 2021, arXiv:1905.03871): C tracks a norm quantile.

    Each round every client reports ``b_k = 1[‖Δ_k‖ <= C]``. The server releases the noised
    fraction ``b̄ = (Σ_k (b_k − ½) + N(0, σ_b²)) / D + ½`` (centred bits: one client moves the
    sum by at most ½; ``D`` the expected clients per round), clipped to [0, 1], and updates
    ``C ← C·exp(−η (b̄ − γ))``: C shrinks while more than the target fraction γ of updates fit.

    Privacy: the count and the update sum are two Gaussian mechanisms on the same clients;
    together they cost as much as one with ``z^-2 = z_Δ^-2 + (2σ_b)^-2`` (the paper's
    Theorem 1). The configured noise multiplier ``z`` is what is accounted; the update sum
    gets the larger ``z_Δ = (z^-2 − (2σ_b)^-2)^-1/2``, which needs ``2σ_b > z``.
    """

    target_quantile: float = 0.5  # γ
    learning_rate: float = 0.2  # η
    initial_clip: float = 0.1  # C₀
    count_stddev: float | None = None  # σ_b; None: expected clients per round / 20

    def __post_init__(self) -> None:
        if not 0.0 < self.target_quantile < 1.0:
            raise ConfigError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.learning_rate > 0:
            raise ConfigError(f"the clip learning rate must be > 0, got {self.learning_rate}")
        if not self.initial_clip > 0:
            raise ConfigError(f"the initial clip must be > 0, got {self.initial_clip}")
        if self.count_stddev is not None and not self.count_stddev > 0:
            raise ConfigError(f"count_stddev must be > 0, got {self.count_stddev}")

    def stddev(self, expected_clients: float) -> float:
        """σ_b: the noise on the count of clients whose update fits within C."""
        return self.count_stddev if self.count_stddev is not None else expected_clients / 20

    def update_noise_multiplier(self, noise_multiplier: float, expected_clients: float) -> float:
        """z_Δ: the update sum's noise multiplier that makes the pair cost ``noise_multiplier``."""
        if noise_multiplier == 0:
            return 0.0
        sigma_b = self.stddev(expected_clients)
        if noise_multiplier >= 2 * sigma_b:
            raise ConfigError(
                f"adaptive clipping with noise_multiplier {noise_multiplier:g} needs count "
                f"noise σ_b > {noise_multiplier / 2:g}, but σ_b = {sigma_b:g} (expected clients "
                f"per round {expected_clients:g} / 20): sample more clients per round, lower "
                "the noise multiplier, set count_stddev, or use a fixed clip"
            )
        return float((noise_multiplier**-2 - (2 * sigma_b) ** -2) ** -0.5)

    def next_clip(
        self, clip: float, below: int, expected_clients: float, rng: np.random.Generator
    ) -> tuple[float, float]:
        """(the next C, the noised fraction b̄ it was computed from)."""
        centred = below - expected_clients / 2 + rng.normal(0.0, self.stddev(expected_clients))
        fraction = float(np.clip(centred / expected_clients + 0.5, 0.0, 1.0))
        return clip * math.exp(-self.learning_rate * (fraction - self.target_quantile)), fraction


@dataclass
class RoundSums:
    """One round's clipped updates, reduced: what the noise and the bookkeeping need."""

    total: ClippedSum  # Σ clip(Δ_k) and the number of updates in it
    below: int = 0  # Σ 1[‖Δ_k‖ <= C], for adaptive clipping
    accepted: list[Outcome] = field(default_factory=list)  # their metrics, without arrays
    rejected: list[Failure] = field(default_factory=list)  # malformed, or not clipped as required


class CentralDP(StrategyWrapper):
    """DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, arXiv:1710.06963) around any
    sum-based strategy: clip and noise transforms over its weighted sum.

    Each round, with global model ``w``, clip C, noise multiplier z:

    1. clients are sampled with secret randomness: Poisson (each independently with
       probability ``q = D/N``, ``pollinate.strategy.selection.Poisson``) or ``m = D`` of
       the ``N`` clients without replacement;
    2. each update ``Δ_k = w_k − w`` passes the one update check, then is clipped to L2 norm
       C, on the server (``clip_on="server"``) or on the client (``"client"``: the client is
       told C in its config under ``dp_clip``, clips with ``ClientClipping``, and the server
       rejects any update with ``‖Δ_k‖ > C·(1 + 1e-6)``);
    3. the sum ``Σ_k clip(Δ_k) + N(0, (z·C)² I)`` goes to the wrapped strategy as a sum
       (``aggregate_sum``) with the fixed denominator ``D`` (the expected clients per round,
       not the number that answered), uniform weights, so one client moves it by at most C
       whoever else takes part or drops out; the wrapped strategy's server optimizer then
       applies ``Δ = (Σ + noise) / D`` (FedAvg: ``w' = w + Δ``; FedAdam: its Adam step on Δ —
       post-processing, which costs no privacy).

    The wrapped strategy must be sum-based (a weighted mean): a median or Krum needs the
    individual updates and is refused when the run is built, as is an algorithm whose
    weights depend on what each client reports (FedNova, q-FedAvg, SCAFFOLD).

    ε after each round comes from ``PrivacyAccountant`` (one ``dp_accounting`` event per
    round, see ``pollinate.privacy.accounting``) and is recorded in the round's ``privacy``
    entry; with ``max_epsilon`` a round that would exceed it is refused before it starts
    (``PrivacyBudgetExceeded``). ``clip=AdaptiveClipping(...)`` lets C follow a private
    quantile of update norms (Andrew et al. 2021), its privacy cost included in ε.

    What is protected: the sequence of global models, against anyone who sees them. The
    server sees individual updates (server-side clipping) or clipped ones (client-side
    clipping): without secure aggregation it is trusted. Client training metrics and
    federated evaluation results are not noised. With client-side clipping the server needs
    only the sum of clipped updates, the number of updates and the sum of clipping bits:
    exactly what secure aggregation delivers (``secure_terms``/``aggregate_sum``).

    ``seed`` makes sampling and noise reproducible, and so removable by anyone who knows
    the seed: use it for experiments only. The default (None) draws from the OS. NumPy's
    floating-point Gaussian sampler is not hardened against floating-point attacks
    (Mironov 2012).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        noise_multiplier: float,
        clip: float | AdaptiveClipping,
        num_clients: int,
        clients_per_round: float,
        clip_on: str = "server",
        delta: float = 1e-5,
        sampling: str = "poisson",
        accountant: str = "pld",
        max_epsilon: float | None = None,
        min_available_clients: int = 1,
        seed: int | None = None,
    ) -> None:
        if clip_on not in CLIP_ON:
            raise ConfigError(f"clip_on must be one of {', '.join(CLIP_ON)}; got {clip_on!r}")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}"
            )
        if num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
        if not 0 < clients_per_round <= num_clients:
            raise ConfigError(
                f"clients_per_round must be in (0, num_clients={num_clients}], "
                f"got {clients_per_round}"
            )
        if sampling == "fixed" and clients_per_round != int(clients_per_round):
            raise ConfigError(
                f"fixed-size sampling needs a whole clients_per_round, got {clients_per_round}"
            )
        if max_epsilon is not None and not max_epsilon > 0:
            raise ConfigError(f"max_epsilon must be > 0 (or None: no limit), got {max_epsilon}")
        require = getattr(strategy, "require_sum_based", None)
        if require is not None:
            require("central DP")
        elif not strategy.sum_based:
            raise ConfigError(
                f"central DP noises the sum of the updates, but {type(strategy).__name__} "
                "does not aggregate a sum; wrap a sum-based strategy (FedAvg, FedAdam …)"
            )
        if isinstance(clip, AdaptiveClipping):
            self.adaptive: AdaptiveClipping | None = clip
            self.clip = clip.initial_clip
        else:
            if not (clip > 0 and math.isfinite(clip)):
                raise ConfigError(f"clip must be > 0, got {clip}")
            self.adaptive, self.clip = None, float(clip)
        super().__init__(strategy)
        self.noise_multiplier = float(noise_multiplier)
        self.num_clients = int(num_clients)
        self.clients_per_round = float(clients_per_round)
        self.clip_on = clip_on
        self.sampling = sampling
        self.max_epsilon = max_epsilon
        self.min_available_clients = min_available_clients
        self.seed = seed
        self.accountant = PrivacyAccountant(
            noise_multiplier,
            delta=delta,
            sampling_probability=(
                self.clients_per_round / self.num_clients if sampling == "poisson" else None
            ),
            sample=(int(clients_per_round), self.num_clients) if sampling == "fixed" else None,
            accountant=accountant,
        )
        self.update_noise_multiplier = (
            self.adaptive.update_noise_multiplier(self.noise_multiplier, self.clients_per_round)
            if self.adaptive
            else self.noise_multiplier
        )
        self._entropy = np.random.default_rng()  # secret randomness when no seed is given

    def _rng(self, round_number: int, purpose: int) -> np.random.Generator:
        if self.seed is None:
            return self._entropy
        return np.random.default_rng([self.seed, round_number, purpose])

    # 1. sampling -----------------------------------------------------------------------

    def check_budget(self, round_number: int) -> None:
        """Raise ``PrivacyBudgetExceeded`` if round ``round_number`` would exceed the budget."""
        if self.max_epsilon is None:
            return
        spent = self.accountant.epsilon_after(round_number - 1)
        after = self.accountant.epsilon_after(round_number)
        if after > self.max_epsilon:
            raise PrivacyBudgetExceeded(
                f"privacy budget: round {round_number} would raise ε from {spent:.4g} to "
                f"{after:.4g} (δ = {self.accountant.delta:g}), over max_epsilon = "
                f"{self.max_epsilon:g}; training stopped after round {round_number - 1}",
                round_number,
                spent,
                after,
            )

    def _sample(self, round_number: int, clients: Sequence[ClientId]) -> list[ClientId]:
        available = len(clients)
        if available < self.min_available_clients:
            raise RoundFailedError(
                f"round {round_number}: {available} clients available, fewer than "
                f"min_available_clients={self.min_available_clients}"
            )
        rng = self._rng(round_number, 0)
        if self.sampling == "poisson":
            return Poisson(self.accountant.rate).select(round_number, clients, 0.0, 0, rng)
        if available != self.num_clients:
            raise PrivacyError(
                f"round {round_number}: fixed-size sampling is accounted as "
                f"{int(self.clients_per_round)} of {self.num_clients} clients, but "
                f"{available} are available: the guarantee would not hold; make all "
                "clients available or use Poisson sampling"
            )
        k = int(self.clients_per_round)
        return Uniform().select(round_number, clients, k / available, k, rng)

    def configure_train(
        self, round_number: int, arrays: Arrays, clients: Sequence[ClientId]
    ) -> list[tuple[ClientId, TrainIns]]:
        self.check_budget(round_number)
        picked = self._sample(round_number, clients)
        plan = self.strategy.configure_train(round_number, arrays, picked)
        if sorted(cid for cid, _ in plan) != picked:
            raise ConfigError(
                "CentralDP samples the clients itself: the wrapped strategy must train every "
                f"client it is offered (FedAvg: fraction_train=1.0); offered {len(picked)}, "
                f"it planned {len(plan)}"
            )
        if self.clip_on == "server":
            return plan
        told: dict[int, TrainIns] = {}  # keep shared instructions shared (one broadcast)
        out = []
        for cid, ins in plan:
            if id(ins) not in told:
                told[id(ins)] = TrainIns(ins.arrays, {**ins.config, CLIP_KEY: self.clip})
            out.append((cid, told[id(ins)]))
        return out

    # 2.-3. clip, sum, noise --------------------------------------------------------------

    def aggregate_train(
        self, round_number: int, arrays: Arrays, outcomes: Iterable[Outcome]
    ) -> TrainSummary:
        return self.release(round_number, arrays, self.collect(arrays, outcomes))

    def collect(self, arrays: Arrays, outcomes: Iterable[Outcome]) -> RoundSums:
        """Check, clip (or verify) and sum the round's updates as they arrive.

        This is the step secure aggregation replaces: it delivers the same ``RoundSums``
        (the sum of clipped updates, their number, the sum of clipping bits) without the
        server seeing any single update (``aggregate_sum``).
        """
        clip, client_side = self.clip, self.clip_on == "client"
        sums = RoundSums(ClippedSum(arrays, clip))
        checked = getattr(self.strategy, "checked", None)  # decodes compressed updates too
        for outcome in outcomes:
            if checked is not None:
                outcome, failure = checked(outcome, arrays)
            else:
                failure = check_outcome(outcome, arrays)
            if failure is not None:
                log.warning("client %s %s: %s", failure.client_id, failure.kind, failure.reason)
                sums.rejected.append(failure)
                continue
            res = outcome.result
            assert isinstance(res, TrainRes)
            bit = res.metrics.get(BELOW_CLIP_KEY)
            if client_side and self.adaptive and bit not in (0, 1):
                sums.rejected.append(self._reject(outcome, "it did not report its clipping bit"))
                continue
            ok, norm = sums.total.add(res.arrays, verify=client_side)
            if not ok:
                why = f"its update norm {norm:.6g} exceeds the clip {clip:.6g}"
                sums.rejected.append(self._reject(outcome, why))
                continue
            sums.below += int(bit == 1) if client_side else int(norm <= clip)
            sums.accepted.append(_without_arrays(outcome))
        return sums

    def release(
        self, round_number: int, arrays: Arrays, sums: RoundSums, noise_in_sum: float = 0.0
    ) -> TrainSummary:
        """Noise the sum, hand it to the wrapped strategy, account the round.

        ``noise_in_sum``: the standard deviation of Gaussian noise the sum already holds
        (distributed DP: the clients added it); only the rest of ``z·C`` is added here.
        """
        clip = sums.total.clip
        stddev = self.update_noise_multiplier * clip
        noised = sums.total.noised_sum(
            math.sqrt(max(0.0, stddev**2 - noise_in_sum**2)), self._rng(round_number, 1)
        )
        summed = SecureSum(noised, {}, sums.accepted, self.clients_per_round)
        summary = self.strategy.aggregate_sum(round_number, arrays, summed)

        privacy: dict[str, Any] = {
            "epsilon": self.accountant.epsilon_after(round_number),
            **self.accountant.describe(),
            "clip": clip,
            "clip_on": self.clip_on,
            "mode": "central",
        }
        if self.adaptive is not None:
            self.clip, fraction = self.adaptive.next_clip(
                clip, sums.below, self.clients_per_round, self._rng(round_number, 2)
            )
            privacy.update(
                update_noise_multiplier=self.update_noise_multiplier,
                below_clip=fraction,
                next_clip=self.clip,
            )
        return dataclasses.replace(
            summary, failures=[*summary.failures, *sums.rejected], privacy=privacy
        )

    # secure aggregation: the clipped sum arrives masked ------------------------------------

    def secure_terms(self, round_number: int, num_clients: int, weight_cap: int) -> SecureTerms:
        if self.clip_on != "client":
            raise ConfigError(
                "secure aggregation with central DP needs clip_on = 'client': the server "
                "never sees an update, so it cannot clip one"
            )
        sigma = self.update_noise_multiplier * self.clip
        return SecureTerms(
            weight_cap=0,  # uniform: each client moves the sum by at most C
            noise_stddev=sigma / math.sqrt(num_clients) if num_clients else 0.0,
            summed_metrics=(BELOW_CLIP_KEY,) if self.adaptive is not None else (),
        )

    def aggregate_sum(self, round_number: int, arrays: Arrays, summed: SecureSum) -> TrainSummary:
        sums = RoundSums(ClippedSum(arrays, self.clip))
        sums.total.load(summed.total)
        sums.total.count = len(summed.survivors)
        sums.below = int(round(summed.summed.get(BELOW_CLIP_KEY, 0.0)))
        sums.accepted = [_without_arrays(o) for o in summed.survivors]
        sums.rejected = list(summed.failures)
        return self.release(round_number, arrays, sums, noise_in_sum=summed.noise_stddev)

    def restore(self, records: Sequence[dict[str, Any]]) -> None:
        """On resume, adaptive clipping goes on from the clip the last round chose."""
        super().restore(records)
        if self.adaptive is None or not records:
            return
        privacy = records[-1].get("privacy", {})
        clip = privacy.get("next_clip")
        if not isinstance(clip, (int, float)) or not clip > 0:
            raise PrivacyError(
                f"cannot resume adaptive clipping: round {records[-1].get('round')}'s record "
                "has no next_clip; start the run afresh"
            )
        self.clip = float(clip)

    def _reject(self, outcome: Outcome, why: str) -> Failure:
        hint = " (wrap the client in ClientClipping)" if self.clip_on == "client" else ""
        log.warning("client %s: update rejected: %s%s", outcome.client_id, why, hint)
        return Failure(outcome.client_id, "train", f"update rejected: {why}{hint}", "rejected")

    # 4. evaluation: the wrapped strategy's -----------------------------------------------


def _without_arrays(outcome: Outcome) -> Outcome:
    """The outcome with its arrays dropped and the ``dp_`` metrics removed (bookkeeping)."""
    res = outcome.result
    assert isinstance(res, TrainRes)
    metrics = {k: v for k, v in res.metrics.items() if not k.startswith("dp_")}
    return dataclasses.replace(outcome, result=TrainRes([], res.num_examples, metrics))


class ClientClipping:
    """Client-side clipping for ``CentralDP(clip_on="client")``: the update leaves clipped.

    Wraps a client (or a ``client_fn``, giving a ``client_fn``): after local training,
    ``Δ = w_k − w`` is clipped to the ``dp_clip`` the server sent, and the clipping bit
    ``1[‖Δ‖ <= C]`` is reported as the ``dp_below_clip`` metric (for adaptive clipping).
    A train config without ``dp_clip`` is an error: this client only trains for a DP server.
    """

    def __init__(self, inner: Client | ClientFn) -> None:
        self.inner = inner

    def __call__(self, context: ClientContext) -> ClientClipping:
        if is_client(self.inner) or not callable(self.inner):
            raise TypeError("this ClientClipping wraps a client, not a client_fn")
        return ClientClipping(self.inner(context))

    def _client(self) -> Client:
        if not is_client(self.inner) or not isinstance(self.inner, Client):
            raise TypeError("this ClientClipping wraps a client_fn: call it with a context")
        return self.inner

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        clip = config.get(CLIP_KEY)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ValueError(
                f"the train config has no valid {CLIP_KEY!r} (got {clip!r}): the server is not "
                "running central DP with clip_on = 'client'"
            )
        res = self._client().train(arrays, config)
        clipped, norm = clip_update(res.arrays, arrays, float(clip))
        metrics = {**res.metrics, BELOW_CLIP_KEY: int(norm <= clip)}
        return TrainRes(clipped, res.num_examples, metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return self._client().evaluate(arrays, config)
