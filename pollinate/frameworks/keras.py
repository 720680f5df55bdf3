"""The Keras 3 adapter: any backend (``KERAS_BACKEND``: tensorflow by default, jax, torch).

Built-in models ([model] name), ending in a softmax: ``cnn`` (the seed blog's model: Conv 32
3×3 + ReLU, max-pool 2, Conv 64 3×3 + ReLU, max-pool 2, Flatten, Dense 128 + ReLU, Dense
classes), ``mlp`` (Dense + ReLU per [model] hidden size) and ``logreg``. They are compiled
here with categorical cross-entropy and the [train] optimizer (sgd with momentum, or adam;
lr; weight_decay), and recompiled when a task asks for another optimizer.

``"package.module:function"`` returns a ``keras.Model``. A function without parameters
(the blog's ``create_model()``) is called as it is; others receive ``input_shape`` (per
example, channels-last ``(H, W, C)``), ``num_classes`` and ``hidden`` where they accept
them. A model the function **compiled** keeps its optimizer and loss (the [train] optimizer,
lr, momentum and weight_decay are not applied to it; epochs, batch_size and seed are); an
uncompiled one is compiled as the built-ins, and must end in a softmax.

Local training is ``model.fit``, one call per epoch on an order drawn from the task's seed.
Labels arrive as int64 class indices and are one-hot encoded here when the loss is a
categorical one (``categorical_crossentropy``); images arrive NCHW and are transposed to
NHWC (unless ``keras.config.image_data_format()`` is channels_first). The optimizer's state
(momentum, Adam's moments, ``iterations``) is reset for every task; ``num_steps`` is its
``iterations`` after training. Random layers (Dropout …) are seeded from the task's seed, so
a task trains the same whichever worker runs it and whatever it ran before.

Arrays: ``model.get_weights()``, every variable in ``model.weights`` order (trainable and
not, e.g. BatchNorm's moving statistics).

FedProx and SCAFFOLD: each trainable variable w gets a regularizer whose value is 0 and
whose gradient is μ(w − w_global) + (c − c_i) (``ops.sum((w − sg(w)) · g)`` with sg the stop
gradient), so ``model.fit`` applies the strategy's gradient term with any optimizer and the
reported loss stays the data loss. A variable's own regularizer is kept and added to it.

In a process or Ray worker (``OMP_NUM_THREADS`` set) TensorFlow's and XLA's thread pools
are limited to that many threads, when this module is imported first.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from pollinate.frameworks.common import thread_limit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if thread_limit():
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(thread_limit()))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    if "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={thread_limit()}"
        ).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from pollinate.client import ClientFn  # noqa: E402
from pollinate.config import ModelSection  # noqa: E402
from pollinate.errors import ConfigError  # noqa: E402
from pollinate.frameworks.base import (  # noqa: E402
    Evaluator,
    ModelBuilder,
    call_user_model,
    check_model_name,
    is_user_model,
    mismatch_error,
)
from pollinate.frameworks.common import (  # noqa: E402
    FitResult,
    FrameworkApp,
    FrameworkEvaluator,
    TrainSettings,
    channels_last,
    channels_last_shape,
    check_arrays,
    check_xy,
    int_labels,
    one_hot,
)
from pollinate.frameworks.devices import resolve_device  # noqa: E402
from pollinate.types import Arrays, Metrics  # noqa: E402

MODEL_NAMES = ("logreg", "mlp", "cnn")
CNN_MIN_SIZE = 10
BUILTIN_LOSS = "categorical_crossentropy"
SEED_STATE = "seed_generator_state"  # the variable of a layer's keras.random.SeedGenerator


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]
) -> keras.Model:
    """The Keras model ``name`` (uncompiled for the built-ins) for ``input_shape`` examples."""
    layers = keras.layers
    if is_user_model(name):
        offered = {"input_shape": input_shape, "num_classes": num_classes, "hidden": hidden}
        model = call_user_model(name, offered)
        if not isinstance(model, keras.Model):
            raise ConfigError(
                f"model {name!r} must return a keras.Model, got {type(model).__name__}"
            )
        return model
    stack: list[Any] = [keras.Input(shape=input_shape)]
    if name == "cnn":
        if len(input_shape) != 3 or min(input_shape[:2]) < CNN_MIN_SIZE:
            raise ConfigError(
                f"model 'cnn' needs images of at least {CNN_MIN_SIZE}x{CNN_MIN_SIZE} pixels, "
                f"got examples of shape {input_shape}; use 'mlp' or 'logreg'"
            )
        stack += [
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
        ]
    else:
        stack.append(layers.Flatten())
        if name == "mlp":
            stack += [layers.Dense(size, activation="relu") for size in hidden]
    stack.append(layers.Dense(num_classes, activation="softmax"))
    return keras.Sequential(stack)


def _is_categorical(loss: Any) -> bool:
    """Whether ``loss`` wants one-hot labels (categorical, not sparse, cross-entropy …)."""
    name = (
        loss
        if isinstance(loss, str)
        else getattr(loss, "name", None) or getattr(loss, "__name__", type(loss).__name__)
    )
    name = str(name).lower()
    return "categorical" in name and "sparse" not in name


def _optimizer(s: TrainSettings) -> keras.optimizers.Optimizer:
    wd = s.weight_decay or None
    if s.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=s.lr, weight_decay=wd)
    return keras.optimizers.SGD(learning_rate=s.lr, momentum=s.momentum, weight_decay=wd)


class _StrategyTerm(keras.regularizers.Regularizer):  # type: ignore[misc]
    """Value 0, gradient μ(w − anchor) + correction (plus the variable's own regularizer)."""

    def __init__(self, mu: Any, anchor: Any, correction: Any, own: Any = None) -> None:
        self.mu, self.anchor, self.correction, self.own = mu, anchor, correction, own

    def __call__(self, w: Any) -> Any:
        fixed = ops.stop_gradient(w)
        grad = self.mu * (fixed - self.anchor) + self.correction
        term = ops.sum((w - fixed) * grad)
        return term if self.own is None else term + self.own(w)


class KerasRunner:
    """One worker's Keras model: compile, Arrays in and out, fit and evaluate."""

    supports_strategies = True

    def __init__(self, model: keras.Model, device: str = "cpu") -> None:
        self.model = model
        self.device = device.replace("cuda", "gpu")
        if ":" not in self.device:
            self.device += ":0"
        self.owns_compile = not model.compiled
        self._compiled_as: tuple[str, float, float] | None = None
        if self.owns_compile:
            self._compile(TrainSettings())
        else:  # keep the user's optimizer and loss; add an accuracy we can read
            self._recompile(model.optimizer, model.loss)
        self._layout = [(tuple(w.shape), np.dtype(w.dtype)) for w in model.get_weights()]
        trainable = {id(v) for v in model.trainable_weights}
        self._trainable = [id(v) in trainable for v in model.weights]
        self.num_classes = int(model.output_shape[-1])
        # the random state of layers such as Dropout (not part of the Arrays)
        self._seed_states = [v for v in model.variables if v.path.endswith(SEED_STATE)]
        self._terms: list[tuple[Any, Any]] | None = None  # (anchor, correction) per variable
        self._mu: Any = None

    # -- compilation -------------------------------------------------------------------------

    def _recompile(self, optimizer: Any, loss: Any) -> None:
        self.one_hot = _is_categorical(loss)
        metric = (
            keras.metrics.CategoricalAccuracy
            if self.one_hot
            else (keras.metrics.SparseCategoricalAccuracy)
        )
        self.model.compile(optimizer=optimizer, loss=loss, metrics=[metric(name="accuracy")])
        optimizer.build(self.model.trainable_variables)
        self._fresh_state = [ops.convert_to_numpy(v) for v in optimizer.variables]

    def _compile(self, s: TrainSettings) -> None:
        self._recompile(_optimizer(s), BUILTIN_LOSS)
        self._compiled_as = (s.optimizer, s.momentum, s.weight_decay)

    def _start_task(self, s: TrainSettings) -> None:
        """A fresh optimizer state for the task (and the task's optimizer when we compile)."""
        if self.owns_compile and self._compiled_as != (s.optimizer, s.momentum, s.weight_decay):
            self._compile(s)
        optimizer = self.model.optimizer
        for variable, value in zip(optimizer.variables, self._fresh_state):
            variable.assign(value)
        if self.owns_compile:
            optimizer.learning_rate = s.lr

    def _install_terms(self) -> None:
        """Attach the FedProx / SCAFFOLD regularizer to every trainable variable (once)."""
        self._mu = keras.Variable(0.0, trainable=False, name="proximal_mu")
        self._terms = []
        for v in self.model.trainable_weights:
            anchor = keras.Variable(np.zeros(v.shape, v.dtype), trainable=False)
            correction = keras.Variable(np.zeros(v.shape, v.dtype), trainable=False)
            v.regularizer = _StrategyTerm(self._mu, anchor, correction, v.regularizer)
            self._terms.append((anchor, correction))
        self.model.train_function = None  # traced again with the terms

    def _set_terms(self, mu: float, anchor: Arrays | None, correction: Arrays | None) -> None:
        if self._terms is None:
            if anchor is None and correction is None:
                return
            self._install_terms()
        assert self._terms is not None
        self._mu.assign(mu)
        trained = [a for a, t in zip(anchor or [], self._trainable) if t]
        corr = [c for c, t in zip(correction or [], self._trainable) if t]
        for i, (a_var, c_var) in enumerate(self._terms):
            a_var.assign(trained[i] if anchor is not None else np.zeros(a_var.shape, a_var.dtype))
            c_var.assign(corr[i] if correction is not None else np.zeros(c_var.shape, c_var.dtype))
        if keras.backend.backend() == "jax":  # jax traces variables outside the model as constants
            self.model.train_function = None

    def _seed_layers(self, seed: int) -> None:
        """Seed every random layer (Dropout …) from the task's seed, so a task's training
        does not depend on what the worker trained before. (``keras.utils.set_random_seed``
        does not reach layers already built, and its ``tf.random.set_seed`` clears
        TensorFlow's kernel caches: a fifth of a small client's training time.)"""
        for k, variable in enumerate(self._seed_states):
            start = np.random.SeedSequence([seed, k]).generate_state(1)[0] % 2**31
            variable.assign(np.array([start, 0], dtype=variable.dtype))

    # -- arrays and data ---------------------------------------------------------------------

    def get_arrays(self) -> Arrays:
        return [np.array(w) for w in self.model.get_weights()]

    def set_arrays(self, arrays: Arrays) -> None:
        check_arrays(arrays, self._layout, "Keras model")
        self.model.set_weights([np.asarray(a, d) for a, (_, d) in zip(arrays, self._layout)])

    def trainable(self) -> list[bool]:
        return list(self._trainable)

    def prepare(self, data: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = check_xy(data, what)
        x = np.asarray(x, np.float32)
        if keras.config.image_data_format() == "channels_last":
            x = channels_last(x)
        return x, int_labels(y, what)

    def _labels(self, y: np.ndarray) -> np.ndarray:
        return one_hot(y, self.num_classes) if self.one_hot else y

    # -- training and evaluation -------------------------------------------------------------

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        settings: TrainSettings,
        anchor: Arrays | None,
        correction: Arrays | None,
    ) -> FitResult:
        s = settings
        self._seed_layers(s.seed)
        self._start_task(s)
        self._set_terms(s.proximal_mu, anchor, correction)
        labels = self._labels(y)
        rng = np.random.default_rng(s.seed)
        history: dict[str, list[float]] = {}
        with keras.device(self.device):
            for _ in range(s.epochs):
                order = rng.permutation(len(y))
                history = self.model.fit(
                    x[order],
                    labels[order],
                    batch_size=s.batch_size,
                    epochs=1,
                    shuffle=False,
                    verbose=0,
                ).history
        optimizer = self.model.optimizer
        lr = float(ops.convert_to_numpy(optimizer.learning_rate))
        steps = int(ops.convert_to_numpy(optimizer.iterations))
        return FitResult(history["loss"][-1], history["accuracy"][-1], steps, lr)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, Metrics]:
        with keras.device(self.device):
            result = self.model.evaluate(
                x, self._labels(y), batch_size=batch_size, verbose=0, return_dict=True
            )
        return float(result["loss"]), {"accuracy": float(result["accuracy"])}


def make_runner(model_fn: ModelBuilder, device: str) -> KerasRunner:
    model = model_fn()
    if not isinstance(model, keras.Model):
        raise ConfigError(f"a Keras model builder must return a keras.Model, got {model!r}")
    return KerasRunner(model, device)


class KerasApp(FrameworkApp):
    """The Keras ``ClientFn``: one compiled model per worker, reused for every client."""

    framework = "keras"
    make_runner = staticmethod(make_runner)


def gpu_count() -> int:
    """CUDA GPUs the Keras backend sees."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return len([d for d in jax.devices() if d.platform in ("gpu", "cuda")])
    if backend == "torch":
        import torch

        return int(torch.cuda.device_count())
    return 0


class KerasFramework:
    """Keras 3 models trained with ``model.fit``."""

    name = "keras"
    model_names = MODEL_NAMES

    def model_fn(
        self, model: ModelSection, input_shape: tuple[int, ...], num_classes: int
    ) -> ModelBuilder:
        check_model_name(model.name, "keras", MODEL_NAMES)
        shape = tuple(input_shape)
        if keras.config.image_data_format() == "channels_last":
            shape = channels_last_shape(shape)
        return functools.partial(build_model, model.name, shape, num_classes, tuple(model.hidden))

    def client_fn(self, model_fn: ModelBuilder, data: Any, device: str) -> ClientFn:
        return KerasApp(model_fn, data, device)

    def evaluator(self, model_fn: ModelBuilder, x: Any, y: Any, device: str) -> Evaluator:
        return FrameworkEvaluator(model_fn, x, y, device, make_runner)

    def initial_arrays(self, model_fn: ModelBuilder, seed: int) -> Arrays:
        keras.utils.set_random_seed(seed % 2**32)
        return [np.array(w) for w in model_fn().get_weights()]

    def check(self, model_fn: ModelBuilder, x: Any, y: Any, num_classes: int) -> None:
        x = np.asarray(x)
        name = getattr(model_fn, "args", ("model",))[0]
        model = model_fn()
        try:
            xs = np.asarray(x, np.float32)
            if keras.config.image_data_format() == "channels_last":
                xs = channels_last(xs)
            out = ops.convert_to_numpy(model(xs, training=False))
        except Exception as e:
            raise mismatch_error(name, x, num_classes, f"running it failed: {e}") from e
        if tuple(out.shape) != (len(x), num_classes):
            raise mismatch_error(
                name,
                x,
                num_classes,
                f"it returns {tuple(out.shape)} for the batch, expected ({len(x)}, "
                f"{num_classes}): one probability per class",
            )

    def resolve_device(self, name: str) -> str:
        mps = keras.backend.backend() == "torch" and _torch_mps()
        return resolve_device(name, f"keras ({keras.backend.backend()})", gpu_count(), mps=mps)


def _torch_mps() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


FRAMEWORK = KerasFramework()
