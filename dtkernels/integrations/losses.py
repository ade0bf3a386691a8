"""Framework-free pieces the adapters share: KD's KL divergence on ``soft_ce``, and a teacher feature map reshaped to
a student's channel count for attention transfer.

Distillation frameworks write KD as ``KLDivLoss(log_softmax(s/T), softmax(t/T))`` and let the teacher of an AT pair
have more channels than the student; the dtkernels ops take the soft cross-entropy and equal shapes. These two
functions close both gaps exactly (``tests/test_integrations_torchdistill.py``, ``tests/test_examples.py``).
"""

from __future__ import annotations

import torch

from .. import functional

__all__ = ["soft_kl_div", "at_teacher_like"]

_REDUCTIONS = ("batchmean", "mean", "sum")


def soft_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float,
                reduction: str = "batchmean") -> torch.Tensor:
    """``KLDivLoss(reduction)(log_softmax(s/T, 1), softmax(t/T, 1))``, the student part on :func:`dtkernels.soft_ce`.

    ``KL(p_t || p_s) = H(p_t, p_s) - H(p_t)``: the soft cross-entropy (which writes the student gradient in its
    forward pass) minus the teacher's entropy, a constant for the student computed without grad.

    Args:
        student_logits: ``[N, K]`` or ``[B, K, ...]``, classes on axis 1; receives the gradient.
        teacher_logits: same shape; never receives a gradient.
        temperature: ``T > 0``.
        reduction: ``'batchmean'`` (sum / B), ``'mean'`` (sum / number of elements) or ``'sum'``.

    Returns:
        The 0-dim loss (float32 for half logits).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {list(_REDUCTIONS)}, got {reduction!r}")
    if student_logits.dim() < 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: expected the shape of student_logits {tuple(student_logits.shape)} "
                         f"([N, K, ...]), got {tuple(teacher_logits.shape)}")
    s, t = student_logits, teacher_logits.detach()
    if s.dim() not in (2, 4):  # soft_ce takes [N, K] or [B, K, H, W]; any other layout as rows of classes
        s, t = s.movedim(1, -1).reshape(-1, s.shape[1]), t.movedim(1, -1).reshape(-1, t.shape[1])
    tau = float(temperature)
    cross_entropy = functional.soft_ce(s, t, tau=tau, dim=1, reduction="sum")
    with torch.no_grad():
        log_p = torch.log_softmax(t.to(cross_entropy.dtype) / tau, dim=1)
        # sum p log p (= -H(p_t)); log_softmax is finite, so p = 0 contributes 0, as KLDivLoss's xlogy does.
        neg_entropy = (log_p.exp() * log_p).sum()
    total = cross_entropy + neg_entropy
    if reduction == "batchmean":
        return total / student_logits.shape[0]
    if reduction == "mean":
        return total / student_logits.numel()
    return total


def at_teacher_like(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The teacher map ``[B, C_t, H, W]`` as a ``[B, C_s, H, W]`` tensor with the same attention map (``p = 2``).

    The attention map of ``x`` depends only on its per-position energy ``sum_c x**2``; a tensor whose C_s channels
    all hold ``sqrt(sum_c t**2 / C_s)`` has that energy. It is a broadcast view (no ``[B, C_s, H, W]`` copy). Only for
    attention transfer with ``at_p=2`` and no MSE term; a teacher that already has the student's shape is returned
    as it is (cast to the student's dtype).
    """
    if teacher.dim() != 4 or student.dim() != 4:
        raise ValueError(f"teacher, student: expected 4-D feature maps [B, C, H, W], got {tuple(teacher.shape)} and "
                         f"{tuple(student.shape)}")
    if teacher.shape[1] == student.shape[1]:
        return teacher.to(student.dtype)
    x = teacher.detach().to(torch.promote_types(teacher.dtype, torch.float32))
    energy = x.pow(2).sum(1, keepdim=True).div(student.shape[1]).sqrt()
    return energy.to(student.dtype).expand(-1, student.shape[1], -1, -1)
