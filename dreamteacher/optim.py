"""Optimizers and learning-rate schedules shared by pretraining, teacher training and fine-tuning."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import PretrainConfig

__all__ = ["Lamb", "build_optimizer", "warmup_cosine"]


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
    try:  # one fused kernel over all parameters (CUDA, and CPU since torch 2.4)
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=betas, eps=cfg.optim.eps, foreach=True)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up to 1, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
