"""The built-in model zoo that run configs name: ``logreg``, ``mlp``, ``cnn``, or a user's own.

Input shapes are per example and channels-first, e.g. ``(1, 28, 28)`` for Fashion-MNIST.

- ``logreg``: flatten, then one linear layer (multinomial logistic regression).
- ``mlp``: flatten, then Linear + ReLU per ``hidden`` size, then a linear output layer.
- ``cnn``: the seed blog post's CNN: Conv2d(C, 32, 3) + ReLU, MaxPool2d(2),
  Conv2d(32, 64, 3) + ReLU, MaxPool2d(2), Flatten, Linear(→ 128) + ReLU, Linear(128 → classes).
  It needs images of at least 10 x 10 pixels.
- ``"package.module:function"``: a user's function returning a ``torch.nn.Module``; it gets
  ``input_shape=``, ``num_classes=`` and ``hidden=`` as keyword arguments where it accepts them.

torch is imported only when a model is built, so configs can be checked without it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pollinate.errors import ConfigError, missing_dependency
from pollinate.imports import load_object

if TYPE_CHECKING:
    from torch import nn

MODEL_NAMES = ("logreg", "mlp", "cnn")

CNN_MIN_SIZE = 10
"""Smallest height/width the cnn accepts: 3x3 conv, 2x2 pool, 3x3 conv, 2x2 pool leaves 1x1."""


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (64,),
) -> nn.Module:
    """Build the model ``name`` for examples of ``input_shape`` and ``num_classes`` classes."""
    input_shape, hidden = check_model(name, input_shape, num_classes, hidden)
    if ":" in name:
        return _build_user_model(name, input_shape, num_classes, hidden)
    nn = _torch_nn()
    features = _prod(input_shape)
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))
    if name == "mlp":
        layers: list[Any] = [nn.Flatten()]
        width = features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    channels, height, width = input_shape
    flat = 64 * _cnn_side(height) * _cnn_side(width)
    return nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def model_fn(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (64,),
) -> Callable[[], nn.Module]:
    """A picklable zero-argument function building the model (arguments checked now)."""
    shape, sizes = check_model(name, input_shape, num_classes, hidden)
    return functools.partial(build_model, name, shape, int(num_classes), sizes)


def check_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (64,),
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check the arguments without importing torch; returns (input_shape, hidden) as tuples."""
    if not isinstance(name, str) or not (name in MODEL_NAMES or _is_user_name(name)):
        raise ConfigError(
            f"unknown model {name!r}; use one of {', '.join(MODEL_NAMES)} "
            "or 'package.module:function' for your own"
        )
    shape = _positive_ints(input_shape, "input_shape")
    sizes = _positive_ints(hidden, "hidden")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not shape:
        raise ConfigError("input_shape must name at least one dimension, got ()")
    if name == "cnn":
        if len(shape) != 3:
            raise ConfigError(
                f"model 'cnn' needs images shaped (channels, height, width), got input_shape "
                f"{shape}; use 'mlp' or 'logreg' for flat features"
            )
        if min(shape[1:]) < CNN_MIN_SIZE:
            raise ConfigError(
                f"model 'cnn' needs images of at least {CNN_MIN_SIZE}x{CNN_MIN_SIZE} pixels "
                f"(two 3x3 convolutions and two 2x2 poolings), got {shape[1]}x{shape[2]}; "
                "use model 'mlp' or 'logreg' for small images such as 8x8 digits"
            )
    return shape, sizes


def _is_user_name(name: str) -> bool:
    module, _, function = name.partition(":")
    return bool(module) and bool(function) and ":" not in function


def _positive_ints(values: Sequence[int], what: str) -> tuple[int, ...]:
    try:
        items = tuple(values)
    except TypeError:
        raise ConfigError(f"{what} must be a list of positive integers, got {values!r}") from None
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{what} must be a list of positive integers, got {values!r}")
    return tuple(int(v) for v in items)


def _cnn_side(size: int) -> int:
    """Height (or width) after conv3, pool2, conv3, pool2."""
    return ((size - 2) // 2 - 2) // 2


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _torch_nn() -> Any:
    try:
        from torch import nn
    except ImportError as e:
        raise missing_dependency("torch", "torch") from e
    return nn


def require_torch() -> None:
    """Raise ``MissingDependencyError`` with the install line when torch is not installed
    (before anything imports ``pollinate.frameworks.torch``)."""
    _torch_nn()


def _build_user_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...]
) -> nn.Module:
    nn = _torch_nn()
    target = load_object(name, "model")
    attr = name.partition(":")[2]
    offered = {"input_shape": input_shape, "num_classes": num_classes, "hidden": hidden}
    model = target(**_accepted(target, offered))
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model {name!r}: {attr}() must return a torch.nn.Module, got {type(model).__name__}"
        )
    return model


def _accepted(function: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
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
