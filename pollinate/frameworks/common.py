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
from typing import Any

import numpy as np

from pollinate.errors import ConfigError, DataError, UpdateRejected
from pollinate.types import Arrays, Config

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
