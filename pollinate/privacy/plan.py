"""A run config's privacy, planned: the DP wrappers around the strategy and the clients, the
noise multiplier solved from a target ε, and secure aggregation for the round loop.

``pollinate.experiment.build_run`` calls these; nothing here imports an ML framework.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from pollinate.client import ClientFn
from pollinate.config import RunConfig
from pollinate.strategy.base import Strategy
from pollinate.strategy.selection import sample_size

if TYPE_CHECKING:
    from pollinate.privacy.secure import SecureAggregation

log = logging.getLogger("pollinate")


def clients_per_round(cfg: RunConfig) -> float:
    """Central DP's expected clients per round: q·N (Poisson) or FedAvg's sample size m."""
    n, s = cfg.data.num_clients, cfg.strategy
    if cfg.privacy.sampling == "poisson":
        return s.fraction_train * n
    return sample_size(s.fraction_train, n, s.min_train_clients)


def noise_multiplier(cfg: RunConfig) -> float:
    """[privacy]'s noise multiplier, solved from ``target_epsilon`` over the run when set."""
    from pollinate.privacy import find_noise_multiplier, local_noise_multiplier

    p = cfg.privacy
    if p.target_epsilon <= 0:
        return p.noise_multiplier
    if p.mode == "local":  # a client may take part in every round
        return local_noise_multiplier(p.target_epsilon, p.delta, releases=cfg.run.rounds)
    n, m = cfg.data.num_clients, clients_per_round(cfg)
    z = find_noise_multiplier(
        p.target_epsilon,
        p.delta,
        cfg.run.rounds,
        sampling_probability=m / n if p.sampling == "poisson" else None,
        sample=(int(m), n) if p.sampling == "fixed" else None,
        accountant=p.accountant,
    )
    log.info(
        "privacy: noise multiplier %.4g for ε = %g over %d rounds",
        z,
        p.target_epsilon,
        cfg.run.rounds,
    )
    return z


def wrap_strategy(cfg: RunConfig, strategy: Strategy) -> Strategy:
    """``strategy`` wrapped per [privacy]: ``CentralDP``, ``LocalDPLedger``, or unchanged."""
    from pollinate.privacy import AdaptiveClipping, CentralDP, LocalDPLedger, local_epsilon

    p = cfg.privacy
    if p.mode == "none":
        return strategy
    z = noise_multiplier(cfg)
    max_epsilon = p.max_epsilon or None
    seed = cfg.run.seed if cfg.run.deterministic else None  # reproducible noise is not secret
    if p.mode == "local":
        if max_epsilon is not None and local_epsilon(z, p.delta, cfg.run.rounds) > max_epsilon:
            allowed = max(
                r for r in range(cfg.run.rounds + 1) if local_epsilon(z, p.delta, r) <= max_epsilon
            )
            log.warning(
                "privacy: max_epsilon = %g lets a client take part in %d of the %d rounds",
                max_epsilon,
                allowed,
                cfg.run.rounds,
            )
        return LocalDPLedger(
            strategy, noise_multiplier=z, clip=p.clip, delta=p.delta, max_epsilon=max_epsilon
        )
    expected = clients_per_round(cfg)
    clip: float | AdaptiveClipping = (
        AdaptiveClipping(p.target_quantile, p.clip_lr, initial_clip=p.clip)
        if p.adaptive
        else p.clip
    )
    wrapped = CentralDP(
        strategy,
        noise_multiplier=z,
        clip=clip,
        num_clients=cfg.data.num_clients,
        clients_per_round=expected,
        clip_on=p.clip_on,
        delta=p.delta,
        sampling=p.sampling,
        accountant=p.accountant,
        max_epsilon=max_epsilon,
        min_available_clients=cfg.strategy.min_available_clients,
        seed=seed,
    )
    if max_epsilon is not None:
        allowed = wrapped.accountant.rounds_within(max_epsilon, cfg.run.rounds)
        if allowed < cfg.run.rounds:
            log.warning(
                "privacy: max_epsilon = %g allows %d of the %d rounds",
                max_epsilon,
                allowed,
                cfg.run.rounds,
            )
    _warn_small_rounds(cfg, expected)
    return wrapped


def _warn_small_rounds(cfg: RunConfig, expected: float) -> None:
    """Warn when Poisson sampling often draws fewer clients than a round needs."""
    n, k = cfg.data.num_clients, cfg.strategy.min_train_clients
    if cfg.privacy.sampling != "poisson" or expected >= n or k <= 0:
        return
    q = expected / n
    p_short = sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(min(k, n + 1)))
    if p_short > 0.01:
        log.warning(
            "privacy: Poisson sampling (q = %.3g of %d clients) draws fewer than "
            "min_train_clients = %d clients in %.1f%% of rounds, and such a round fails; "
            "lower strategy.min_train_clients or use privacy.sampling = 'fixed'",
            q,
            n,
            k,
            100 * p_short,
        )


def wrap_client_fn(cfg: RunConfig, client_fn: ClientFn) -> ClientFn:
    """``client_fn`` wrapped per [privacy] (clipping or local DP on the client), then per
    [compression] (the update leaves encoded), and, outermost, per [secure_aggregation] (the
    update leaves the client masked)."""
    p = cfg.privacy
    if p.mode == "central" and p.clip_on == "client":
        from pollinate.privacy import ClientClipping

        client_fn = ClientClipping(client_fn)
    elif p.mode == "local":
        from pollinate.privacy import LocalDP

        client_fn = LocalDP(
            client_fn,
            clip=p.clip,
            noise_multiplier=noise_multiplier(cfg),
            delta=p.delta,
            seed=cfg.run.seed if cfg.run.deterministic else None,
        )
    compression = cfg.compression
    if compression.uplink != "none" or compression.downlink != "none":
        from pollinate.compression import Compression

        client_fn = Compression.from_config(compression).client(client_fn)
    if cfg.secure_aggregation.enabled:
        from pollinate.privacy.secure import SecureClient

        client_fn = SecureClient(client_fn)
    return client_fn


def build_secure(cfg: RunConfig, run_tag: str | None = None) -> SecureAggregation | None:
    """[secure_aggregation]'s protocol for the round loop (None when it is off)."""
    s = cfg.secure_aggregation
    if not s.enabled:
        return None
    from pollinate.privacy.secagg import SecAggConfig
    from pollinate.privacy.secure import SecureAggregation

    config = SecAggConfig(
        neighbours=s.neighbours,
        threshold=s.threshold,
        clip_range=s.clip_range,
        quantization_bits=s.quantization_bits,
        modulus_bits=s.modulus_bits,
    )
    seed = cfg.run.seed if cfg.run.deterministic else None
    return SecureAggregation(config, max_weight=s.max_weight, run_tag=run_tag, seed=seed)
