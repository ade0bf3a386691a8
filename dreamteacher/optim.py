"""Optimizers and learning-rate schedules shared by pretraining, teacher training and fine-tuning."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dtkernels._compat import foreach_lerp_

from .config import PretrainConfig

__all__ = ["Lamb", "ModuleEMA", "build_optimizer", "clip_and_step", "warmup_cosine"]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020): Adam's bias-corrected update with decoupled weight decay, scaled per tensor by the
    trust ratio ``||w|| / ||update||`` (1 when either norm is 0). No host syncs: the ratio stays a tensor."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.lerp_(g, 1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                update = (m / (1.0 - b1 ** state["step"])) / ((v / (1.0 - b2 ** state["step"])).sqrt_().add_(eps))
                if wd:
                    update.add_(p, alpha=wd)
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update.mul_(trust * lr))
        return loss


def build_optimizer(cfg: PretrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernel when available) or LAMB; no weight decay on norms and biases (tensors with ndim <= 1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = tuple(cfg.optim.betas)
    if cfg.optim.name == "lamb":
        return Lamb(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps)
    if cfg.run.naive:  # what a user gets without asking for anything: PyTorch's default implementation
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps)
    return fused_adamw(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps)


def fused_adamw(params: Any, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)`` with the fused kernel (one pass over all parameters; CUDA, and CPU
    since torch 2.4), else the multi-tensor one. On CPU PyTorch's default is the per-tensor loop: for a resnet18
    fine-tune at 32x32 it is more than half of every step (benchmarks/README.md, fine-tune step)."""
    params = list(params)  # a generator would be spent by a failed first attempt
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, foreach=True, **kwargs)


def clip_and_step(optimizer: torch.optim.Optimizer, params: Any, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_(params, max_norm)`` then ``optimizer.step()``; returns the total gradient norm (before
    clipping, like ``clip_grad_norm_``).

    With a fused AdamW the clip coefficient goes into the step instead of a pass over the gradients: the fused
    kernel divides every gradient by ``optimizer.grad_scale`` as it reads it (the attribute ``GradScaler`` uses to
    hand it the loss scale), so setting it to ``1 / coef`` clips for free. That saves one read and one write of every
    gradient per step, measurable on the CPU where a small model's step is bound by parameter-sized memory traffic
    (benchmarks/README.md, pretraining step). Same values up to rounding (``g / (1 / c)`` instead of ``g * c``); a
    non-finite norm poisons the step exactly as ``clip_grad_norm_`` does (coefficient 0 or NaN). Any other optimizer,
    or one that already has a ``grad_scale`` (a float16 ``GradScaler`` step in flight), is clipped the usual way.
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    total = nn.utils.get_total_norm(grads, 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grad_norm_'s coefficient, bit for bit
    fold = optimizer.defaults.get("fused") and getattr(optimizer, "grad_scale", None) is None and grads
    if not fold:
        nn.utils.clip_grads_with_norm_(params, max_norm, total)
        optimizer.step()
        return total
    optimizer.grad_scale = coef.reciprocal()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return total


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up to 1, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ModuleEMA:
    """An exponential moving average of the entries of ``module.state_dict()`` whose names start with ``prefix``
    (the student's, ``student.``, in pretraining): floating tensors (weights and BatchNorm statistics) move as
    ``ema <- d * ema + (1 - d) * value`` after each optimizer step, the others (BatchNorm's batch counters) are
    copied. The decay warms up as ``d_t = min(decay, (1 + t) / (10 + t))`` for update ``t`` (the counting of
    TensorFlow's ExponentialMovingAverage), so a short run's average is not dominated by the initial weights.

    ``state_dict()`` is plain tensors keyed like the module's (``student.body.conv1.weight``); ``load_state_dict``
    restores them exactly, so a resumed run continues the same average bitwise.
    """

    def __init__(self, module: nn.Module, decay: float, prefix: str = "student.") -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay: expected a number in (0, 1), got {decay!r}")
        self.decay = float(decay)
        live = {k: v for k, v in module.state_dict().items() if k.startswith(prefix)}
        if not live:
            raise ValueError(f"prefix: the module has no state named {prefix}*")
        self._live = live  # the module's own tensors (state_dict shares their storage)
        self.shadow = {k: v.detach().clone() for k, v in live.items()}
        self._floats = [k for k, v in live.items() if v.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the module's current state; ``step`` is the optimizer steps done (from 1)."""
        d = min(self.decay, (1.0 + (step - 1)) / (10.0 + (step - 1)))
        foreach_lerp_([self.shadow[k] for k in self._floats], [self._live[k] for k in self._floats], 1.0 - d)
        for k, v in self._live.items():
            if not v.is_floating_point():
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError(f"state: expected the EMA of {len(self.shadow)} tensors named like the module's, got "
                             f"{len(state)} (other names)")
        for k, v in state.items():
            self.shadow[k].copy_(v)
