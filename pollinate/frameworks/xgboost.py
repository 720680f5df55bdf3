"""The XGBoost adapter: gradient-boosted trees, federated by bagging or cyclic boosting.

[model] ``name = "gbtree"``, with ``max_depth``, ``eta`` and ``local_rounds`` (boosting
rounds each client adds per round). The objective is ``multi:softprob`` over the data's
classes, the tree method ``hist``.

The model travels as Arrays ``[uint8 array]``: the bytes of XGBoost's JSON model. A client
loads the global booster, adds ``local_rounds`` rounds on its data and returns only its new
trees (``booster[n:n + local_rounds]``); the server appends them to the global model
(``pollinate.strategy.xgb``: every client's trees for bagging, the round's one client's for
cyclic boosting). Metrics: ``loss`` (mlogloss) and ``accuracy`` of the client's boosted
model on its training data, ``num_steps`` (boosting rounds). Inputs are flattened to
(N, features) float32. FedProx and SCAFFOLD are refused: boosting takes no gradient step on
the model's parameters. The initial model has no trees (every class equally likely).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xgboost as xgb

from pollinate.client import ClientFn
from pollinate.config import ModelSection
from pollinate.errors import ConfigError, UpdateRejected
from pollinate.frameworks.base import Evaluator, ModelBuilder, mismatch_error
from pollinate.frameworks.common import (
    FitResult,
    FrameworkApp,
    FrameworkEvaluator,
    TrainSettings,
    check_xy,
    thread_limit,
)
from pollinate.frameworks.devices import resolve_device, visible_gpus
from pollinate.strategy.xgb import booster_bytes, to_arrays
from pollinate.types import Arrays, Metrics

MODEL_NAMES = ("gbtree",)


@dataclass(frozen=True)
class BoosterSpec:
    """What an XGBoost model builder makes: the booster's parameters and the problem's sizes."""

    num_features: int
    num_classes: int
    max_depth: int = 6
    eta: float = 0.3
    local_rounds: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def params(self, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
        """The ``xgb.train`` parameters."""
        return {
            "objective": "multi:softprob",
            "num_class": self.num_classes,
            "max_depth": self.max_depth,
            "eta": self.eta,
            "tree_method": "hist",
            "base_score": 0.5,
            "eval_metric": "mlogloss",
            "device": "cuda" if device.startswith("cuda") else "cpu",
            "nthread": thread_limit() or 0,
            "seed": seed % 2**31,
            **self.extra,
        }


class XGBoostRunner:
    """One worker's booster state: the loaded model's bytes, local boosting, evaluation."""

    supports_strategies = False

    def __init__(self, spec: BoosterSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self._raw = b""
        self._booster: xgb.Booster | None = None

    def prepare(self, data: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = check_xy(data, what)
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        if x.shape[1] != self.spec.num_features:
            raise ConfigError(
                f"{what} data has {x.shape[1]} features per example, the model "
                f"{self.spec.num_features}"
            )
        return x, y.astype(np.int64)

    def set_arrays(self, arrays: Arrays) -> None:
        raw = booster_bytes(arrays)
        booster = xgb.Booster(self.spec.params(self.device))
        try:
            booster.load_model(bytearray(raw))
        except xgb.core.XGBoostError as e:
            raise UpdateRejected(f"the arrays do not hold an XGBoost model: {e}") from e
        self._raw, self._booster = raw, booster

    def get_arrays(self) -> Arrays:
        """The loaded model, or after ``fit`` the client's new trees only."""
        return to_arrays(self._raw)

    def trainable(self) -> list[bool]:
        return [False]

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        settings: TrainSettings,
        anchor: Arrays | None,
        correction: Arrays | None,
    ) -> FitResult:
        booster = self._loaded()
        before = booster.num_boosted_rounds()
        params = self.spec.params(self.device, settings.seed)
        rounds = self.spec.local_rounds
        booster = xgb.train(params, xgb.DMatrix(x, label=y), rounds, xgb_model=booster)
        self._booster = booster
        loss, metrics = self.evaluate(x, y, len(y))
        self._raw = bytes(booster[before : before + rounds].save_raw("json"))
        return FitResult(loss, metrics["accuracy"], rounds, self.spec.eta)  # type: ignore[arg-type]

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, Metrics]:
        proba = self._loaded().predict(xgb.DMatrix(x)).reshape(len(y), -1)
        picked = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
        loss = float(-np.mean(np.log(picked)))
        return loss, {"accuracy": float(np.mean(proba.argmax(1) == y))}

    def _loaded(self) -> xgb.Booster:
        if self._booster is None:
            raise UpdateRejected("no model was loaded: call set_arrays first")
        return self._booster


def make_runner(model_fn: ModelBuilder, device: str) -> XGBoostRunner:
    spec = model_fn()
    if not isinstance(spec, BoosterSpec):
        raise ConfigError(f"an XGBoost model builder must return a BoosterSpec, got {spec!r}")
    return XGBoostRunner(spec, device)


def empty_model(spec: BoosterSpec) -> bytes:
    """The JSON bytes of a booster with no trees for ``spec``'s problem."""
    x = np.zeros((spec.num_classes, spec.num_features), np.float32)
    data = xgb.DMatrix(x, label=np.arange(spec.num_classes))
    return bytes(xgb.train(spec.params(), data, 0).save_raw("json"))


class XGBoostApp(FrameworkApp):
    """The XGBoost ``ClientFn``: clients boost the global model on their data."""

    framework = "xgboost"
    make_runner = staticmethod(make_runner)


class XGBoostFramework:
    """XGBoost boosters, trained by bagging or cyclic boosting."""

    name = "xgboost"
    model_names = MODEL_NAMES

    def model_fn(
        self, model: ModelSection, input_shape: tuple[int, ...], num_classes: int
    ) -> ModelBuilder:
        if model.name not in MODEL_NAMES:
            raise ConfigError(
                f'unknown xgboost model {model.name!r}; set [model] name = "gbtree" (with '
                "max_depth, eta, local_rounds)"
            )
        return functools.partial(
            BoosterSpec,
            int(np.prod(input_shape)),
            int(num_classes),
            model.max_depth,
            model.eta,
            model.local_rounds,
        )

    def client_fn(self, model_fn: ModelBuilder, data: Any, device: str) -> ClientFn:
        return XGBoostApp(model_fn, data, device)

    def evaluator(self, model_fn: ModelBuilder, x: Any, y: Any, device: str) -> Evaluator:
        return FrameworkEvaluator(model_fn, x, y, device, make_runner)

    def initial_arrays(self, model_fn: ModelBuilder, seed: int) -> Arrays:
        return to_arrays(empty_model(model_fn()))

    def check(self, model_fn: ModelBuilder, x: Any, y: Any, num_classes: int) -> None:
        x = np.asarray(x)
        runner = make_runner(model_fn, "cpu")
        try:
            runner.set_arrays(to_arrays(empty_model(runner.spec)))
            runner.evaluate(*runner.prepare((x, np.asarray(y)), "sample"), len(x))
        except Exception as e:
            raise mismatch_error("gbtree", x, num_classes, f"running it failed: {e}") from e

    def resolve_device(self, name: str) -> str:
        cuda = bool(xgb.build_info().get("USE_CUDA", False))
        return resolve_device(name, "xgboost", len(visible_gpus()) if cuda else 0)


FRAMEWORK = XGBoostFramework()
