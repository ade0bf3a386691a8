"""``nn.Module`` wrappers of the public functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import functional as F
from .modes import Reduction

__all__ = ["FusedFeatLoss", "SoftCrossEntropy"]


class FusedFeatLoss(nn.Module):
    """Module form of :func:`dtkernels.fused_feat_loss`; holds the loss options, no parameters.

    Example:
        >>> criterion = FusedFeatLoss(at_weight=10.0)
        >>> loss = criterion(student_levels, teacher_levels)
    """

    def __init__(self, *, mse_weight: float = 1.0, at_weight: float = 10.0, at_p: float = 2.0,
                 at_mode: str = "paper", whiten: str | None = "channel", eps: float = 1e-5,
                 level_weights: Sequence[float] | None = None, return_parts: bool = False) -> None:
        super().__init__()
        # Validate once here so a bad option fails at construction, not at the first training step.
        F._check_number(mse_weight, "mse_weight", minimum=0.0)
        F._check_number(at_weight, "at_weight", minimum=0.0)
        F._check_number(at_p, "at_p", minimum=1.0)
        F._check_number(eps, "eps", minimum=0.0, strict=True)
        F._whiten_code(whiten)
        F._at_code(at_mode)
        if level_weights is not None:
            F._level_coefficients(level_weights, len(level_weights))
        self.mse_weight, self.at_weight, self.at_p, self.at_mode = mse_weight, at_weight, at_p, at_mode
        self.whiten, self.eps, self.return_parts = whiten, eps, return_parts
        self.level_weights = None if level_weights is None else [float(w) for w in level_weights]

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]):
        return F.fused_feat_loss(student, teacher, mse_weight=self.mse_weight, at_weight=self.at_weight,
                                 at_p=self.at_p, at_mode=self.at_mode, whiten=self.whiten, eps=self.eps,
                                 level_weights=self.level_weights, return_parts=self.return_parts)

    def extra_repr(self) -> str:
        return (f"mse_weight={self.mse_weight}, at_weight={self.at_weight}, at_p={self.at_p}, "
                f"at_mode={self.at_mode!r}, whiten={self.whiten!r}, eps={self.eps}, "
                f"level_weights={self.level_weights}, return_parts={self.return_parts}")


class SoftCrossEntropy(nn.Module):
    """Module form of :func:`dtkernels.soft_ce` (label distillation with temperature ``tau``)."""

    def __init__(self, *, tau: float = 4.0, dim: int = 1, scale_by_tau_sq: bool = False,
                 reduction: str = "mean") -> None:
        super().__init__()
        F._check_number(tau, "tau", minimum=0.0, strict=True)
        Reduction.from_arg(reduction)
        self.tau, self.dim, self.scale_by_tau_sq, self.reduction = float(tau), dim, scale_by_tau_sq, reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.soft_ce(student_logits, teacher_logits, tau=self.tau, dim=self.dim,
                         scale_by_tau_sq=self.scale_by_tau_sq, reduction=self.reduction, mask=mask)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, dim={self.dim}, scale_by_tau_sq={self.scale_by_tau_sq}, reduction={self.reduction!r}"
