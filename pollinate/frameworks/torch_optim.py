"""The local optimizers of ``TorchClassifier``: SGD and Adam without ``torch.optim``.

Why not ``torch.optim``: the first ``torch.optim`` optimizer a process builds imports
``torch._dynamo`` (``Optimizer.__init__`` and ``state_dict`` are wrapped by
``torch._disable_dynamo``, ``step`` by ``_use_grad_for_differentiable``, both of which import
it). That is about 1.5 s of CPU on the 2-core benchmark machine and ~300 MiB of memory, paid
once per process: in every process-backend worker of every ``simulate()`` call (in the first
task of round 1) and in every deployed ``pollinate client``. For a small model that is more
than the whole training of a round.

What they compute: exactly the arithmetic of torch's single-tensor implementations
(``torch/optim/sgd.py:_single_tensor_sgd`` and ``torch/optim/adam.py:_single_tensor_adam``)
with the settings pollinate exposes (SGD: lr, momentum, weight_decay, no dampening, no
Nesterov; Adam: lr, weight_decay (L2, not decoupled), betas (0.9, 0.999), eps 1e-8, no
amsgrad), the same tensor operations in the same order, so on CPU — where ``torch.optim``
uses the single-tensor path by default — the results are bit-identical to
``torch.optim.SGD`` / ``torch.optim.Adam`` (tested). On a GPU ``torch.optim`` would default to
its ``foreach`` implementation, which may round differently; these optimizers do the
single-tensor arithmetic on every device.

Like ``torch.optim`` with its defaults, ``zero_grad`` sets gradients to ``None`` and a
parameter without a gradient is skipped by ``step``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch


class LocalOptimizer(Protocol):
    """What the training loop needs of an optimizer."""

    def zero_grad(self) -> None: ...

    def step(self) -> None: ...


class _Optimizer:
    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)

    def zero_grad(self) -> None:
        """Set every gradient to ``None`` (``torch.optim``'s default ``set_to_none=True``)."""
        for p in self.params:
            p.grad = None


class SGD(_Optimizer):
    """SGD with optional momentum and L2 weight decay, as ``torch.optim.SGD`` computes it.

    g ← ∇ + λ·θ (λ > 0); with momentum μ > 0: b ← g at the first step, else b ← μ·b + g,
    and g ← b; then θ ← θ − lr·g.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.momentum_buffers: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for param in self.params:
            grad = param.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.momentum_buffers.get(param)
                if buf is None:
                    buf = self.momentum_buffers[param] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)  # torch: alpha=1 - dampening
                grad = buf
            param.add_(grad, alpha=-self.lr)


class Adam(_Optimizer):
    """Adam (Kingma & Ba 2015, arXiv 1412.6980) with L2 weight decay, as ``torch.optim.Adam``.

    g ← ∇ + λ·θ; m ← lerp(m, g, 1 − β1); v ← β2·v + (1 − β2)·g²; with t the step count,
    θ ← θ − lr / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params)
        self.lr = lr
        self.weight_decay = weight_decay
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps: dict[torch.Tensor, int] = {}
        self.exp_avgs: dict[torch.Tensor, torch.Tensor] = {}
        self.exp_avg_sqs: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.beta1, self.beta2
        for param in self.params:
            grad = param.grad
            if grad is None:
                continue
            if param not in self.steps:
                self.steps[param] = 0
                self.exp_avgs[param] = torch.zeros_like(param, memory_format=torch.preserve_format)
                self.exp_avg_sqs[param] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
            # torch counts steps in a float32 tensor and reads them back with .item(): the
            # same values as this int below 2**24 steps
            self.steps[param] += 1
            step = float(self.steps[param])
            exp_avg, exp_avg_sq = self.exp_avgs[param], self.exp_avg_sqs[param]
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if torch.is_complex(param):
                grad = torch.view_as_real(grad)
                exp_avg = torch.view_as_real(exp_avg)
                exp_avg_sq = torch.view_as_real(exp_avg_sq)
                param = torch.view_as_real(param)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
