"""The PyTorch ``Framework``: a thin wrapper over ``pollinate.frameworks.torch``.

Models come from ``pollinate.models`` (logreg, mlp, cnn, or "package.module:function"
returning a ``torch.nn.Module``); images stay channels-first (NCHW).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pollinate.client import ClientFn
from pollinate.config import ModelSection
from pollinate.frameworks import torch as adapter
from pollinate.frameworks.base import Evaluator, ModelBuilder, mismatch_error
from pollinate.frameworks.devices import resolve_device
from pollinate.models import MODEL_NAMES, model_fn
from pollinate.types import Arrays


class TorchFramework:
    """PyTorch models trained by ``TorchClassifier`` (see ``pollinate.frameworks.torch``)."""

    name = "torch"
    model_names = MODEL_NAMES

    def model_fn(
        self, model: ModelSection, input_shape: tuple[int, ...], num_classes: int
    ) -> ModelBuilder:
        return model_fn(model.name, input_shape, num_classes, tuple(model.hidden))

    def client_fn(self, model_fn: ModelBuilder, data: Any, device: str) -> ClientFn:
        return adapter.classification_app(model_fn, data, device=device)

    def evaluator(self, model_fn: ModelBuilder, x: Any, y: Any, device: str) -> Evaluator:
        return adapter.torch_evaluator(model_fn, x, y, device=device)

    def initial_arrays(self, model_fn: ModelBuilder, seed: int) -> Arrays:
        return adapter.initial_arrays(model_fn, seed)

    def check(self, model_fn: ModelBuilder, x: Any, y: Any, num_classes: int) -> None:
        x = np.asarray(x)
        model = adapter._build(model_fn)
        name = getattr(model_fn, "args", ("model",))[0]
        try:
            with torch.no_grad():
                out = model.eval()(torch.as_tensor(x, dtype=torch.float32))
        except Exception as e:
            raise mismatch_error(name, x, num_classes, f"running it failed: {e}") from e
        if tuple(out.shape) != (len(x), num_classes):
            raise mismatch_error(
                name,
                x,
                num_classes,
                f"it returns {tuple(out.shape)} for the batch, expected ({len(x)}, "
                f"{num_classes}): one score per class",
            )

    def resolve_device(self, name: str) -> str:
        mps = getattr(torch.backends, "mps", None)
        has_mps = bool(mps is not None and mps.is_available())
        return resolve_device(name, "torch", torch.cuda.device_count(), mps=has_mps)


FRAMEWORK = TorchFramework()
