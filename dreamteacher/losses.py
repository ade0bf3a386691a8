"""The distillation losses as a user writes them without dtkernels: plain eager PyTorch, autograd for the gradient.

``run.naive`` uses these so the naive loop computes the same numbers as the lean loop (``dtkernels.fused_feat_loss``
and ``dtkernels.soft_ce``) and a speed comparison compares like with like; ``tests/test_train.py`` checks the
equality in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["EagerFeatLoss", "eager_feat_loss", "eager_soft_ce"]


class EagerFeatLoss(NamedTuple):
    loss: torch.Tensor
    mse: torch.Tensor  # [L], detached
    at: torch.Tensor  # [L], detached


def eager_feat_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], *, mse_weight: float = 1.0,
                    at_weight: float = 10.0, at_p: float = 2.0, at_mode: str = "paper", whiten: str | None = "channel",
                    eps: float = 1e-5, level_weights: Sequence[float] | None = None, **_: object) -> EagerFeatLoss:
    """``sum_l w_l (mse_weight * mse_l + at_weight * at_l) / sum_l w_l`` with the whitened MSE and the
    attention-transfer term of ``dtkernels.fused_feat_loss`` (same options), per level ``[B, C, H, W]``."""
    weights = list(level_weights) if level_weights is not None else [1.0] * len(student)
    total, mses, ats = 0.0, [], []
    for s, t, w in zip(student, teacher, weights):
        t = t.detach()
        if whiten == "channel":
            target = F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), eps=eps).permute(0, 3, 1, 2)
        elif whiten == "sample":
            target = F.layer_norm(t, t.shape[1:], eps=eps)
        else:
            target = t
        mse = F.mse_loss(s, target)
        qs = F.normalize(s.abs().pow(at_p).sum(1).flatten(1), dim=1)
        qt = F.normalize(t.abs().pow(at_p).sum(1).flatten(1), dim=1)
        at = (qs - qt).norm(dim=1).mean() if at_mode == "paper" else (qs - qt).pow(2).mean()
        total = total + w * (mse_weight * mse + at_weight * at)
        mses.append(mse.detach())
        ats.append(at.detach())
    return EagerFeatLoss(total / sum(weights), torch.stack(mses), torch.stack(ats))


def eager_soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tau: float = 4.0) -> torch.Tensor:
    """Mean over positions of ``-sum_k softmax(t / tau)_k log_softmax(s / tau)_k`` (classes on dim 1)."""
    pt = torch.softmax(teacher_logits.detach() / tau, dim=1)
    return -(pt * torch.log_softmax(student_logits / tau, dim=1)).sum(1).mean()
