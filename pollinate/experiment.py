"""A run config turned into a running experiment: data, model, clients, strategy, backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pollinate.callbacks import ProgressDisplay, RunFolderWriter
from pollinate.config import RunConfig
from pollinate.data import FederatedDataset, load_dataset, make_partitioner
from pollinate.server import History, RunResult
from pollinate.simulation import simulate
from pollinate.strategy.fedavg import EvaluateFn, FedAvg

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
    from pollinate.models import model_fn

    return model_fn(
        cfg.model.name, tuple(data.x_train.shape[1:]), data.num_classes, cfg.model.hidden
    )


def build_strategy(cfg: RunConfig, evaluate_fn: EvaluateFn | None) -> FedAvg:
    """The config's strategy, evaluating centrally with ``evaluate_fn``."""
    s = cfg.strategy
    return FedAvg(
        fraction_train=s.fraction_train,
        min_train_clients=s.min_train_clients,
        min_available_clients=s.min_available_clients,
        fraction_evaluate=s.fraction_evaluate,
        min_evaluate_clients=s.min_evaluate_clients,
        round_timeout_s=s.round_timeout_s,
        train_config=train_config(cfg),
        evaluate_config={"batch_size": max(256, cfg.train.batch_size)},
        evaluate_fn=evaluate_fn,
        seed=cfg.run.seed,
    )


def run_experiment(cfg: RunConfig, quiet: bool = False) -> RunResult:
    """Run the experiment ``cfg`` describes; the run folder is ``cfg.output_dir``."""
    from pollinate.frameworks.torch import classification_app, initial_arrays, torch_evaluator

    data = build_data(cfg)
    model_fn = build_model_fn(cfg, data)
    strategy = build_strategy(cfg, torch_evaluator(model_fn, *data.server_test()))
    history = History(config=cfg.to_dict())
    callbacks = [
        ProgressDisplay(quiet=quiet),
        RunFolderWriter(cfg.output_dir, history, label_counts=data.label_counts()),
    ]
    sim = cfg.simulation
    return simulate(
        classification_app(model_fn, data),
        num_clients=data.num_clients,
        strategy=strategy,
        initial_arrays=initial_arrays(model_fn, cfg.run.seed),
        rounds=cfg.run.rounds,
        backend=sim.backend,
        workers=sim.workers,
        threads_per_worker=sim.threads_per_worker,
        ray_address=sim.ray_address,
        seed=cfg.run.seed,
        deterministic=cfg.run.deterministic,
        cost_fn=_ExampleCost(data),
        callbacks=callbacks,
        history=history,
    )
