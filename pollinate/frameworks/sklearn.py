"""The scikit-learn adapter: linear models and MLPs federated through their fitted arrays.

Built-in models ([model] name):

- ``sgd``: ``SGDClassifier(loss="log_loss")`` (logistic regression by SGD), ``partial_fit`` one
  pass per epoch; [train] lr is its constant ``eta0``, weight_decay its L2 ``alpha``.
- ``logreg``: ``LogisticRegression(warm_start=True)``, L-BFGS for [train] epochs iterations
  from the received weights.
- ``mlp``: ``MLPClassifier(hidden_layer_sizes=[model] hidden)``, ``partial_fit`` one pass per
  epoch with the [train] optimizer (sgd | adam), lr, momentum, batch_size; weight_decay is its
  L2 ``alpha``.
- ``sgd_regressor``: ``SGDRegressor`` (squared error, as ``sgd``); ``ridge``: ``Ridge``, solved
  in closed form on each client (the server averages the solutions: one-shot averaging).
- ``"package.module:function"``: a function returning one of these (or any estimator with
  ``coef_``/``intercept_`` and ``partial_fit`` or ``warm_start``, or ``coefs_``/
  ``intercepts_``); it receives ``input_shape=(features,)``, ``num_classes``, ``hidden``
  where it accepts them.

Arrays: ``[coef_, intercept_]``, or ``coefs_ + intercepts_`` for an MLP, in float64. Inputs are
flattened to (N, features) and cast to float64 here (SGD's Cython core accepts nothing else
once its weights are float64). Classifiers report log loss (or 1 − accuracy when the model
has no ``predict_proba``) and accuracy; regressors mean squared error and ``r2``. A client
missing some classes still trains every class's weights (all classes are declared). FedProx
and SCAFFOLD are refused: scikit-learn exposes no gradient step to change.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import (
    LogisticRegression,
    Ridge,
    SGDClassifier,
    SGDRegressor,
)
from sklearn.metrics import log_loss
from sklearn.neural_network import MLPClassifier

from pollinate.client import ClientFn
from pollinate.config import ModelSection
from pollinate.errors import ConfigError
from pollinate.frameworks.base import (
    Evaluator,
    ModelBuilder,
    call_user_model,
    check_model_name,
    is_user_model,
    mismatch_error,
)
from pollinate.frameworks.common import (
    FitResult,
    FrameworkApp,
    FrameworkEvaluator,
    TrainSettings,
    check_arrays,
    check_xy,
)
from pollinate.types import Arrays, Metrics

MODEL_NAMES = ("sgd", "logreg", "mlp", "sgd_regressor", "ridge")


def build_estimator(name: str, num_features: int, num_classes: int, hidden: tuple[int, ...]) -> Any:
    """The estimator ``name`` (a built-in or ``"package.module:function"``)."""
    if is_user_model(name):
        offered = {"input_shape": (num_features,), "num_classes": num_classes, "hidden": hidden}
        estimator = call_user_model(name, offered)
        if not hasattr(estimator, "fit"):
            raise ConfigError(
                f"model {name!r} must return a scikit-learn estimator, got "
                f"{type(estimator).__name__}"
            )
        return estimator
    if name == "sgd":
        return SGDClassifier(loss="log_loss", learning_rate="constant", shuffle=False)
    if name == "logreg":
        return LogisticRegression(warm_start=True)
    if name == "mlp":
        return MLPClassifier(hidden_layer_sizes=hidden, shuffle=False)
    if name == "sgd_regressor":
        return SGDRegressor(learning_rate="constant", shuffle=False)
    return Ridge()


@dataclass(frozen=True)
class SklearnModel:
    """What a scikit-learn model builder makes: an estimator and the problem's sizes."""

    estimator: Any
    num_features: int
    num_classes: int


def _model(name: str, num_features: int, num_classes: int, hidden: tuple[int, ...]) -> SklearnModel:
    return SklearnModel(
        build_estimator(name, num_features, num_classes, hidden), num_features, num_classes
    )


class SklearnRunner:
    """One worker's estimator: Arrays in and out, local training, evaluation."""

    supports_strategies = False

    def __init__(self, model: SklearnModel, seed: int = 0) -> None:
        self.est = model.estimator
        self.num_features = model.num_features
        self.classes = np.arange(model.num_classes)
        self.classifier = is_classifier(self.est)
        self.mlp = hasattr(self.est, "hidden_layer_sizes")
        self._initialize(seed)
        self._layout = [(a.shape, a.dtype) for a in self.get_arrays()]

    def _initialize(self, seed: int) -> None:
        """Fit once on one dummy example per class, so every fitted attribute exists (then the
        linear weights start at zero, an MLP at its seeded Glorot initialization)."""
        k = len(self.classes) if self.classifier else 2
        x = np.zeros((k, self.num_features))
        y = self.classes if self.classifier else np.arange(k, dtype=np.float64)
        if "random_state" in self.est.get_params():
            self.est.set_params(random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if hasattr(self.est, "partial_fit") and self.classifier:
                self.est.partial_fit(x, y, classes=self.classes)
            elif hasattr(self.est, "partial_fit"):
                self.est.partial_fit(x, y)
            else:
                self.est.fit(x, y)
        if not self.mlp:
            if not hasattr(self.est, "coef_"):
                raise ConfigError(
                    f"{type(self.est).__name__} has neither coef_/intercept_ nor coefs_/"
                    "intercepts_: the scikit-learn adapter cannot federate it"
                )
            self.est.coef_ = np.zeros_like(np.asarray(self.est.coef_, dtype=np.float64))
            self.est.intercept_ = np.zeros_like(np.asarray(self.est.intercept_, np.float64))

    # -- arrays ------------------------------------------------------------------------------

    def get_arrays(self) -> Arrays:
        if self.mlp:
            return [np.array(a, np.float64) for a in (*self.est.coefs_, *self.est.intercepts_)]
        return [np.array(self.est.coef_, np.float64), np.array(self.est.intercept_, np.float64)]

    def set_arrays(self, arrays: Arrays) -> None:
        check_arrays(arrays, self._layout, f"{type(self.est).__name__} model")
        values = [np.array(a, np.float64) for a in arrays]
        if self.mlp:
            half = len(values) // 2
            self.est.coefs_, self.est.intercepts_ = values[:half], values[half:]
        else:
            self.est.coef_, self.est.intercept_ = values
            if values[1].ndim == 0:
                self.est.intercept_ = float(values[1])

    def trainable(self) -> list[bool]:
        return [True] * len(self._layout)

    # -- data --------------------------------------------------------------------------------

    def prepare(self, data: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = check_xy(data, what)
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        if x.shape[1] != self.num_features:
            raise ConfigError(
                f"{what} data has {x.shape[1]} features per example, the model {self.num_features}"
            )
        return x, (y.astype(np.int64) if self.classifier else y.astype(np.float64))

    # -- training ----------------------------------------------------------------------------

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        settings: TrainSettings,
        anchor: Arrays | None,
        correction: Arrays | None,
    ) -> FitResult:
        s = settings
        est = self.est
        rng = np.random.default_rng(s.seed)
        params = est.get_params()
        n = len(y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.mlp:
                steps = self._fit_mlp(x, y, s, rng)
            elif hasattr(est, "partial_fit") and "eta0" in params:
                updates: dict[str, Any] = {"eta0": s.lr, "alpha": s.weight_decay}
                if "penalty" in params:
                    updates["penalty"] = "l2" if s.weight_decay > 0 else None
                est.set_params(**updates)
                est.t_ = 1.0  # each task starts its learning-rate schedule afresh
                for _ in range(s.epochs):
                    order = rng.permutation(n)
                    if "random_state" in params:
                        est.set_params(random_state=int(rng.integers(2**31)))
                    if self.classifier:
                        est.partial_fit(x[order], y[order], classes=self.classes)
                    else:
                        est.partial_fit(x[order], y[order])
                steps = s.epochs * n
            elif params.get("warm_start") is not None:
                est.set_params(warm_start=True, max_iter=s.epochs)
                xw, yw, w = self._all_classes(x, y)
                est.fit(xw, yw, sample_weight=w)
                steps = int(np.max(getattr(est, "n_iter_", s.epochs)))
            else:  # closed form (Ridge): the local solution
                est.fit(x, y)
                steps = 1
        loss, metrics = self.evaluate(x, y, n)
        lr = s.lr
        return FitResult(loss, metrics.get("accuracy"), steps, lr)  # type: ignore[arg-type]

    def _fit_mlp(
        self, x: np.ndarray, y: np.ndarray, s: TrainSettings, rng: np.random.Generator
    ) -> int:
        est = self.est
        est.set_params(
            solver=s.optimizer,
            learning_rate_init=s.lr,
            momentum=s.momentum,
            nesterovs_momentum=False,
            alpha=s.weight_decay,
            batch_size=s.batch_size,
        )
        if hasattr(est, "_optimizer"):
            del est._optimizer  # a fresh optimizer state for every task
        est._random_state = np.random.RandomState(int(rng.integers(2**31)))
        for _ in range(s.epochs):
            order = rng.permutation(len(y))
            est.partial_fit(x[order], y[order], classes=self.classes)
        return s.epochs * math.ceil(len(y) / min(s.batch_size, len(y)))

    def _all_classes(
        self, x: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, weights) with a zero-weight example of every class the client lacks, so a
        full-batch solver keeps one weight row per class."""
        weights = np.ones(len(y))
        if not self.classifier:
            return x, y, weights
        missing = np.setdiff1d(self.classes, y)
        if len(missing) == 0:
            return x, y, weights
        pad = np.zeros((len(missing), x.shape[1]))
        return (
            np.concatenate([x, pad]),
            np.concatenate([y, missing]),
            np.concatenate([weights, np.zeros(len(missing))]),
        )

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, Metrics]:
        if not self.classifier:
            pred = np.asarray(self.est.predict(x), np.float64)
            mse = float(np.mean((pred - y) ** 2))
            var = float(np.var(y))
            return mse, {"r2": 1.0 - mse / var if var > 0 else 0.0}
        accuracy = float(np.mean(self.est.predict(x) == y))
        if hasattr(self.est, "predict_proba"):
            proba = self.est.predict_proba(x)
            loss = float(log_loss(y, proba, labels=self.classes))
        else:
            loss = 1.0 - accuracy
        return loss, {"accuracy": accuracy}


def make_runner(model_fn: ModelBuilder, device: str) -> SklearnRunner:
    model = model_fn()
    if not isinstance(model, SklearnModel):
        raise ConfigError(f"a scikit-learn model builder must return a SklearnModel, got {model!r}")
    return SklearnRunner(model)


class SklearnApp(FrameworkApp):
    """The scikit-learn ``ClientFn``: one estimator per worker, reused for every client."""

    framework = "sklearn"
    make_runner = staticmethod(make_runner)


class SklearnFramework:
    """scikit-learn estimators federated through their fitted arrays."""

    name = "sklearn"
    model_names = MODEL_NAMES

    def model_fn(
        self, model: ModelSection, input_shape: tuple[int, ...], num_classes: int
    ) -> ModelBuilder:
        check_model_name(model.name, "scikit-learn", MODEL_NAMES)
        features = int(np.prod(input_shape))
        return functools.partial(_model, model.name, features, num_classes, tuple(model.hidden))

    def client_fn(self, model_fn: ModelBuilder, data: Any, device: str) -> ClientFn:
        return SklearnApp(model_fn, data, device)

    def evaluator(self, model_fn: ModelBuilder, x: Any, y: Any, device: str) -> Evaluator:
        return FrameworkEvaluator(model_fn, x, y, device, make_runner)

    def initial_arrays(self, model_fn: ModelBuilder, seed: int) -> Arrays:
        model = model_fn()
        return SklearnRunner(model, seed=seed).get_arrays()

    def check(self, model_fn: ModelBuilder, x: Any, y: Any, num_classes: int) -> None:
        x = np.asarray(x)
        runner = make_runner(model_fn, "cpu")
        name = getattr(model_fn, "args", ("model",))[0]
        try:
            xs, ys = runner.prepare((x, np.asarray(y)), "sample")
            runner.est.predict(xs)
        except Exception as e:
            raise mismatch_error(name, x, num_classes, f"running it failed: {e}") from e

    def resolve_device(self, name: str) -> str:
        if name not in ("auto", "cpu"):
            raise ConfigError(
                f"train.device = {name!r}, but scikit-learn runs on the CPU only; use "
                "device = 'cpu' or 'auto'"
            )
        return "cpu"


FRAMEWORK = SklearnFramework()
