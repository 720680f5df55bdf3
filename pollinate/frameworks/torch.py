"""PyTorch adapter: a module's state ⇄ Arrays, and a ready-made classification client.

- ``get_arrays`` / ``set_arrays``: every ``state_dict`` entry (parameters *and* buffers such as
  BatchNorm running statistics), in ``state_dict`` order, as NumPy arrays.
- ``TorchClassifier``: a ``Client`` that trains with cross-entropy and evaluates accuracy.
  For (x, y) arrays the training loop is the plain PyTorch loop (``randperm``, index a batch,
  ``zero_grad``/forward/loss/``backward``/``step``) with no ``DataLoader`` and no per-batch
  host sync, so it costs what the training costs.
- ``classification_app``: the ``ClientFn`` that builds one model per worker and reuses it for
  every client the worker serves; ``torch_evaluator`` and ``initial_arrays`` do the same for
  the server side.

Local training uses pollinate's own SGD and Adam (``torch_optim``), bit-identical to
``torch.optim``'s on CPU, because the first ``torch.optim`` optimizer of a process imports
``torch._dynamo`` (~1.5 s in every worker process and every deployed client).

This module imports torch; nothing else in pollinate imports it at import time.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pollinate.client import ClientContext
from pollinate.errors import ConfigError, DataError, UpdateRejected
from pollinate.frameworks.torch_algorithms import (
    GradientCorrection,
    Scaffold,
    split_scaffold_arrays,
    trainable_entries,
)
from pollinate.frameworks.torch_optim import SGD, Adam, LocalOptimizer
from pollinate.types import Arrays, Config, EvaluateRes, Metrics, TrainRes

TorchData = Union[tuple[Any, Any], Dataset]
"""Client data: an ``(x, y)`` pair of NumPy arrays or tensors, or a torch ``Dataset``."""

ModelFn = Callable[[], nn.Module]

WORKER_MODEL_KEY = "torch_model"  # ctx.worker entry holding the worker's model
_WORKER_MODEL_FN_KEY = "torch_model_fn"  # ... and the model_fn that built it

OPTIMIZERS = ("sgd", "adam")
DEFAULT_EVAL_BATCH_SIZE = 256

_Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# --- state_dict ⇄ Arrays --------------------------------------------------------------------


def get_arrays(module: nn.Module) -> Arrays:
    """Every ``state_dict`` entry (parameters and buffers) as a CPU NumPy copy, in order."""
    return [_to_numpy(key, tensor) for key, tensor in module.state_dict().items()]


def set_arrays(module: nn.Module, arrays: Arrays) -> None:
    """Copy ``arrays`` into ``module``'s ``state_dict`` entries in place (all or nothing).

    Raises ``UpdateRejected`` naming the entry when the count, a shape or a dtype kind does
    not match. A float array may load into a float tensor of another precision (it is cast);
    a float array never loads into an integer buffer such as ``num_batches_tracked``.
    """
    state = module.state_dict(keep_vars=True)
    if len(arrays) != len(state):
        raise UpdateRejected(
            f"got {len(arrays)} arrays for a model with {len(state)} state_dict entries "
            "(parameters and buffers); the arrays must come from get_arrays() of the same "
            "architecture"
        )
    pairs = list(zip(state.items(), arrays))
    for (key, tensor), array in pairs:  # check everything before writing anything
        _check_compatible(key, tensor, array)
    with torch.no_grad():
        for (_, tensor), array in pairs:
            if tensor.device.type == "cpu":
                np.copyto(tensor.detach().numpy(), array, casting="same_kind")
            else:
                tensor.copy_(_from_numpy(np.asarray(array)))


def _to_numpy(key: str, tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach()
    on_cpu = t.device.type == "cpu"
    try:
        array = t.numpy() if on_cpu else t.cpu().numpy()
    except TypeError as e:  # e.g. bfloat16, which NumPy has no dtype for
        raise ConfigError(
            f"state_dict entry {key!r} has dtype {t.dtype}, which NumPy cannot hold; "
            "convert the model first (e.g. model.float())"
        ) from e
    return array.copy() if on_cpu else array  # .cpu() already copied off the device


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _check_compatible(key: str, tensor: torch.Tensor, array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray):
        raise UpdateRejected(f"array for {key!r} is a {type(array).__name__}, not a NumPy array")
    expected = tuple(tensor.shape)
    if array.shape != expected:
        raise UpdateRejected(
            f"array for {key!r} has shape {array.shape}, expected {expected}; "
            "the arrays do not match this model's architecture"
        )
    try:
        want = _numpy_dtype(tensor.dtype)
    except TypeError as e:
        raise ConfigError(
            f"state_dict entry {key!r} has dtype {tensor.dtype}, which NumPy cannot hold; "
            "convert the model first (e.g. model.float())"
        ) from e
    if array.dtype != want and not np.can_cast(array.dtype, want, casting="same_kind"):
        raise UpdateRejected(
            f"array for {key!r} has dtype {array.dtype}, expected {want}; "
            "an aggregated update must keep each entry's dtype"
        )


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without a copy; read-only arrays (shared memory) are fine to read."""
    if not array.flags.writeable:
        with warnings.catch_warnings():  # we never write through the tensor
            warnings.simplefilter("ignore", UserWarning)
            return _from_numpy_strided(array)
    return _from_numpy_strided(array)


def _from_numpy_strided(array: np.ndarray) -> torch.Tensor:
    try:
        return torch.from_numpy(array)
    except ValueError:  # negative strides: torch cannot view them
        return torch.from_numpy(np.ascontiguousarray(array))


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOptions:
    """Local training settings read and checked from a task's config."""

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    local_evaluation: bool = False
    proximal_mu: float = 0.0  # FedProx's μ (0: off)
    scaffold: bool = False  # SCAFFOLD: the task's arrays are model + control variates
    report_initial_loss: bool = False  # report the received model's train loss (q-FedAvg)

    @classmethod
    def from_config(cls, config: Config) -> TrainOptions:
        """Read the training keys of ``config`` (others are ignored); ConfigError if invalid."""
        d = cls()
        optimizer = config.get("optimizer", d.optimizer)
        if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
            raise ConfigError(
                f"train config 'optimizer' is {optimizer!r}; use one of {', '.join(OPTIMIZERS)}"
            )
        options = cls(
            epochs=_int(config, "epochs", d.epochs, minimum=1),
            batch_size=_int(config, "batch_size", d.batch_size, minimum=1),
            optimizer=optimizer.lower(),
            lr=_float(config, "lr", d.lr),
            momentum=_float(config, "momentum", d.momentum),
            weight_decay=_float(config, "weight_decay", d.weight_decay),
            seed=_int(config, "seed", d.seed),
            local_evaluation=_bool(config, "local_evaluation", d.local_evaluation),
            proximal_mu=_float(config, "proximal_mu", d.proximal_mu),
            scaffold=_bool(config, "scaffold", d.scaffold),
            report_initial_loss=_bool(config, "report_initial_loss", d.report_initial_loss),
        )
        if not options.lr > 0:
            raise ConfigError(f"train config 'lr' must be > 0, got {options.lr}")
        if not 0 <= options.momentum < 1:
            raise ConfigError(f"train config 'momentum' must be in [0, 1), got {options.momentum}")
        if options.momentum and options.optimizer != "sgd":
            raise ConfigError(
                f"train config 'momentum' applies to optimizer 'sgd' only, got optimizer "
                f"{options.optimizer!r} with momentum {options.momentum}; set momentum = 0"
            )
        if not -(2**63) <= options.seed < 2**64:
            raise ConfigError(f"train config 'seed' must fit in 64 bits, got {options.seed}")
        if not options.weight_decay >= 0:
            raise ConfigError(
                f"train config 'weight_decay' must be >= 0, got {options.weight_decay}"
            )
        if not 0 <= options.proximal_mu < math.inf:
            raise ConfigError(
                f"train config 'proximal_mu' must be a finite number >= 0, got "
                f"{options.proximal_mu}"
            )
        return options

    def make_optimizer(self, params: Iterator[nn.Parameter]) -> LocalOptimizer:
        """A fresh optimizer for one task (local optimizer state does not outlive the task).

        pollinate's SGD / Adam (``torch_optim``): the arithmetic of ``torch.optim.SGD`` /
        ``torch.optim.Adam`` without the ~1.5 s ``torch._dynamo`` import those cost per process.
        """
        if self.optimizer == "adam":
            return Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def _int(config: Config, key: str, default: int, minimum: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"config {key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config {key!r} must be >= {minimum}, got {value}")
    return int(value)


def _float(config: Config, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"config {key!r} must be a number, got {value!r}")
    return float(value)


def _bool(config: Config, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"config {key!r} must be true or false, got {value!r}")
    return bool(value)


def _eval_batch_size(config: Config) -> int:
    return _int(config, "batch_size", DEFAULT_EVAL_BATCH_SIZE, minimum=1)


# --- data -----------------------------------------------------------------------------------


def _num_examples(data: TorchData) -> int:
    if isinstance(data, (tuple, list)):
        return len(data[1])
    return len(data)  # type: ignore[arg-type]


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype == object:
        raise DataError("client data must be numeric arrays, got an object array")
    return _from_numpy(array)


def _xy_tensors(
    data: TorchData, device: torch.device, float_dtype: torch.dtype | None, what: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``data`` as (x, y) tensors on ``device`` (no copy on CPU); None for a generic Dataset."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = (data.tensors[0], data.tensors[1])
    if isinstance(data, Dataset):
        return None
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise DataError(
            f"{what} data must be an (x, y) pair of arrays or a torch Dataset, "
            f"got {type(data).__name__}"
        )
    x, y = _as_tensor(data[0]), _as_tensor(data[1])
    if y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"{what} data: expected x with N examples and labels y of shape (N,), "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if float_dtype is not None and x.is_floating_point() and x.dtype != float_dtype:
        x = x.to(float_dtype)
    if y.dtype != torch.int64:
        if y.is_floating_point() or y.is_complex():
            raise DataError(f"{what} labels must be integer class indices, got {y.dtype}")
        y = y.long()
    if x.ndim == 4 and x.is_floating_point():
        # one layout whatever the array's strides (memory-mapped, gathered, …): results do not
        # depend on the backend, and channels-last convolutions are the faster ones on CPU
        # (``contiguous`` is not enough: with one channel both layouts count as contiguous)
        layout = torch.empty(x.shape, dtype=x.dtype, memory_format=torch.channels_last)
        if x.stride() != layout.stride():
            x = layout.copy_(x)
    return x.to(device), y.to(device)


def _tensor_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, order: torch.Tensor | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(y)
    if order is None:  # evaluation: in order, as views
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
    else:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def _loader_batches(
    loader: DataLoader, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for xb, yb in loader:
        yield xb.to(device), yb.to(device)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNGs (dropout …) for one task and restore them afterwards."""
    cuda = []
    if device.type == "cuda":
        cuda = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


# --- training and evaluation loops ----------------------------------------------------------


class _EpochMeter:
    """Mean loss and accuracy of one training epoch, with no extra kernel or sync per batch.

    Each batch only keeps references (its detached loss, logits and labels); predictions are
    compared in a few large operations, folded every ``FOLD_ELEMENTS`` logits to bound memory.
    """

    FOLD_ELEMENTS = 1 << 22

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.outputs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.pending = 0
        self.correct: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, output: torch.Tensor, labels: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        self.sizes.append(len(labels))
        self.outputs.append(output.detach())
        self.labels.append(labels)
        self.pending += output.numel()
        if self.pending >= self.FOLD_ELEMENTS:
            self._fold()

    def _fold(self) -> None:
        if not self.outputs:
            return
        predicted = torch.cat(self.outputs).argmax(1)
        hits = (predicted == torch.cat(self.labels)).sum()
        self.correct = hits if self.correct is None else self.correct + hits
        self.outputs.clear()
        self.labels.clear()
        self.pending = 0

    def result(self) -> tuple[float, float]:
        """(mean loss, accuracy) over every example seen; one host sync."""
        self._fold()
        n = sum(self.sizes)
        if n == 0 or self.correct is None:
            raise DataError("the training data yielded no batches")
        losses = torch.stack(self.losses).double()
        sizes = torch.tensor(self.sizes, dtype=torch.float64, device=losses.device)
        loss_sum = torch.dot(losses, sizes)
        return loss_sum.item() / n, self.correct.item() / n


def _train_epoch(
    model: nn.Module,
    optimizer: LocalOptimizer,
    batches: _Batches,
    meter: _EpochMeter | None = None,
    correct: Callable[[], None] | None = None,
) -> int:
    """One epoch of the plain loop; returns its number of optimizer steps.

    ``meter`` (if any) records loss and predictions; ``correct`` (if any) adjusts the
    gradients before each step (FedProx, SCAFFOLD).
    """
    steps = 0
    for xb, yb in batches:
        optimizer.zero_grad()
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        if correct is not None:
            correct()
        optimizer.step()
        steps += 1
        if meter is not None:
            meter.add(loss, out, yb)
    return steps


def _evaluate_batches(
    model: nn.Module, batches: _Batches, n: int, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``batches`` (``n`` examples)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for xb, yb in batches:
            out = model(xb)
            loss = F.cross_entropy(out, yb, reduction="sum")
            hits = (out.argmax(1) == yb).sum()
            loss_sum += loss
            correct += hits
    return loss_sum.item() / n, correct.item() / n


# --- the client -----------------------------------------------------------------------------


class TorchClassifier:
    """A ``Client`` that trains a PyTorch classifier with cross-entropy and reports accuracy.

    ``train`` reads ``epochs``, ``batch_size``, ``optimizer`` (sgd | adam), ``lr``,
    ``momentum``, ``weight_decay``, ``seed`` (shuffling and dropout) and ``local_evaluation``
    from the config, and reports ``loss`` and ``accuracy`` (last epoch) and ``num_steps``
    (optimizer steps taken). Keys a strategy may add (``torch_algorithms`` has the maths):

    - ``proximal_mu`` (FedProx): add μ·(w − w_global) to each step's gradients;
    - ``scaffold`` (SCAFFOLD, option II): the arrays are the model's n ``state_dict``
      entries followed by the server's n control variates; each step uses g + c − c_i, and
      the result is the n trained arrays followed by the n entries of c_i⁺ − c_i. c_i lives
      in ``state`` (``ClientContext.state``) under ``"scaffold_c"``;
    - ``report_initial_loss`` (q-FedAvg): also report ``initial_loss``, the mean
      cross-entropy of the received model on the training data (eval mode).

    ``evaluate`` reads ``batch_size`` (default 256).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: TorchData,
        test_data: TorchData | None = None,
        device: str | torch.device = "cpu",
        state: dict[str, Any] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.test_data = test_data
        self.state: dict[str, Any] = state if state is not None else {}

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        """Load ``arrays``, train locally, return the trained arrays and last-epoch metrics."""
        options = TrainOptions.from_config(config)
        n = _num_examples(self.train_data)
        if n == 0:
            raise DataError("this client has no training examples")
        model = self.model
        control = None
        if options.scaffold:
            arrays, control = split_scaffold_arrays(arrays, model.state_dict())
        set_arrays(model, arrays)
        tensors = _xy_tensors(self.train_data, self.device, _float_dtype(model), "train")
        initial_loss = self._train_loss(tensors, n) if options.report_initial_loss else None
        correct, scaffold, received = None, None, None
        if options.proximal_mu or control is not None:
            entries = trainable_entries(model)
            received = [p.detach().clone() for _, p in entries]
            if control is not None:
                scaffold = Scaffold(model, control, self.state, entries)
            correct = GradientCorrection(
                [p for _, p in entries],
                received,
                mu=options.proximal_mu,
                drift=scaffold.drift if scaffold is not None else None,
            )
        with _seeded(options.seed, self.device):
            loss, accuracy, steps = self._fit(options, n, tensors, correct)
        metrics: Metrics = {"loss": loss, "accuracy": accuracy, "num_steps": steps}
        if initial_loss is not None:
            metrics["initial_loss"] = initial_loss
        if options.local_evaluation and self._has_test_examples():
            local_loss, local_accuracy = self._evaluate(options.batch_size)
            metrics["local_loss"] = local_loss
            metrics["local_accuracy"] = local_accuracy
        trained = get_arrays(model)
        if scaffold is not None:
            assert received is not None
            trained += scaffold.finish(received, steps, options.lr)
        return TrainRes(trained, num_examples=n, metrics=metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        """Load ``arrays`` and return mean cross-entropy and accuracy on the test data."""
        batch_size = _eval_batch_size(config)
        if self.test_data is None:
            raise DataError(
                "this client has no test data to evaluate on; pass test_data to "
                "TorchClassifier (or give clients a test part, e.g. client_test_fraction > 0)"
            )
        set_arrays(self.model, arrays)
        loss, accuracy = self._evaluate(batch_size)
        return EvaluateRes(
            loss=loss,
            num_examples=_num_examples(self.test_data),
            metrics={"accuracy": accuracy},
        )

    def _has_test_examples(self) -> bool:
        return self.test_data is not None and _num_examples(self.test_data) > 0

    def _fit(
        self,
        options: TrainOptions,
        n: int,
        tensors: tuple[torch.Tensor, torch.Tensor] | None,
        correct: Callable[[], None] | None,
    ) -> tuple[float, float, int]:
        """Train for ``options.epochs``: (last epoch's loss, its accuracy, optimizer steps)."""
        model = self.model
        model.train()
        optimizer = options.make_optimizer(model.parameters())
        generator = torch.Generator().manual_seed(options.seed)
        loader = None
        if tensors is None:
            loader = DataLoader(
                self.train_data,  # type: ignore[arg-type]
                batch_size=options.batch_size,
                shuffle=True,
                generator=generator,
            )
        meter = _EpochMeter()
        steps = 0
        for epoch in range(options.epochs):
            batches: _Batches
            if tensors is not None:
                x, y = tensors
                order = torch.randperm(n, generator=generator).to(x.device)
                batches = _tensor_batches(x, y, options.batch_size, order)
            else:
                assert loader is not None
                batches = _loader_batches(loader, self.device)
            last = epoch == options.epochs - 1
            steps += _train_epoch(model, optimizer, batches, meter if last else None, correct)
        optimizer.zero_grad()  # free the gradients: the worker keeps the model, not them
        loss, accuracy = meter.result()
        return loss, accuracy, steps

    def _train_loss(self, tensors: tuple[torch.Tensor, torch.Tensor] | None, n: int) -> float:
        """Mean cross-entropy of the current model on the training data (eval mode)."""
        batches: _Batches
        if tensors is None:
            loader = DataLoader(
                self.train_data,  # type: ignore[arg-type]
                batch_size=DEFAULT_EVAL_BATCH_SIZE,
            )
            batches = _loader_batches(loader, self.device)
        else:
            batches = _tensor_batches(*tensors, DEFAULT_EVAL_BATCH_SIZE)
        loss, _ = _evaluate_batches(self.model, batches, n, self.device)
        return loss

    def _evaluate(self, batch_size: int) -> tuple[float, float]:
        assert self.test_data is not None
        n = _num_examples(self.test_data)
        if n == 0:
            raise DataError("this client's test data is empty")
        tensors = _xy_tensors(self.test_data, self.device, _float_dtype(self.model), "test")
        batches: _Batches
        if tensors is None:
            loader = DataLoader(self.test_data, batch_size=batch_size)  # type: ignore[arg-type]
            batches = _loader_batches(loader, self.device)
        else:
            batches = _tensor_batches(*tensors, batch_size)
        return _evaluate_batches(self.model, batches, n, self.device)


# --- simulation and server helpers ----------------------------------------------------------


def _same_model_fn(a: object, b: object) -> bool:
    """Whether two model_fns build the same architecture (survives pickling of partials)."""
    if a is b:
        return True
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return a.func is b.func and a.args == b.args and a.keywords == b.keywords
    return False


class ClassificationApp:
    """A picklable ``ClientFn``: a ``TorchClassifier`` on one client's part of a data set.

    ``data`` is a federated data set (``client_train(cid)``, ``client_test(cid)``). Each worker
    builds the model once with ``model_fn()`` and keeps it in ``ctx.worker`` for every client
    it serves; every task loads the global arrays into it, so its initial weights never matter.
    The client's ``ctx.state`` is handed to the ``TorchClassifier`` as is, so what it keeps
    (SCAFFOLD's c_i) is saved by the engine after the task and comes back next round.
    """

    def __init__(self, model_fn: ModelFn, data: Any, device: str = "cpu") -> None:
        self.model_fn = model_fn
        self.data = data
        self.device = device

    def __call__(self, ctx: ClientContext) -> TorchClassifier:
        test_data = self.data.client_test(ctx.client_id)
        if _num_examples(test_data) == 0:
            test_data = None  # evaluate() then says there is no test data
        return TorchClassifier(
            self.worker_model(ctx.worker),
            train_data=self.data.client_train(ctx.client_id),
            test_data=test_data,
            device=self.device,
            state=ctx.state,  # the same dict: what the client keeps is saved after the task
        )

    def worker_model(self, worker: dict[str, Any]) -> nn.Module:
        """The worker's model, built on first use (or when this app's model_fn differs)."""
        model = worker.get(WORKER_MODEL_KEY)
        if model is None or not _same_model_fn(worker.get(_WORKER_MODEL_FN_KEY), self.model_fn):
            model = _build(self.model_fn).to(self.device)
            worker[WORKER_MODEL_KEY] = model
            worker[_WORKER_MODEL_FN_KEY] = self.model_fn
        return model


def classification_app(model_fn: ModelFn, data: Any, device: str = "cpu") -> ClassificationApp:
    """The ``ClientFn`` for federated classification of ``data`` with ``model_fn()`` models."""
    return ClassificationApp(model_fn, data, device)


class TorchEvaluator:
    """A picklable centralized evaluator: ``(arrays) -> (loss, {"accuracy": …})`` on (x, y)."""

    def __init__(
        self,
        model_fn: ModelFn,
        x: Any,
        y: Any,
        batch_size: int = 1024,
        device: str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"evaluation batch_size must be >= 1, got {batch_size}")
        if len(x) != len(y) or len(y) == 0:
            raise DataError(
                f"centralized evaluation needs x and y of the same non-zero length, "
                f"got {len(x)} and {len(y)}"
            )
        self.model_fn = model_fn
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._model: nn.Module | None = None

    def __call__(self, arrays: Arrays) -> tuple[float, Metrics]:
        if self._model is None:
            self._model = _build(self.model_fn).to(self.device)
        model = self._model
        set_arrays(model, arrays)
        tensors = _xy_tensors((self.x, self.y), self.device, _float_dtype(model), "server test")
        assert tensors is not None
        loss, accuracy = _evaluate_batches(
            model, _tensor_batches(*tensors, self.batch_size), len(self.y), self.device
        )
        return loss, {"accuracy": accuracy}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = None  # rebuilt on first use after unpickling
        return state


def torch_evaluator(
    model_fn: ModelFn, x: Any, y: Any, batch_size: int = 1024, device: str = "cpu"
) -> TorchEvaluator:
    """Centralized evaluation on server-side data; builds the model once and reuses it."""
    return TorchEvaluator(model_fn, x, y, batch_size=batch_size, device=device)


def initial_arrays(model_fn: ModelFn, seed: int) -> Arrays:
    """The arrays of a model built by ``model_fn()`` under ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = _build(model_fn)
    return get_arrays(model)


def _build(model_fn: ModelFn) -> nn.Module:
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model_fn must return a torch.nn.Module, got {type(model).__name__} from {model_fn!r}"
        )
    return model
