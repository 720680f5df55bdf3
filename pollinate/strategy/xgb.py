"""Federated gradient-boosted trees: the server's half, as pure JSON (no xgboost import).

A booster travels as Arrays ``[uint8 array]``: the bytes of XGBoost's JSON model format
(``Booster.save_raw("json")``). Each round a client loads the global booster, adds
``local_rounds`` boosting rounds on its own data, and returns **only its new trees** (a JSON
model holding just those trees; see ``pollinate.frameworks.xgboost``). The server appends
them to the global model:

- **bagging** (``BoostedTreesBagging``, Ma et al. 2023, "Gradient-less Federated Gradient
  Boosting Trees with Learnable Learning Rates", arXiv 2304.07537): every sampled client's new
  trees are appended, so the global ensemble predicts F(x) = F_global(x) + Σ_k f_k(x). The
  weights (example counts) are not used: trees are summed, not averaged.
- **cyclic** (``BoostedTreesCyclic``): one client per round, in client-id order
  (``cyclic_client``), trains on top of the global booster; its trees are appended, so the
  clients boost the one model in turn.

Appending edits the JSON model ``learner.gradient_booster.model``: each new tree's ``id``
becomes its index in ``trees``, ``tree_info`` (the class of each tree) is extended, each of
the client's boosting rounds adds an ``iteration_indptr`` entry (shifted by the global
model's tree count), and ``gbtree_model_param.num_trees`` is the new count. A client's model
must have the global model's ``num_class``, ``num_feature``, objective and
``num_parallel_tree``, else it is rejected (``UpdateRejected``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from pollinate.errors import UpdateRejected
from pollinate.strategy.aggregators import Accumulator, Aggregator
from pollinate.strategy.algorithms import LocalAlgorithm
from pollinate.strategy.fedavg import FedAvg
from pollinate.strategy.optimizers import ServerOptimizer
from pollinate.strategy.selection import SelectionPolicy
from pollinate.types import Arrays, ClientId, Scalar

log = logging.getLogger("pollinate")

MATCHING_PARAMS = ("num_class", "num_feature", "num_target")


def booster_bytes(arrays: Sequence[np.ndarray]) -> bytes:
    """The JSON model bytes that Arrays ``[uint8 array]`` carry."""
    if len(arrays) != 1 or not isinstance(arrays[0], np.ndarray) or arrays[0].dtype != np.uint8:
        raise UpdateRejected(
            "a boosted-trees model travels as one uint8 array of its JSON bytes, got "
            f"{len(arrays)} arrays" + (f" of dtype {arrays[0].dtype}" if len(arrays) == 1 else "")
        )
    return arrays[0].tobytes()


def to_arrays(model: bytes | bytearray) -> Arrays:
    """JSON model bytes as Arrays ``[uint8 array]``."""
    return [np.frombuffer(bytes(model), dtype=np.uint8).copy()]


def parse_model(raw: bytes, what: str) -> dict[str, Any]:
    """An XGBoost JSON model, checked to be a gbtree model; UpdateRejected otherwise."""
    try:
        model = json.loads(raw)
        booster = model["learner"]["gradient_booster"]
        trees = booster["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise UpdateRejected(f"{what} is not an XGBoost JSON model: {e}") from None
    if booster.get("name") != "gbtree":
        raise UpdateRejected(
            f"{what} is a {booster.get('name')!r} booster; only 'gbtree' boosters can be merged"
        )
    for key in ("trees", "tree_info", "iteration_indptr", "gbtree_model_param"):
        if key not in trees:
            raise UpdateRejected(f"{what} has no {key!r} in its gbtree model")
    if len(trees["tree_info"]) != len(trees["trees"]):
        raise UpdateRejected(f"{what}: tree_info and trees differ in length")
    if len(trees["iteration_indptr"]) < 1 or trees["iteration_indptr"][-1] != len(trees["trees"]):
        raise UpdateRejected(f"{what}: iteration_indptr does not end at its tree count")
    return model  # type: ignore[no-any-return]


def _model_part(model: dict[str, Any]) -> dict[str, Any]:
    return model["learner"]["gradient_booster"]["model"]  # type: ignore[no-any-return]


def _check_same_problem(base: dict[str, Any], update: dict[str, Any]) -> None:
    b, u = base["learner"], update["learner"]
    for key in MATCHING_PARAMS:
        bv, uv = b["learner_model_param"].get(key), u["learner_model_param"].get(key)
        if bv != uv:
            raise UpdateRejected(f"the client's trees have {key} = {uv}, the global model {bv}")
    if b["objective"].get("name") != u["objective"].get("name"):
        raise UpdateRejected(
            f"the client's trees use objective {u['objective'].get('name')!r}, the global model "
            f"{b['objective'].get('name')!r}"
        )
    bp = _model_part(base)["gbtree_model_param"].get("num_parallel_tree")
    up = _model_part(update)["gbtree_model_param"].get("num_parallel_tree")
    if bp != up:
        raise UpdateRejected(f"the client's num_parallel_tree is {up}, the global model's {bp}")


def append_trees(base: dict[str, Any], update: dict[str, Any]) -> None:
    """Append ``update``'s trees (and boosting rounds) to ``base`` in place."""
    _check_same_problem(base, update)
    target, source = _model_part(base), _model_part(update)
    offset = len(target["trees"])
    for i, tree in enumerate(source["trees"]):
        tree = dict(tree)
        tree["id"] = offset + i
        target["trees"].append(tree)
    target["tree_info"].extend(source["tree_info"])
    target["iteration_indptr"].extend(offset + int(v) for v in source["iteration_indptr"][1:])
    target["gbtree_model_param"]["num_trees"] = str(len(target["trees"]))


def merge_trees(global_model: bytes, updates: Sequence[bytes]) -> bytes:
    """The global JSON model with every update's trees appended, in order."""
    base = parse_model(global_model, "the global model")
    for i, raw in enumerate(updates):
        append_trees(base, parse_model(raw, f"update {i}"))
    return json.dumps(base, separators=(",", ":")).encode()


def num_trees(arrays: Sequence[np.ndarray]) -> int:
    """How many trees the model in ``arrays`` holds."""
    return len(_model_part(parse_model(booster_bytes(arrays), "the model"))["trees"])


class TreesAccumulator:
    """Appends clients' trees to the global model as their updates arrive."""

    def __init__(self, template: Arrays, max_updates: int | None = None) -> None:
        self._model = parse_model(booster_bytes(template), "the global model")
        self.max_updates = max_updates
        self.count = 0
        self.total_weight = 0.0

    def add(self, update: Sequence[np.ndarray], weight: float) -> None:
        """Append the trees of ``update`` (``[uint8 array]``); ``weight`` is only counted."""
        if self.max_updates is not None and self.count >= self.max_updates:
            raise UpdateRejected(
                f"cyclic boosting takes {self.max_updates} client's trees per round, got more"
            )
        append_trees(self._model, parse_model(booster_bytes(update), "the client's trees"))
        self.count += 1
        self.total_weight += float(weight)

    def result(self) -> Arrays:
        """The global model with every added client's trees, as ``[uint8 array]``."""
        return to_arrays(json.dumps(self._model, separators=(",", ":")).encode())


class BoostedTreesBagging(Aggregator):
    """Bagging aggregation of boosted trees: every client's new trees join the global model.

    Aggregator interface: ``start(global_arrays)`` returns an accumulator with
    ``add(update, weight)``, ``result()``, ``count`` and ``total_weight``;
    ``aggregate(global_arrays, updates, weights)`` does it in one call. Not sum-based: it
    needs each client's trees, so it cannot run under secure aggregation or central DP.
    """

    name = "fedxgb_bagging"
    sum_based = False
    max_updates: int | None = None

    def start(self, template: Sequence[np.ndarray], capacity: int | None = None) -> Accumulator:
        return TreesAccumulator(list(template), self.max_updates)

    def merge(
        self, global_arrays: Arrays, updates: Sequence[Arrays], weights: Sequence[float]
    ) -> Arrays:
        """The global model with every update's trees appended, in one call."""
        acc = self.start(global_arrays)
        for update, weight in zip(updates, weights):
            acc.add(update, weight)
        return acc.result()


class BoostedTreesCyclic(BoostedTreesBagging):
    """Cyclic boosting: the round's one client (``cyclic_client``) adds its trees."""

    name = "fedxgb_cyclic"
    max_updates = 1


def cyclic_client(round_number: int, clients: Sequence[int]) -> int:
    """The client that trains in round ``round_number`` (from 1): client ids in order, cycled."""
    if not clients:
        raise ValueError("no clients to choose from")
    ordered = sorted(clients)
    return ordered[(round_number - 1) % len(ordered)]


class TreeBoosting(LocalAlgorithm):
    """The local algorithm of federated boosted trees: a client's result is its new trees
    (any size: no shape check against the global model; the aggregator validates the JSON),
    and the aggregate, the global model with the clients' trees appended, is the next model."""

    name = "fedxgb"
    sum_based = False

    def expected(self, arrays: Arrays) -> Arrays | None:
        return None

    def finish(self, aggregate: Arrays, arrays: Arrays) -> Arrays:
        return aggregate


class ReplaceModel(ServerOptimizer):
    """The update is the next model itself (boosted trees are appended, not averaged)."""

    name = "replace"

    def step(self, arrays: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> Arrays:
        self.rounds += 1
        return list(delta)

    def _update(self, w: np.ndarray, d: np.ndarray, **moments: np.ndarray) -> np.ndarray:
        return d  # pragma: no cover - step() is overridden

    def _params(self) -> dict[str, Scalar]:
        return {}


class Cyclic(SelectionPolicy):
    """One client per round, in client-id order, cycled (``cyclic_client``)."""

    name = "cyclic"

    def select(
        self,
        round_number: int,
        clients: Sequence[ClientId],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> list[ClientId]:
        return [cyclic_client(round_number, clients)]


def FedXgbBagging(**kw: Any) -> FedAvg:
    """Federated boosted trees, bagging: every sampled client's new trees join the model."""
    return FedAvg(
        **{
            **kw,
            "algorithm": TreeBoosting(),
            "aggregator": BoostedTreesBagging(),
            "optimizer": ReplaceModel(),
        }
    )


def FedXgbCyclic(**kw: Any) -> FedAvg:
    """Federated boosted trees, cyclic: one client per round, in id order, adds its trees."""
    return FedAvg(
        **{
            **kw,
            "min_train_clients": 1,
            "selection": Cyclic(),
            "algorithm": TreeBoosting(),
            "aggregator": BoostedTreesCyclic(),
            "optimizer": ReplaceModel(),
        }
    )
