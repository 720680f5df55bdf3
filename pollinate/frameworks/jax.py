"""The JAX adapter: Flax (linen) models trained with optax by one jit-compiled step.

Built-in models ([model] name), all returning logits: ``logreg`` (flatten, Dense),
``mlp`` (Dense + ReLU per [model] hidden size, Dense), ``cnn`` (the seed blog's CNN: Conv 32
3×3 + ReLU, max-pool 2, Conv 64 3×3 + ReLU, max-pool 2, Dense 128 + ReLU, Dense classes;
valid padding). ``"package.module:function"`` returns a ``flax.linen.Module`` that maps a
batch of channels-last inputs to logits; it receives ``input_shape`` (per example, e.g.
``(28, 28, 1)``), ``num_classes`` and ``hidden`` where it accepts them. A module whose
``__call__`` takes ``train`` (or ``training``) is told whether it trains (dropout,
BatchNorm); dropout draws from the ``"dropout"`` RNG stream.

Arrays: every leaf of the variables (``params`` and the other collections, e.g.
BatchNorm's ``batch_stats``) in ``jax.tree_util`` order (collections, then layers and
leaves, sorted by name), as NumPy arrays.

Training: softmax cross-entropy; the [train] optimizer as optax's ``sgd`` (momentum) or
``adam``, with weight decay added to the gradient (coupled L2, as torch's). Each worker
compiles one train function, the step scanned over ``CHUNK`` batches (one call trains that
many, so small models do not pay Python's dispatch at every batch; the last chunk is padded
with batches that do not train), and one evaluation step, and reuses them for every client:
batches are padded to ``batch_size`` (padding weighs 0), so clients of any size share the
compiled functions, and the optimizer's fresh state is made once. The step adds FedProx's
μ(w − w_global) and SCAFFOLD's c − c_i to the gradient when the server asks for them; terms
that are off (momentum 0, no weight decay) are not compiled in.
Images arrive NCHW and are transposed to NHWC here.

In a process or Ray worker (``OMP_NUM_THREADS`` set) XLA's CPU thread pool is limited to
that many threads, when this module is imported before jax is initialized.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any

from pollinate.frameworks.common import thread_limit

if thread_limit() and "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false"
        + f" intra_op_parallelism_threads={thread_limit()}"
    ).strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

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
)
from pollinate.frameworks.devices import resolve_device  # noqa: E402
from pollinate.types import Arrays, Metrics  # noqa: E402

MODEL_NAMES = ("logreg", "mlp", "cnn")
CNN_MIN_SIZE = 10
CHUNK = 16  # batches per compiled call of the scanned train step


class LogReg(nn.Module):
    """Flatten, then one dense layer (multinomial logistic regression)."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class MLP(nn.Module):
    """Flatten, Dense + ReLU per hidden size, Dense."""

    hidden: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for size in self.hidden:
            x = nn.relu(nn.Dense(size)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """The seed blog's CNN on channels-last images."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(self.num_classes)(x)


@dataclass(frozen=True)
class FlaxModel:
    """What a JAX model builder makes: a linen module and its per-example input shape."""

    module: nn.Module
    input_shape: tuple[int, ...]  # channels-last


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]
) -> FlaxModel:
    """The Flax model ``name`` for channels-last ``input_shape`` and ``num_classes``."""
    module: Any
    if is_user_model(name):
        offered = {"input_shape": input_shape, "num_classes": num_classes, "hidden": hidden}
        module = call_user_model(name, offered)
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"model {name!r} must return a flax.linen.Module, got {type(module).__name__}"
            )
    elif name == "logreg":
        module = LogReg(num_classes)
    elif name == "mlp":
        module = MLP(tuple(hidden), num_classes)
    else:
        if len(input_shape) != 3 or min(input_shape[:2]) < CNN_MIN_SIZE:
            raise ConfigError(
                f"model 'cnn' needs images of at least {CNN_MIN_SIZE}x{CNN_MIN_SIZE} pixels, "
                f"got examples of shape {input_shape}; use 'mlp' or 'logreg'"
            )
        module = CNN(num_classes)
    return FlaxModel(module, tuple(input_shape))


def _train_flag(module: nn.Module) -> str | None:
    """The name of the ``__call__`` argument that says whether the module trains."""
    try:
        names = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in ("train", "training") if n in names), None)


def jax_device(device: str) -> Any:
    """The jax device for a resolved device string."""
    if device.startswith("cuda"):
        return jax.devices("gpu")[int(device.partition(":")[2] or 0)]
    return jax.devices("cpu")[0]


class JaxRunner:
    """One worker's Flax model: its variables, compiled steps, Arrays in and out."""

    supports_strategies = True

    def __init__(self, model: FlaxModel, device: str = "cpu", seed: int = 0) -> None:
        self.module = model.module
        self.input_shape = model.input_shape
        self.device = jax_device(device)
        self.flag = _train_flag(self.module)
        dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
        with jax.default_device(self.device):
            variables = self.module.init(jax.random.PRNGKey(seed), dummy, **self._kw(False))
        variables = dict(variables)
        leaves, self.treedef = jax.tree_util.tree_flatten(variables)
        paths = jax.tree_util.tree_flatten_with_path(variables)[0]
        self._trainable = [str(getattr(path[0], "key", "")) == "params" for path, _ in paths]
        self._layout = [(tuple(leaf.shape), np.dtype(leaf.dtype)) for leaf in leaves]
        self.collections = tuple(k for k in variables if k != "params")
        self.variables = variables
        self._train_steps: dict[tuple[str, bool, bool, bool, bool], Any] = {}
        self._eval_step = jax.jit(self._evaluate_batch)

    def _kw(self, train: bool) -> dict[str, bool]:
        return {self.flag: train} if self.flag else {}

    # -- arrays ------------------------------------------------------------------------------

    def get_arrays(self) -> Arrays:
        return [np.array(leaf) for leaf in jax.tree_util.tree_leaves(self.variables)]

    def set_arrays(self, arrays: Arrays) -> None:
        check_arrays(arrays, self._layout, "Flax model")
        leaves = jax.device_put(
            [np.asarray(a, dtype) for a, (_, dtype) in zip(arrays, self._layout)], self.device
        )
        self.variables = dict(jax.tree_util.tree_unflatten(self.treedef, leaves))

    def trainable(self) -> list[bool]:
        return list(self._trainable)

    def prepare(self, data: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = check_xy(data, what)
        labels = int_labels(y, what)
        if not jax.config.jax_enable_x64:  # what jax would convert them to at every step
            labels = labels.astype(np.int32)
        return channels_last(np.asarray(x, np.float32)), labels

    # -- compiled steps ----------------------------------------------------------------------

    def _loss(self, params: Any, state: Any, x: Any, y: Any, mask: Any, rng: Any) -> Any:
        variables = {"params": params, **state}
        if self.collections:
            logits, new_state = self.module.apply(
                variables,
                x,
                mutable=list(self.collections),
                rngs={"dropout": rng},
                **self._kw(True),
            )
        else:
            logits = self.module.apply(variables, x, rngs={"dropout": rng}, **self._kw(True))
            new_state = state
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        n = jnp.maximum(mask.sum(), 1.0)
        return (losses * mask).sum() / n, (logits, dict(new_state))

    def _make_train_step(self, tx: Any, decay: bool, prox: bool, scaffold: bool) -> Any:
        def step(params, state, opt_state, x, y, mask, key, totals, wd, mu, anchor, corr):  # type: ignore[no-untyped-def]
            steps, loss_sum, correct = totals
            rng = jax.random.fold_in(key, steps)
            (loss, (logits, new_state)), grads = jax.value_and_grad(self._loss, has_aux=True)(
                params, state, x, y, mask, rng
            )
            if decay:  # coupled L2, as torch's weight_decay
                grads = jax.tree_util.tree_map(lambda g, p: g + wd * p, grads, params)
            if prox:  # FedProx: ∇ of μ/2 ‖w − w_global‖²
                grads = jax.tree_util.tree_map(
                    lambda g, p, a: g + mu * (p - a), grads, params, anchor
                )
            if scaffold:  # SCAFFOLD: g + c − c_i
                grads = jax.tree_util.tree_map(lambda g, c: g + c, grads, corr)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            hits = ((logits.argmax(-1) == y) * mask).sum()
            totals = (steps + 1, loss_sum + loss * mask.sum(), correct + hits)
            return params, new_state, opt_state, totals

        def steps(
            params, state, opt_state, xs, ys, masks, active, key, totals, wd, mu, anchor, corr
        ):  # type: ignore[no-untyped-def]
            """``step`` over a chunk of batches; inactive ones (padding the last chunk)
            leave everything as it is."""

            def body(carry, batch):  # type: ignore[no-untyped-def]
                x, y, mask, on = batch

                def train(carry):  # type: ignore[no-untyped-def]
                    params, state, opt_state, totals = carry
                    return step(
                        params, state, opt_state, x, y, mask, key, totals, wd, mu, anchor, corr
                    )

                return jax.lax.cond(on, train, lambda carry: carry, carry), None

            carry = (params, state, opt_state, totals)
            carry, _ = jax.lax.scan(body, carry, (xs, ys, masks, active))
            return carry

        return jax.jit(steps)

    def _train_step(self, s: TrainSettings, prox: bool, scaffold: bool) -> tuple[Any, Any]:
        """The compiled step for these settings and the optimizer's fresh state (made once:
        zeros of the parameters' shapes, immutable, so every task starts from the same one).

        Terms that are off (no momentum, no weight decay, no FedProx or SCAFFOLD) are left
        out of the compiled step rather than computed with a zero factor; the values (lr,
        momentum, decay, μ) are inputs, so a run compiles one step.
        """
        momentum = s.optimizer == "sgd" and s.momentum != 0
        key = (s.optimizer, momentum, s.weight_decay != 0, prox, scaffold)
        if key not in self._train_steps:
            if s.optimizer == "adam":
                tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.001)
            else:
                tx = optax.inject_hyperparams(optax.sgd)(
                    learning_rate=0.01, momentum=0.9 if momentum else None
                )
            fresh = jax.device_put(tx.init(self.variables["params"]), self.device)
            step = self._make_train_step(tx, s.weight_decay != 0, prox, scaffold)
            self._train_steps[key] = (fresh, step)
        return self._train_steps[key]  # type: ignore[no-any-return]

    def _evaluate_batch(self, variables: Any, x: Any, y: Any, mask: Any) -> Any:
        logits = self.module.apply(variables, x, **self._kw(False))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return (losses * mask).sum(), ((logits.argmax(-1) == y) * mask).sum()

    # -- training and evaluation -------------------------------------------------------------

    def _tree(self, arrays: Arrays) -> Any:
        """Model-shaped Arrays as the ``params`` tree (other collections dropped)."""
        leaves = [np.asarray(a, dtype) for a, (_, dtype) in zip(arrays, self._layout)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)["params"]

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        settings: TrainSettings,
        anchor: Arrays | None,
        correction: Arrays | None,
    ) -> FitResult:
        s = settings
        fresh, step = self._train_step(s, anchor is not None, correction is not None)
        params = self.variables["params"]
        state = {k: self.variables[k] for k in self.collections}
        hyper = {"learning_rate": np.float32(s.lr)}
        if "momentum" in fresh.hyperparams:
            hyper["momentum"] = np.float32(s.momentum)
        # the task's values, committed to the device (like the step's outputs, so the first
        # call hits the compiled step's cache) in one transfer
        hyper, wd, mu, anchor, corr = jax.device_put(
            (
                hyper,
                np.float32(s.weight_decay),
                np.float32(s.proximal_mu),
                self._tree(anchor) if anchor is not None else None,
                self._tree(correction) if correction is not None else None,
            ),
            self.device,
        )
        opt_state = fresh._replace(hyperparams={**fresh.hyperparams, **hyper})
        extra = (wd, mu, anchor, corr)
        rng = np.random.default_rng(s.seed)
        key = jax.device_put(jax.random.PRNGKey(s.seed % 2**32), self.device)
        n, size = len(y), s.batch_size
        # CHUNK batches per compiled call (a scan of the step); the RNG stream's step count
        # and the epoch's loss and accuracy sums are carried on the device and read once
        count: Any = np.int32(0)
        totals: Any = None
        for _ in range(s.epochs):
            totals = jax.device_put((count, np.float32(0), np.float32(0)), self.device)
            idx, masks, active = _chunks(rng.permutation(n), size)
            for c in range(len(idx)):
                params, state, opt_state, totals = step(
                    params,
                    state,
                    opt_state,
                    x[idx[c]],
                    y[idx[c]],
                    masks[c],
                    active[c],
                    key,
                    totals,
                    *extra,
                )
            count = totals[0]
        self.variables = {"params": params, **state}
        steps, loss_sum, correct = (float(t) for t in totals)  # the last epoch's sums
        return FitResult(loss_sum / n, correct / n, int(steps), s.lr)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, Metrics]:
        loss_sum, correct = 0.0, 0.0
        for xb, yb, mask in _padded(x, y, batch_size, np.arange(len(y))):
            batch_loss, batch_correct = self._eval_step(self.variables, xb, yb, mask)
            loss_sum += batch_loss
            correct += batch_correct
        return float(loss_sum) / len(y), {"accuracy": float(correct) / len(y)}


def _chunks(order: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``order`` as chunks of ``CHUNK`` batches of ``size``: (indices, example weights,
    whether each batch trains), shaped (chunks, CHUNK, size), (chunks, CHUNK, size) and
    (chunks, CHUNK). The last batch is padded with its own examples weighing 0 (as
    ``_padded``), the last chunk with batches that do not train."""
    n = len(order)
    batches = -(-n // size)
    chunks = -(-batches // CHUNK)
    idx = np.zeros((chunks * CHUNK, size), order.dtype)
    masks = np.zeros((chunks * CHUNK, size), np.float32)
    full = n // size
    idx[:full] = order[: full * size].reshape(full, size)
    masks[:full] = 1.0
    if full < batches:  # the last, short batch
        idx[full] = np.resize(order[full * size :], size)
        masks[full, : n - full * size] = 1.0
    active = np.arange(chunks * CHUNK) < batches
    return (
        idx.reshape(chunks, CHUNK, size),
        masks.reshape(chunks, CHUNK, size),
        active.reshape(chunks, CHUNK),
    )


def _padded(x: np.ndarray, y: np.ndarray, batch_size: int, order: np.ndarray) -> Any:
    """Batches of exactly ``batch_size`` (the last padded with examples of weight 0), so one
    compiled step serves every batch of every client."""
    size = batch_size
    full = np.ones(size, np.float32)
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        mask = full
        if len(idx) < size:
            mask = np.ones(size, np.float32)
            mask[len(idx) :] = 0.0
            idx = np.resize(idx, size)  # repeats real examples, weighted 0
        yield x[idx], y[idx], mask


def make_runner(model_fn: ModelBuilder, device: str) -> JaxRunner:
    model = model_fn()
    if not isinstance(model, FlaxModel):
        raise ConfigError(f"a JAX model builder must return a FlaxModel, got {model!r}")
    return JaxRunner(model, device)


class JaxApp(FrameworkApp):
    """The JAX ``ClientFn``: one Flax model and compiled step per worker."""

    framework = "jax"
    make_runner = staticmethod(make_runner)


class JaxFramework:
    """Flax (linen) models trained with optax."""

    name = "jax"
    model_names = MODEL_NAMES

    def model_fn(
        self, model: ModelSection, input_shape: tuple[int, ...], num_classes: int
    ) -> ModelBuilder:
        check_model_name(model.name, "jax", MODEL_NAMES)
        shape = channels_last_shape(tuple(input_shape))
        return functools.partial(build_model, model.name, shape, num_classes, tuple(model.hidden))

    def client_fn(self, model_fn: ModelBuilder, data: Any, device: str) -> ClientFn:
        return JaxApp(model_fn, data, device)

    def evaluator(self, model_fn: ModelBuilder, x: Any, y: Any, device: str) -> Evaluator:
        return FrameworkEvaluator(model_fn, x, y, device, make_runner)

    def initial_arrays(self, model_fn: ModelBuilder, seed: int) -> Arrays:
        return JaxRunner(model_fn(), "cpu", seed=seed).get_arrays()

    def check(self, model_fn: ModelBuilder, x: Any, y: Any, num_classes: int) -> None:
        x = np.asarray(x)
        model = model_fn()
        name = getattr(model_fn, "args", ("model",))[0]
        try:
            runner = JaxRunner(model, "cpu")
            xs, _ = runner.prepare((x, np.asarray(y)), "sample")
            out = runner.module.apply(runner.variables, xs, **runner._kw(False))
        except Exception as e:
            raise mismatch_error(name, x, num_classes, f"running it failed: {e}") from e
        if tuple(out.shape) != (len(x), num_classes):
            raise mismatch_error(
                name,
                x,
                num_classes,
                f"it returns {tuple(out.shape)} for the batch, expected ({len(x)}, "
                f"{num_classes}): one logit per class",
            )

    def resolve_device(self, name: str) -> str:
        gpus = len([d for d in jax.devices() if d.platform in ("gpu", "cuda")])
        return resolve_device(name, "jax", gpus)


FRAMEWORK = JaxFramework()
