"""One interface for every ML framework, and the one place a run picks its framework.

A ``Framework`` turns a config's [model] section into a picklable zero-argument *model
builder*, and a builder into the parts of a run: the clients' ``ClientFn``, a centralized
evaluator and the initial Arrays. Implementations (``get_framework(name)``):

==========  ==========================================  ==========================  =========
name        models                                      module                      extra
==========  ==========================================  ==========================  =========
torch       logreg, mlp, cnn, "package.module:function"  ``frameworks.torch_fw``    torch
keras       logreg, mlp, cnn, "package.module:function"  ``frameworks.keras``       keras
jax         logreg, mlp, cnn, "package.module:function"  ``frameworks.jax``         jax
sklearn     sgd, logreg, mlp, sgd_regressor, ridge, ...  ``frameworks.sklearn``     sklearn
xgboost     gbtree                                      ``frameworks.xgboost``      xgboost
==========  ==========================================  ==========================  =========

A user model ``"package.module:function"`` is imported where the model is built (in each
worker). A function that takes no arguments (like a tutorial's ``create_model()``) is called
as it is; otherwise it receives whichever of these keyword arguments it accepts:
``input_shape`` (per example, in the framework's layout: channels-last ``(H, W, C)`` images
for keras and jax, channels-first ``(C, H, W)`` for torch, ``(features,)`` for sklearn),
``num_classes`` and ``hidden`` ([model] hidden).

Each adapter converts the data it is given (NCHW float32 images or flat features, int64
labels) to what its framework wants (NHWC, float64, one-hot …): user code never does.
Frameworks are imported lazily, with an install hint naming the extra when missing.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pollinate.client import ClientFn
from pollinate.errors import ConfigError, missing_dependency
from pollinate.types import Arrays, Metrics

if TYPE_CHECKING:
    from pollinate.config import ModelSection, RunConfig

ModelBuilder = Callable[[], Any]
"""A picklable zero-argument function that builds the model (or, for xgboost, its spec)."""

Evaluator = Callable[[Arrays], "tuple[float, Metrics]"]
"""Centralized evaluation: the global Arrays → (loss, {"accuracy": …})."""

FRAMEWORKS: dict[str, tuple[str, str, str]] = {
    # name: (module, package the module needs, extra that installs it)
    "torch": ("pollinate.frameworks.torch_fw", "torch", "torch"),
    "keras": ("pollinate.frameworks.keras", "keras", "keras"),
    "jax": ("pollinate.frameworks.jax", "jax", "jax"),
    "sklearn": ("pollinate.frameworks.sklearn", "scikit-learn", "sklearn"),
    "xgboost": ("pollinate.frameworks.xgboost", "xgboost", "xgboost"),
}


class Framework(Protocol):
    """What a run needs from an ML framework."""

    name: str
    model_names: tuple[str, ...]  # the built-in models ("package.module:function" aside)

    def model_fn(
        self, model: ModelSection, input_shape: tuple[int, ...], num_classes: int
    ) -> ModelBuilder:
        """A picklable zero-argument builder of ``model``'s model for examples of
        ``input_shape`` (channels-first, as the data sets hold them) and ``num_classes``."""
        ...

    def client_fn(self, model_fn: ModelBuilder, data: Any, device: str) -> ClientFn:
        """The classification ``ClientFn`` for a federated data set (``client_train(cid)``,
        ``client_test(cid)``); each worker builds the model once and keeps it."""
        ...

    def evaluator(self, model_fn: ModelBuilder, x: Any, y: Any, device: str) -> Evaluator:
        """A picklable centralized evaluator on (x, y)."""
        ...

    def initial_arrays(self, model_fn: ModelBuilder, seed: int) -> Arrays:
        """The Arrays of a model built under ``seed``."""
        ...

    def check(self, model_fn: ModelBuilder, x: Any, y: Any, num_classes: int) -> None:
        """Run the model on one batch in this process; ConfigError, naming the data's shape
        and class count, when the model does not fit the data."""
        ...

    def resolve_device(self, name: str) -> str:
        """[train] device as a concrete device; ConfigError when it is absent."""
        ...


def get_framework(name: str) -> Framework:
    """The adapter named ``name`` (imports its framework; install hint when it is missing)."""
    if name not in FRAMEWORKS:
        raise ConfigError(f"unknown framework {name!r}; use one of {', '.join(FRAMEWORKS)}")
    module_name, package, extra = FRAMEWORKS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if isinstance(e, ConfigError):
            raise
        missing = getattr(e, "name", None) or package
        error = missing_dependency(package, extra)
        if missing == package:  # the install line says it all
            raise error from e
        raise type(error)(f"{error} (import of {missing!r} failed: {e})") from e
    framework: Framework = module.FRAMEWORK
    return framework


@dataclass(frozen=True)
class FrameworkParts:
    """What a run assembles from the config's framework."""

    framework: Framework
    model_fn: ModelBuilder
    client_fn: ClientFn
    evaluator: Evaluator
    initial_arrays: Arrays
    device: str


def framework_parts(cfg: RunConfig, data: Any) -> FrameworkParts:
    """The config's framework, model builder, clients, centralized evaluator and initial
    Arrays for a federated data set: the one place a run touches an ML framework.

    The model is run once on a batch of client 0's data here, so a model that does not fit
    the data fails now, with one clear error, instead of in every client.
    """
    framework = get_framework(cfg.model.framework)
    device = framework.resolve_device(cfg.train.device)
    input_shape = tuple(int(d) for d in data.x_train.shape[1:])
    model_fn = framework.model_fn(cfg.model, input_shape, int(data.num_classes))
    x, y = data.client_train(0)
    framework.check(model_fn, x[:8], y[:8], int(data.num_classes))
    x_test, y_test = data.server_test()
    return FrameworkParts(
        framework=framework,
        model_fn=model_fn,
        client_fn=framework.client_fn(model_fn, data, device),
        evaluator=framework.evaluator(model_fn, x_test, y_test, device),
        initial_arrays=framework.initial_arrays(model_fn, cfg.run.seed),
        device=device,
    )


# --- helpers for the adapters ----------------------------------------------------------------


def is_user_model(name: str) -> bool:
    """Whether ``name`` is ``"package.module:function"``."""
    module, _, function = name.partition(":")
    return bool(module) and bool(function) and ":" not in function


def check_model_name(name: str, framework: str, builtins: tuple[str, ...]) -> None:
    """ConfigError unless ``name`` is one of ``builtins`` or a user model."""
    if not isinstance(name, str) or not (name in builtins or is_user_model(name)):
        raise ConfigError(
            f"unknown {framework} model {name!r}; use one of {', '.join(builtins)} "
            "or 'package.module:function' for your own"
        )


def import_function(spec: str) -> Callable[..., Any]:
    """The callable that ``"package.module:function"`` names (ConfigError with the fix)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            raise ConfigError(
                f"model {spec!r}: cannot import module {module_name!r}; make sure it is "
                "installed or on PYTHONPATH (run from the folder that holds it)"
            ) from e
        raise ConfigError(f"model {spec!r}: importing {module_name!r} failed: {e}") from e
    except ImportError as e:
        raise ConfigError(f"model {spec!r}: importing {module_name!r} failed: {e}") from e
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model {spec!r}: module {module_name!r} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"model {spec!r}: {attr!r} is not callable")
    return target  # type: ignore[no-any-return]


def call_user_model(spec: str, offered: dict[str, Any]) -> Any:
    """Import ``spec`` and call it with the ``offered`` keywords it accepts (none for a
    function without parameters)."""
    function = import_function(spec)
    return function(**accepted(function, offered))


def accepted(function: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``offered`` that ``function`` accepts."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(offered)
    names = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in offered.items() if k in names}


def mismatch_error(model: str, x: np.ndarray, num_classes: int, detail: str) -> ConfigError:
    """The error ``Framework.check`` raises: the data's shape and class count, and why."""
    return ConfigError(
        f"model {model!r} does not fit the data: examples of shape {tuple(x.shape[1:])} "
        f"(batch {tuple(x.shape)}) and {num_classes} classes; {detail}"
    )
