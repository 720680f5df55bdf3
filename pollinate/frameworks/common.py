"""What every framework adapter shares, with no ML framework imported.

- ``TrainSettings``: the [train] keys of a task's config, checked once, plus the client
  halves of strategies the server may ask for (``proximal_mu``, ``scaffold``,
  ``report_initial_loss``).
- ``worker_object``: the per-worker cache (build a model once per worker, never per client).
- Data helpers: (x, y) checks, NCHW → NHWC, integer labels → one-hot, ``batches``.
- ``refuse_strategies``: the error a framework without a gradient step gives for FedProx or
  SCAFFOLD.
- ``thread_limit``: the per-worker thread budget the simulation backends set.
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pollinate.client import ClientContext
from pollinate.errors import ConfigError, DataError, UpdateRejected
from pollinate.types import Arrays, Config, EvaluateRes, Metrics, TrainRes

OPTIMIZERS = ("sgd", "adam")
DEFAULT_EVAL_BATCH_SIZE = 256
SCAFFOLD_STATE_KEY = "scaffold_c"  # ctx.state entry holding the client's control variate


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings read and checked from a task's config.

    The [train] keys: ``epochs``, ``batch_size``, ``optimizer`` (sgd | adam), ``lr``,
    ``momentum``, ``weight_decay``, ``seed``, ``local_evaluation``. The client halves of
    strategies: ``proximal_mu`` (FedProx), ``scaffold`` (SCAFFOLD), ``report_initial_loss``.
    """

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    local_evaluation: bool = False
    proximal_mu: float = 0.0
    scaffold: bool = False
    report_initial_loss: bool = False

    @classmethod
    def from_config(cls, config: Config, seed: int = 0) -> TrainSettings:
        """Read the training keys of ``config`` (others are ignored); ConfigError if invalid.

        ``seed`` is the default when the config has none (the task's seed, ``ctx.seed``).
        """
        d = cls()
        optimizer = config.get("optimizer", d.optimizer)
        if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
            raise ConfigError(
                f"train config 'optimizer' is {optimizer!r}; use one of {', '.join(OPTIMIZERS)}"
            )
        s = cls(
            epochs=read_int(config, "epochs", d.epochs, minimum=1),
            batch_size=read_int(config, "batch_size", d.batch_size, minimum=1),
            optimizer=optimizer.lower(),
            lr=read_float(config, "lr", d.lr),
            momentum=read_float(config, "momentum", d.momentum),
            weight_decay=read_float(config, "weight_decay", d.weight_decay),
            seed=read_int(config, "seed", seed),
            local_evaluation=read_bool(config, "local_evaluation", d.local_evaluation),
            proximal_mu=read_float(config, "proximal_mu", d.proximal_mu),
            scaffold=read_bool(config, "scaffold", d.scaffold),
            report_initial_loss=read_bool(config, "report_initial_loss", d.report_initial_loss),
        )
        if not s.lr > 0:
            raise ConfigError(f"train config 'lr' must be > 0, got {s.lr}")
        if not 0 <= s.momentum < 1:
            raise ConfigError(f"train config 'momentum' must be in [0, 1), got {s.momentum}")
        if s.momentum and s.optimizer != "sgd":
            raise ConfigError(
                f"train config 'momentum' applies to optimizer 'sgd' only, got optimizer "
                f"{s.optimizer!r} with momentum {s.momentum}; set momentum = 0"
            )
        if not s.weight_decay >= 0:
            raise ConfigError(f"train config 'weight_decay' must be >= 0, got {s.weight_decay}")
        if not s.proximal_mu >= 0:
            raise ConfigError(f"train config 'proximal_mu' must be >= 0, got {s.proximal_mu}")
        return s

    @property
    def uses_strategy_terms(self) -> bool:
        """Whether training must change the gradient (FedProx or SCAFFOLD)."""
        return self.proximal_mu > 0 or self.scaffold


def read_int(config: Config, key: str, default: int, minimum: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"config {key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config {key!r} must be >= {minimum}, got {value}")
    return int(value)


def read_float(config: Config, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def read_bool(config: Config, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"config {key!r} must be true or false, got {value!r}")
    return bool(value)


def eval_batch_size(config: Config) -> int:
    return read_int(config, "batch_size", DEFAULT_EVAL_BATCH_SIZE, minimum=1)


def refuse_strategies(settings: TrainSettings, framework: str) -> None:
    """ConfigError for FedProx / SCAFFOLD on a framework that has no gradient step to change."""
    asked = [
        name
        for name, on in (
            ("FedProx (proximal_mu)", settings.proximal_mu > 0),
            ("SCAFFOLD (scaffold)", settings.scaffold),
        )
        if on
    ]
    if asked:
        raise ConfigError(
            f"the {framework} adapter cannot run {' and '.join(asked)}: it has no gradient step "
            "to add the strategy's term to; use strategy fedavg (or a torch, jax or keras model)"
        )


# --- per-worker cache ------------------------------------------------------------------------


def same_builder(a: object, b: object) -> bool:
    """Whether two model builders build the same model (survives pickling of partials)."""
    if a is b:
        return True
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return a.func is b.func and a.args == b.args and a.keywords == b.keywords
    return a == b


def worker_object(
    worker: dict[str, Any], key: str, builder: object, make: Callable[[], Any]
) -> Any:
    """``worker[key]``, made by ``make()`` on first use or when ``builder`` changed."""
    entry = worker.get(key)
    if entry is None or not same_builder(entry[0], builder):
        entry = (builder, make())
        worker[key] = entry
    return entry[1]


def thread_limit() -> int | None:
    """The worker's thread budget: ``OMP_NUM_THREADS`` as the simulation backends set it."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


# --- data ------------------------------------------------------------------------------------


def check_xy(data: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``data`` as (x, y) NumPy arrays with N examples each; DataError otherwise."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError(f"{what} data must be an (x, y) pair of arrays, got {type(data).__name__}")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if x.dtype == object or y.dtype == object:
        raise DataError(f"{what} data must be numeric arrays, got an object array")
    if y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{what} data: expected x with N examples and labels y of shape (N,), "
            f"got x {x.shape} and y {y.shape}"
        )
    return x, y


def int_labels(y: np.ndarray, what: str) -> np.ndarray:
    """Class indices as int64 (DataError for float labels)."""
    if y.dtype.kind not in "iu":
        raise DataError(f"{what} labels must be integer class indices, got {y.dtype}")
    return y.astype(np.int64, copy=False)


def channels_last(x: np.ndarray) -> np.ndarray:
    """NCHW images as NHWC (other ranks unchanged): what Keras and Flax convolutions take."""
    if x.ndim != 4:
        return x
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def channels_last_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A per-example (C, H, W) shape as (H, W, C); other shapes unchanged."""
    if len(shape) != 3:
        return shape
    return (shape[1], shape[2], shape[0])


def one_hot(y: np.ndarray, num_classes: int, dtype: Any = np.float32) -> np.ndarray:
    """Integer labels as one-hot rows."""
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    out = np.zeros((len(y), num_classes), dtype=dtype)
    out[np.arange(len(y)), y] = 1
    return out


def float_inputs(x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Inputs as floats of ``dtype`` (no copy when they already are)."""
    return np.asarray(x, dtype=dtype)


def batches(n: int, batch_size: int, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Index arrays of consecutive batches (of ``order`` when given)."""
    idx = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield idx[start : start + batch_size]


def check_arrays(
    arrays: Arrays, expected: list[tuple[tuple[int, ...], np.dtype]], what: str
) -> None:
    """UpdateRejected unless ``arrays`` match ``expected`` (shape, dtype kind) one for one."""
    if len(arrays) != len(expected):
        raise UpdateRejected(
            f"got {len(arrays)} arrays for a {what} with {len(expected)} variables; the arrays "
            "must come from the same architecture"
        )
    for i, (array, (shape, dtype)) in enumerate(zip(arrays, expected)):
        if not isinstance(array, np.ndarray):
            raise UpdateRejected(f"array {i} is a {type(array).__name__}, not a NumPy array")
        if tuple(array.shape) != tuple(shape):
            raise UpdateRejected(
                f"array {i} has shape {array.shape}, expected {tuple(shape)}; the arrays do "
                f"not match this {what}"
            )
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise UpdateRejected(f"array {i} has dtype {array.dtype}, expected {dtype}")


def scaffold_split(arrays: Arrays, size: int) -> tuple[Arrays, Arrays]:
    """SCAFFOLD's task arrays: the model's ``size`` arrays, then the server variate c."""
    if len(arrays) != 2 * size:
        raise UpdateRejected(
            f"SCAFFOLD sends the model and the server control variate c ({2 * size} arrays "
            f"for this model), got {len(arrays)}"
        )
    return list(arrays[:size]), list(arrays[size:])


def scaffold_client_update(
    x: Arrays, y: Arrays, c: Arrays, c_i: Arrays, steps: int, lr: float, trainable: list[bool]
) -> tuple[Arrays, Arrays]:
    """SCAFFOLD's client variate update, option II of Karimireddy et al. 2020 (arXiv 1910.06378).

    c_i⁺ = c_i − c + (x − y) / (K·η), with x the received model, y the trained one, K the
    local steps and η the learning rate. Returns (c_i⁺, Δc_i = c_i⁺ − c_i). Arrays that are
    not trained by gradient (``trainable`` False: BatchNorm statistics, counters) keep a zero
    variate.
    """
    if steps < 1:
        raise DataError("SCAFFOLD needs at least one local step")
    scale = 1.0 / (steps * lr)
    new, delta = [], []
    for xk, yk, ck, cik, learned in zip(x, y, c, c_i, trainable):
        if not learned:
            new.append(np.zeros_like(cik))
            delta.append(np.zeros_like(cik))
            continue
        plus = (cik - ck + (np.asarray(xk, np.float64) - yk) * scale).astype(cik.dtype)
        new.append(plus)
        delta.append((plus - cik).astype(cik.dtype))
    return new, delta


# --- one client, app and evaluator for every adapter -----------------------------------------


@dataclass(frozen=True)
class FitResult:
    """What a runner's local training reports."""

    loss: float  # mean training loss of the last epoch
    accuracy: float | None  # ... and accuracy (None for a regressor)
    num_steps: int  # optimizer steps taken
    lr: float  # the learning rate the steps used (SCAFFOLD's η)


class Runner(Protocol):
    """A framework's model held by one worker: load Arrays, train, evaluate, read Arrays.

    The generic ``FrameworkClient`` drives it; each adapter implements one.
    """

    supports_strategies: bool  # whether fit() takes FedProx / SCAFFOLD terms

    def prepare(self, data: Any, what: str) -> tuple[Any, np.ndarray]:
        """Client data (NCHW / flat float32 x, int64 y) in the framework's own layout."""
        ...

    def set_arrays(self, arrays: Arrays) -> None: ...

    def get_arrays(self) -> Arrays: ...

    def trainable(self) -> list[bool]:
        """Per array: whether gradient steps train it (False: BatchNorm statistics …)."""
        ...

    def fit(
        self,
        x: Any,
        y: np.ndarray,
        settings: TrainSettings,
        anchor: Arrays | None,
        correction: Arrays | None,
    ) -> FitResult:
        """Train from the loaded arrays. ``anchor``: FedProx's global model (gradient +=
        μ(w − anchor)); ``correction``: SCAFFOLD's c − c_i (gradient += correction)."""
        ...

    def evaluate(self, x: Any, y: np.ndarray, batch_size: int) -> tuple[float, Metrics]:
        """(mean loss, metrics) of the loaded arrays on (x, y)."""
        ...


class FrameworkClient:
    """A ``Client`` for any adapter's ``Runner``: the train/evaluate protocol, the example
    counts, the metrics (loss, accuracy, num_steps; local_loss / local_accuracy with
    ``local_evaluation``; initial_loss with ``report_initial_loss``) and the client halves of
    FedProx and SCAFFOLD (Karimireddy et al. 2020, arXiv 1910.06378: the task's arrays are
    the model then the server variate c; the client keeps c_i in ``state["scaffold_c"]`` and
    returns the model then Δc_i)."""

    def __init__(
        self,
        runner: Runner,
        framework: str,
        train_data: Any,
        test_data: Any | None,
        state: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.runner = runner
        self.framework = framework
        self.train_data = train_data
        self.test_data = test_data
        self.state = {} if state is None else state
        self.seed = seed

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        s = TrainSettings.from_config(config, seed=self.seed)
        if not self.runner.supports_strategies:
            refuse_strategies(s, self.framework)
        x, y = self.runner.prepare(self.train_data, "train")
        if len(y) == 0:
            raise DataError("this client has no training examples")
        c: Arrays | None = None
        if s.scaffold:
            arrays, c = scaffold_split(arrays, len(self.runner.trainable()))
        self.runner.set_arrays(arrays)
        metrics: Metrics = {}
        if s.report_initial_loss:
            metrics["initial_loss"] = self.runner.evaluate(x, y, DEFAULT_EVAL_BATCH_SIZE)[0]
        c_i: Arrays | None = None
        correction: Arrays | None = None
        if c is not None:
            saved = self.state.get(SCAFFOLD_STATE_KEY)
            c_i = [np.zeros_like(a) for a in c] if saved is None else list(saved)
            check_arrays(c_i, [(a.shape, a.dtype) for a in c], "SCAFFOLD client variate")
            correction = [ck - cik for ck, cik in zip(c, c_i)]
        anchor = list(arrays) if s.proximal_mu > 0 else None
        fit = self.runner.fit(x, y, s, anchor, correction)
        metrics["loss"] = fit.loss
        if fit.accuracy is not None:
            metrics["accuracy"] = fit.accuracy
        metrics["num_steps"] = fit.num_steps
        out = self.runner.get_arrays()
        if c is not None and c_i is not None:
            new_c_i, delta = scaffold_client_update(
                arrays, out, c, c_i, fit.num_steps, fit.lr, self.runner.trainable()
            )
            self.state[SCAFFOLD_STATE_KEY] = new_c_i
            out = out + delta
        if s.local_evaluation and self.test_data is not None:
            tx, ty = self.runner.prepare(self.test_data, "test")
            if len(ty):
                loss, extra = self.runner.evaluate(tx, ty, max(s.batch_size, 256))
                metrics["local_loss"] = loss
                metrics.update({f"local_{k}": v for k, v in extra.items()})
        return TrainRes(out, num_examples=len(y), metrics=metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        if self.test_data is None:
            raise DataError(
                "this client has no test data to evaluate on (give clients a test part, "
                "e.g. client_test_fraction > 0)"
            )
        x, y = self.runner.prepare(self.test_data, "test")
        if len(y) == 0:
            raise DataError("this client's test data is empty")
        self.runner.set_arrays(arrays)
        loss, metrics = self.runner.evaluate(x, y, eval_batch_size(config))
        return EvaluateRes(loss=loss, num_examples=len(y), metrics=metrics)


class FrameworkApp:
    """A picklable ``ClientFn``: a ``FrameworkClient`` on one client's part of a federated
    data set (``client_train(cid)``, ``client_test(cid)``). Each worker makes its runner (the
    model, compiled steps …) once, in ``ctx.worker``, and reuses it for every client.

    Adapters subclass it with their ``framework`` name and ``make_runner(model_fn, device)``
    (a module-level function, so the process backend's workers import the adapter early).
    """

    framework = ""

    def __init__(self, model_fn: Any, data: Any, device: str = "cpu") -> None:
        self.model_fn = model_fn
        self.data = data
        self.device = device

    @staticmethod
    def make_runner(model_fn: Any, device: str) -> Runner:
        raise NotImplementedError

    def __call__(self, ctx: ClientContext) -> FrameworkClient:
        test = self.data.client_test(ctx.client_id)
        return FrameworkClient(
            self.worker_runner(ctx.worker),
            self.framework,
            self.data.client_train(ctx.client_id),
            test if len(test[1]) else None,
            state=ctx.state,
            seed=ctx.seed,
        )

    def worker_runner(self, worker: dict[str, Any]) -> Runner:
        """This worker's runner, made on first use (or when the model builder changed)."""
        key = f"{self.framework}_runner:{self.device}"
        runner: Runner = worker_object(
            worker, key, self.model_fn, lambda: self.make_runner(self.model_fn, self.device)
        )
        return runner


class FrameworkEvaluator:
    """A picklable centralized evaluator: ``(arrays) -> (loss, metrics)`` on (x, y); makes
    its runner once (``make_runner`` as in ``FrameworkApp``)."""

    def __init__(
        self,
        model_fn: Any,
        x: Any,
        y: Any,
        device: str,
        make_runner: Callable[[Any, str], Runner],
        batch_size: int = 1024,
    ) -> None:
        if len(x) != len(y) or len(y) == 0:
            raise DataError(
                f"centralized evaluation needs x and y of the same non-zero length, "
                f"got {len(x)} and {len(y)}"
            )
        self.model_fn = model_fn
        self.x = x
        self.y = y
        self.device = device
        self.make_runner = make_runner
        self.batch_size = batch_size
        self._runner: Runner | None = None
        self._data: tuple[Any, np.ndarray] | None = None

    def __call__(self, arrays: Arrays) -> tuple[float, Metrics]:
        if self._runner is None:
            self._runner = self.make_runner(self.model_fn, self.device)
        if self._data is None:
            self._data = self._runner.prepare((self.x, self.y), "server test")
        self._runner.set_arrays(arrays)
        return self._runner.evaluate(*self._data, self.batch_size)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runner"] = None  # remade on first use after unpickling
        state["_data"] = None
        return state
