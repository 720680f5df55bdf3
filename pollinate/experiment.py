"""A run config turned into a running experiment: data, model, clients, strategy, backend."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pollinate.callbacks import ProgressDisplay, RunFolderWriter
from pollinate.client import ClientFn
from pollinate.config import RunConfig
from pollinate.data import FederatedDataset, federated_from_config
from pollinate.errors import ConfigError
from pollinate.server import Callback, History, RunResult
from pollinate.simulation import simulate
from pollinate.strategy.base import Strategy
from pollinate.strategy.fedavg import EvaluateFn
from pollinate.tracking import build_trackers
from pollinate.types import Arrays

if TYPE_CHECKING:
    from pollinate.analytics.config import AnalyticsConfig
    from pollinate.attacks import Attack
    from pollinate.frameworks.base import FrameworkParts
    from pollinate.privacy.secure import SecureAggregation

log = logging.getLogger("pollinate")


def build_data(cfg: RunConfig) -> FederatedDataset:
    """Load the config's data set and split it across its clients."""
    return federated_from_config(cfg.data, cfg.run.seed)


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


def strategy_parts(cfg: RunConfig) -> dict[str, Any]:
    """[strategy]'s selection policy and update bounds, as ``FedAvg`` keywords."""
    from pollinate.compression import Compression
    from pollinate.strategy.check import UpdateBounds
    from pollinate.strategy.selection import make_policy

    s = cfg.strategy
    params: dict[str, Any] = {}
    if s.selection == "poisson":
        params["rate"] = s.fraction_train
    elif s.selection == "power_of_choice" and s.candidates:
        params["candidates"] = s.candidates
    elif s.selection == "cooldown":
        params["rounds"] = s.cooldown_rounds
    elif s.selection == "oort":
        from pollinate.config import oort_params

        params = oort_params(cfg)
    bounds = UpdateBounds(
        max_norm=s.max_norm or None,
        norm_factor=s.norm_factor,
        max_examples=s.max_examples or None,
        examples_factor=s.examples_factor,
        on_excess=s.on_excess,
    )
    parts: dict[str, Any] = {"selection": make_policy(s.selection, **params), "bounds": bounds}
    compression = Compression.from_config(cfg.compression)
    if compression.enabled:
        parts["transforms"] = [compression]
    return parts


def build_strategy(
    cfg: RunConfig, evaluate_fn: EvaluateFn | None, *, clients_evaluate: bool = True
) -> Strategy:
    """The config's strategy, evaluating centrally with ``evaluate_fn``, wrapped per [privacy].
    ``clients_evaluate=False`` (no client holds test data) turns federated evaluation off."""
    from pollinate.config import strategy_params
    from pollinate.privacy.plan import wrap_strategy
    from pollinate.strategy.presets import make_strategy

    s = cfg.strategy
    central = cfg.privacy.mode == "central"  # then CentralDP samples the clients itself
    params = strategy_params(s)
    if s.name == "fednova":
        params["local_momentum"] = cfg.train.momentum if cfg.train.optimizer == "sgd" else 0.0
    if s.name == "fedbuff" and "concurrency" not in params:  # 10, or every client if fewer
        params["concurrency"] = min(10, cfg.data.num_clients)
    if s.name == "qfedavg" and "lipschitz" not in params:
        params["lipschitz"] = 1.0 / cfg.train.lr  # L = 1/η, as in the paper
    strategy = make_strategy(
        s.name,
        params,
        fraction_train=1.0 if central else s.fraction_train,
        min_train_clients=s.min_train_clients,
        min_available_clients=0 if central else s.min_available_clients,
        fraction_evaluate=s.fraction_evaluate if clients_evaluate else 0.0,
        min_evaluate_clients=s.min_evaluate_clients,
        round_timeout_s=s.round_timeout_s,
        train_config=train_config(cfg),
        evaluate_config={"batch_size": max(256, cfg.train.batch_size)},
        evaluate_fn=evaluate_fn,
        seed=cfg.run.seed,
        **strategy_parts(cfg),
    )
    return wrap_strategy(cfg, strategy)


@dataclass
class Run:
    """A run config assembled: what ``pollinate run`` simulates and ``pollinate server``
    serves (data → framework and model → strategy → client wrappers → secure aggregation)."""

    cfg: RunConfig
    data: FederatedDataset
    parts: FrameworkParts
    strategy: Strategy
    secure: SecureAggregation | None
    attack: Attack | None = None  # simulation only

    @property
    def initial_arrays(self) -> Arrays:
        return self.parts.initial_arrays

    def client_fn(self) -> ClientFn:
        """The clients' ``client_fn`` for this config's data, wrapped per [privacy],
        [compression] and [secure_aggregation]."""
        from pollinate.privacy.plan import wrap_client_fn

        client_fn = self.parts.client_fn
        if self.attack is not None and self.attack.kind == "label_flip":
            from pollinate.attacks import flip_labels

            attackers = self.attack.attackers(self.data.num_clients)
            flipped = flip_labels(self.data, attackers, self.data.num_classes)
            client_fn = self.parts.framework.client_fn(
                self.parts.model_fn, flipped, self.parts.device
            )
        return wrap_client_fn(self.cfg, client_fn)

    def history(self, records: Sequence[dict[str, Any]] = ()) -> History:
        """A history for this run (the completed rounds' ``records`` when resuming)."""
        return History(config=self.cfg.to_dict(), rounds=list(records))


def build_run(cfg: RunConfig, run_tag: str | None = None, *, own_client_data: bool = False) -> Run:
    """Assemble ``cfg`` into a ``Run``; the one place the config path turns into objects.

    ``own_client_data``: the clients may hold data of their own, not the config's (deployed
    clients with ``--app``), so the config's client test sets do not decide whether they
    can evaluate."""
    from pollinate.frameworks.base import framework_parts
    from pollinate.privacy.plan import build_secure

    data = build_data(cfg)
    parts = framework_parts(cfg, data)  # checks the model on one batch of the data, once
    # no client holds test data (too many clients, or client_test_fraction = 0; the former is
    # warned about when the data are built): no federated evaluation, not one failure a client
    clients_evaluate = own_client_data or data.has_client_test_data()
    strategy = build_strategy(cfg, parts.evaluator, clients_evaluate=clients_evaluate)
    secure = build_secure(cfg, run_tag=run_tag)
    if secure is not None:  # refuse a strategy that cannot take a sum now, not in round 1
        strategy.secure_terms(1, 1, secure.max_weight)
    attack = None
    if cfg.attack.kind != "none":
        from pollinate.attacks import Attack

        attack = Attack.from_config(dataclasses.asdict(cfg.attack), data.num_clients)
    return Run(cfg, data, parts, strategy, secure, attack)


class _LastModel(Callback):
    """Keeps the latest global model, for a run that stops on its privacy budget."""

    def __init__(self, arrays: Arrays) -> None:
        self.arrays = arrays

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        self.arrays = arrays


def run_experiment(cfg: RunConfig, quiet: bool = False, fresh: bool = False) -> RunResult:
    """Run the experiment ``cfg`` describes; the run folder is ``cfg.output_dir``.

    A run folder holding an interrupted run of the same config is resumed after its last
    completed round; one holding a run of another config is refused (``ConfigError`` naming
    the differences); ``fresh`` moves an old run folder aside first.
    """
    from pollinate.runlock import RunLock

    folder = cfg.output_dir
    if fresh and folder.exists():
        from pollinate.resume import move_aside

        with RunLock(folder):  # refused while another process writes it
            pass
        log.warning("moved the old run folder aside to %s", move_aside(folder))
    with RunLock(folder):  # one writer per run folder (a server, or another simulation)
        return _run_experiment(cfg, quiet)


def _run_experiment(cfg: RunConfig, quiet: bool) -> RunResult:
    from pollinate.privacy.accounting import PrivacyBudgetExceeded
    from pollinate.resume import CLIENT_STATE, RoundStateStore, resume_point
    from pollinate.simulation.environment import Environment

    folder = cfg.output_dir
    prior = resume_point(folder, cfg.to_dict())
    run = build_run(cfg)
    history = run.history(prior.records if prior else ())
    arrays = run.initial_arrays
    if prior is not None and cfg.strategy.name == "fedbuff":
        raise ConfigError(
            f"{folder} holds a fedbuff run, and strategy fedbuff cannot resume: the "
            "clients in flight when it stopped cannot be restored; start afresh with --fresh "
            "(the old folder is kept beside it)"
        )
    if prior is not None:
        arrays = prior.arrays
        run.strategy.restore(history.rounds)
        run.strategy.load_state(prior.strategy_state)
        if prior.last >= cfg.run.rounds:
            log.warning(
                "%s: the run already finished %s; nothing to do (raise run.rounds to go on, or "
                "--fresh to start again)",
                folder,
                "its 1 round" if prior.last == 1 else f"all {prior.last} rounds",
            )
            RunFolderWriter(folder, history, label_counts=run.data.label_counts()).on_run_end(
                history, None
            )
            return RunResult(history, arrays)
        log.warning("%s: resuming after round %d of %d", folder, prior.last, cfg.run.rounds)
    store = RoundStateStore(folder / CLIENT_STATE, upto=prior.last if prior else 0)
    last = _LastModel(arrays)
    callbacks = [
        store,  # before the checkpoint: see pollinate.resume
        ProgressDisplay(quiet=quiet),
        RunFolderWriter(
            folder, history, label_counts=run.data.label_counts(), strategy=run.strategy
        ),
        last,
        *build_trackers(cfg),  # after the RunFolderWriter: they log its files at the end
    ]
    sim = cfg.simulation
    try:
        return simulate(
            run.client_fn(),
            num_clients=run.data.num_clients,
            strategy=run.strategy,
            initial_arrays=arrays,
            rounds=cfg.run.rounds,
            start_round=prior.last + 1 if prior else 1,
            backend=sim.backend,
            workers=sim.workers,
            threads_per_worker=sim.threads_per_worker,
            ray_address=sim.ray_address,
            gpus_per_worker=sim.gpus_per_worker,
            seed=cfg.run.seed,
            deterministic=cfg.run.deterministic,
            cost_fn=_ExampleCost(run.data),
            state_store=store,
            callbacks=callbacks,
            history=history,
            secure=run.secure,
            environment=Environment.from_config(cfg.environment, run.data.num_clients),
            attack=run.attack,
            deadline_s=cfg.environment.deadline_s or None,
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
