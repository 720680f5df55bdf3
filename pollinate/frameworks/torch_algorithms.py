"""The client halves of FedProx and SCAFFOLD for ``TorchClassifier``.

The server asks for them through train-config keys (see ``TrainOptions``); this module holds
the arithmetic, applied to the gradients between ``backward`` and the optimizer's ``step``:

- FedProx (Li et al. 2020, arXiv 1812.06127): each client minimises
  F_k(w) + μ/2·‖w − w_global‖², so every step adds μ·(w − w_global) to the gradient of each
  trainable parameter. ``proximal_mu = 0`` adds nothing (the loop is then the plain one).
- SCAFFOLD, option II (Karimireddy et al. 2020, arXiv 1910.06378): with the server's control
  variate c and the client's own c_i, every step uses g + c − c_i instead of the gradient g.
  After K steps with learning rate η from the received model x to y_i, the client's new
  variate is c_i⁺ = c_i − c + (x − y_i)/(K·η); it keeps c_i⁺ and sends y_i and c_i⁺ − c_i.

Both apply to *trainable* entries only: floating-point ``nn.Parameter`` s that require a
gradient (a parameter shared by two ``state_dict`` entries counts once, at its first entry).
Buffers (BatchNorm statistics …), frozen parameters and later entries of a shared parameter
have control variates of zeros. A parameter without a gradient in a step (unused by the
forward pass) is not corrected, since the optimizer skips it too.

The update rule c_i⁺ assumes plain SGD, the paper's setting; with momentum or Adam it still uses
the configured ``lr`` as η, an estimate.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pollinate.errors import ConfigError, UpdateRejected
from pollinate.types import Arrays

SCAFFOLD_STATE_KEY = "scaffold_c"
"""``ClientContext.state`` entry holding the client's SCAFFOLD control variate c_i: a list of
NumPy arrays, one per ``state_dict`` entry (zeros for entries that are not trainable)."""


def trainable_entries(model: nn.Module) -> list[tuple[int, nn.Parameter]]:
    """``(state_dict index, parameter)`` of each trainable floating-point parameter.

    A parameter reachable under two keys (tied weights) is listed once, at its first key.
    """
    seen: set[int] = set()
    out: list[tuple[int, nn.Parameter]] = []
    for index, tensor in enumerate(model.state_dict(keep_vars=True).values()):
        if (
            isinstance(tensor, nn.Parameter)
            and tensor.requires_grad
            and tensor.is_floating_point()
            and id(tensor) not in seen
        ):
            seen.add(id(tensor))
            out.append((index, tensor))
    return out


class GradientCorrection:
    """Adds μ·(w − w_global) (FedProx) and c − c_i (SCAFFOLD) to the current gradients.

    Called once per step, after ``backward`` and before the optimizer's ``step``.
    ``anchors`` are the received values of ``params`` (w_global); ``drift`` is c − c_i per
    parameter. Either part may be absent.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        mu: float = 0.0,
        drift: Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.params = list(params)
        self.anchors = list(anchors)
        self.mu = float(mu)
        self.drift = list(drift) if drift is not None else None

    @torch.no_grad()
    def __call__(self) -> None:
        params, anchors, drift = self.params, self.anchors, self.drift
        grads = [p.grad for p in params]
        if any(g is None for g in grads):  # skip parameters the forward pass did not use
            keep = [k for k, g in enumerate(grads) if g is not None]
            params = [params[k] for k in keep]
            anchors = [anchors[k] for k in keep]
            drift = [drift[k] for k in keep] if drift is not None else None
            grads = [grads[k] for k in keep]
        if not grads:
            return
        present: list[torch.Tensor] = grads  # type: ignore[assignment]
        if self.mu:
            torch._foreach_add_(present, torch._foreach_sub(params, anchors), alpha=self.mu)
        if drift is not None:
            torch._foreach_add_(present, drift)


class Scaffold:
    """One task's SCAFFOLD bookkeeping: the server's c, the client's c_i, and the new c_i⁺.

    ``control`` is the second half of the task's arrays (one array per ``state_dict`` entry);
    ``state`` is the client's persistent state, read for c_i (zeros when absent) and updated
    with c_i⁺ by ``finish``.
    """

    def __init__(
        self,
        model: nn.Module,
        control: Arrays,
        state: dict[str, Any],
        entries: Sequence[tuple[int, nn.Parameter]],
    ) -> None:
        specs = [(tuple(t.shape), t.dtype) for t in model.state_dict().values()]
        self.specs = specs
        self.state = state
        self.entries = list(entries)
        own = _saved_variate(state, specs)
        self.c = [_tensor(control[i], p) for i, p in self.entries]
        self.c_i = [
            torch.zeros_like(p, memory_format=torch.contiguous_format)
            if own is None
            else _tensor(own[i], p)
            for i, p in self.entries
        ]
        self.drift = [c - c_i for c, c_i in zip(self.c, self.c_i)]

    def finish(self, x: Sequence[torch.Tensor], steps: int, lr: float) -> Arrays:
        """c_i⁺ = c_i − c + (x − y_i)/(K·η): store it in the state, return c_i⁺ − c_i.

        ``x`` are the received trainable parameters; y_i are their values now.
        """
        if steps < 1:
            raise ConfigError("SCAFFOLD needs at least one local step to update c_i")
        scale = 1.0 / (steps * lr)
        new: list[np.ndarray] = [np.zeros(shape, _numpy_dtype(d)) for shape, d in self.specs]
        delta: list[np.ndarray] = [np.zeros(shape, _numpy_dtype(d)) for shape, d in self.specs]
        with torch.no_grad():
            for (index, y), x0, c, c_i in zip(self.entries, x, self.c, self.c_i):
                c_new = c_i - c + (x0 - y.detach()) * scale
                new[index] = c_new.cpu().numpy()
                delta[index] = (c_new - c_i).cpu().numpy()
        self.state[SCAFFOLD_STATE_KEY] = new
        return delta


def split_scaffold_arrays(
    arrays: Arrays, entries: Mapping[str, torch.Tensor]
) -> tuple[Arrays, Arrays]:
    """A SCAFFOLD task's arrays → (model arrays, control variates c), both checked.

    The task carries the model's n ``state_dict`` entries followed by c, one array per entry
    of the same shape; the entries of c for trainable parameters must be floating-point.
    """
    n = len(entries)
    if len(arrays) != 2 * n:
        raise UpdateRejected(
            f"a SCAFFOLD task ('scaffold' = true) carries the model's {n} state_dict entries "
            f"followed by its {n} control variates ({2 * n} arrays), but this one has "
            f"{len(arrays)}; the server's strategy must send model + control variates "
            "(SCAFFOLD), or not set 'scaffold'"
        )
    control = arrays[n:]
    for (key, tensor), array in zip(entries.items(), control):
        if not isinstance(array, np.ndarray) or array.shape != tuple(tensor.shape):
            shape = getattr(array, "shape", type(array).__name__)
            raise UpdateRejected(
                f"the SCAFFOLD control variate for {key!r} has shape {shape}, expected "
                f"{tuple(tensor.shape)}: c needs one array per state_dict entry, shaped alike"
            )
        if tensor.is_floating_point() and array.dtype.kind != "f":
            raise UpdateRejected(
                f"the SCAFFOLD control variate for {key!r} has dtype {array.dtype}; "
                "a parameter's variate must be floating-point"
            )
    return arrays[:n], control


def _saved_variate(state: Mapping[str, Any], specs: list[tuple[tuple[int, ...], Any]]) -> Any:
    """The client's saved c_i (a list of arrays matching ``specs``), or None if it has none."""
    saved = state.get(SCAFFOLD_STATE_KEY)
    if saved is None:
        return None
    fix = (
        f"the client's saved SCAFFOLD variate (state {SCAFFOLD_STATE_KEY!r}) was kept for "
        "another model; remove it (for a deployed client: its --state-dir folder)"
    )
    if not isinstance(saved, (list, tuple)) or len(saved) != len(specs):
        count = len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__
        raise ConfigError(f"{fix}: it holds {count} arrays, the model has {len(specs)} entries")
    for array, (shape, _) in zip(saved, specs):
        if np.shape(array) != shape:
            raise ConfigError(f"{fix}: an array of shape {np.shape(array)} where {shape} is due")
    return saved


def _tensor(array: Any, like: torch.Tensor) -> torch.Tensor:
    """A copy of ``array`` as a tensor of ``like``'s dtype and device."""
    return torch.tensor(np.asarray(array), dtype=like.dtype, device=like.device)


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype
