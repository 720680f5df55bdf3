"""A run config turned into a running experiment: data, model, clients, strategy, backend."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pollinate.callbacks import ProgressDisplay, RunFolderWriter
from pollinate.client import ClientFn
from pollinate.config import RunConfig
from pollinate.data import FederatedDataset, load_dataset, make_partitioner
from pollinate.server import Callback, History, RunResult
from pollinate.simulation import simulate
from pollinate.strategy.base import Strategy
from pollinate.strategy.fedavg import EvaluateFn, FedAvg
from pollinate.types import Arrays

if TYPE_CHECKING:
    from pollinate.analytics.config import AnalyticsConfig
    from pollinate.privacy.secure import SecureAggregation

log = logging.getLogger("pollinate")

PARTITION_PARAMS = {
    "iid": (),
    "dirichlet": ("alpha", "min_size"),
    "shards": ("shards_per_client",),
    "quantity": ("alpha", "min_size"),
}


def build_data(cfg: RunConfig) -> FederatedDataset:
    """Load the config's data set and split it across its clients."""
    d = cfg.data
    params: dict[str, Any] = {k: getattr(d, k) for k in PARTITION_PARAMS[d.partition]}
    if d.partition == "quantity":
        params["min_size"] = max(1, d.min_size)
    partitioner = make_partitioner(d.partition, **params)
    dataset = load_dataset(d.dataset)
    return FederatedDataset.build(
        dataset, partitioner, d.num_clients, d.client_test_fraction, cfg.run.seed
    )


def train_config(cfg: RunConfig) -> dict[str, Any]:
    """What every client is told for local training."""
    t = cfg.train
    config: dict[str, Any] = {
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "optimizer": t.optimizer,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "local_evaluation": t.local_evaluation,
    }
    if t.optimizer == "sgd":  # momentum is SGD's; Adam has its own moments
        config["momentum"] = t.momentum
    return config


class _ExampleCost:
    """Expected task cost for longest-task-first: the client's number of examples."""

    def __init__(self, data: FederatedDataset) -> None:
        self.data = data

    def __call__(self, client_id: int, kind: str) -> float:
        if kind == "train":
            return float(self.data.num_train_examples(client_id))
        return float(self.data.num_test_examples(client_id))


def build_model_fn(cfg: RunConfig, data: FederatedDataset) -> Callable[[], Any]:
    """A picklable zero-argument function building the config's model for ``data``."""
    from pollinate.frameworks.base import get_framework

    framework = get_framework(cfg.model.framework)
    return framework.model_fn(cfg.model, tuple(data.x_train.shape[1:]), data.num_classes)


def build_strategy(cfg: RunConfig, evaluate_fn: EvaluateFn | None) -> Strategy:
    """The config's strategy, evaluating centrally with ``evaluate_fn``, wrapped per [privacy]."""
    s = cfg.strategy
    central = cfg.privacy.mode == "central"  # then CentralDP samples the clients itself
    fedavg = FedAvg(
        fraction_train=1.0 if central else s.fraction_train,
        min_train_clients=s.min_train_clients,
        min_available_clients=0 if central else s.min_available_clients,
        fraction_evaluate=s.fraction_evaluate,
        min_evaluate_clients=s.min_evaluate_clients,
        round_timeout_s=s.round_timeout_s,
        train_config=train_config(cfg),
        evaluate_config={"batch_size": max(256, cfg.train.batch_size)},
        evaluate_fn=evaluate_fn,
        seed=cfg.run.seed,
    )
    if cfg.model.framework == "xgboost":  # boosted trees are appended, not averaged
        from pollinate.strategy.xgb import FedXgb

        return wrap_strategy(cfg, FedXgb.like(fedavg, mode="bagging"))
    return wrap_strategy(cfg, fedavg)


# -- privacy ----------------------------------------------------------------------------------


def clients_per_round(cfg: RunConfig) -> float:
    """Central DP's expected clients per round: q·N (Poisson) or FedAvg's sample size m."""
    n, s = cfg.data.num_clients, cfg.strategy
    if cfg.privacy.sampling == "poisson":
        return s.fraction_train * n
    return min(n, max(s.min_train_clients, math.ceil(round(s.fraction_train * n, 6))))


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
    """``client_fn`` wrapped per [privacy] (clipping or local DP on the client) and, outermost,
    per [secure_aggregation] (the update leaves the client masked)."""
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


class _LastModel(Callback):
    """Keeps the latest global model, for a run that stops on its privacy budget."""

    def __init__(self, arrays: Arrays) -> None:
        self.arrays = arrays

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        self.arrays = arrays


def run_experiment(cfg: RunConfig, quiet: bool = False) -> RunResult:
    """Run the experiment ``cfg`` describes; the run folder is ``cfg.output_dir``."""
    from pollinate.frameworks.base import framework_parts
    from pollinate.privacy.accounting import PrivacyBudgetExceeded

    data = build_data(cfg)
    parts = framework_parts(cfg, data)
    strategy = build_strategy(cfg, parts.evaluator)
    history = History(config=cfg.to_dict())
    last = _LastModel(parts.initial_arrays)
    callbacks = [
        ProgressDisplay(quiet=quiet),
        RunFolderWriter(cfg.output_dir, history, label_counts=data.label_counts()),
        last,
    ]
    sim = cfg.simulation
    try:
        return simulate(
            wrap_client_fn(cfg, parts.client_fn),
            num_clients=data.num_clients,
            strategy=strategy,
            initial_arrays=last.arrays,
            rounds=cfg.run.rounds,
            backend=sim.backend,
            workers=sim.workers,
            threads_per_worker=sim.threads_per_worker,
            ray_address=sim.ray_address,
            gpus_per_worker=sim.gpus_per_worker,
            seed=cfg.run.seed,
            deterministic=cfg.run.deterministic,
            cost_fn=_ExampleCost(data),
            callbacks=callbacks,
            history=history,
            secure=build_secure(cfg),
        )
    except PrivacyBudgetExceeded as exc:  # a clean stop: the completed rounds are saved
        log.warning("%s; the completed rounds are in %s", exc, cfg.output_dir)
        return RunResult(history, last.arrays)


def run_analytics(cfg: AnalyticsConfig, quiet: bool = False) -> list[dict[str, Any]]:
    """Answer an analytics config's queries over simulated clients (``pollinate analyze``);
    writes ``analytics.json`` and the plots, and returns the answers."""
    from pollinate.analytics.session import (
        client_fn,
        client_tables,
        make_runner,
        run_queries,
        write_outputs,
    )
    from pollinate.simulation.engine import SimulationExecutor, make_backend

    tables = client_tables(cfg)
    backend = make_backend(cfg.simulation.backend, workers=cfg.simulation.workers)
    try:
        backend.start(client_fn(cfg, tables))
        executor = SimulationExecutor(backend, seed=cfg.run.seed, deterministic=True)
        answers = run_queries(cfg, make_runner(cfg, executor), list(range(len(tables))), quiet)
    finally:
        backend.close()
    write_outputs(cfg, answers)
    return answers
