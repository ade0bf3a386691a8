"""``dtkernels::soft_ce`` (temperature-scaled soft cross-entropy) and ``dtkernels::soft_ce_backward``.

Kernels: ``csrc/soft_ce.cpp`` (CPU), :mod:`dtkernels.triton.soft_ce` (CUDA), reference
:func:`dtkernels.reference.soft_ce_op` / :func:`dtkernels.reference.soft_ce_backward_op`. Inputs are canonical
``[B, K, P]`` views (built by :func:`dtkernels.soft_ce`). With reduction mean/sum the forward writes the student
gradient for ``grad_output == 1`` and the backward scales it; with reduction none the backward calls
``soft_ce_backward`` with the per-position upstream gradient.
"""

from __future__ import annotations

import torch

from .. import _dispatch, reference
from ..modes import Reduction

__all__ = ["SCHEMA", "BACKWARD_SCHEMA", "OP", "BACKWARD_OP", "soft_ce"]

SCHEMA = ("soft_ce(Tensor student, Tensor teacher, Tensor? mask, float tau, float scale, int reduction, "
          "bool compute_grad) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("soft_ce_backward(Tensor student, Tensor teacher, Tensor? mask, Tensor grad_loss, float tau, "
                   "float scale) -> Tensor")


def _fake(student, teacher, mask, tau, scale, reduction, compute_grad):
    dt = reference.compute_dtype(student)
    per_position = reduction == Reduction.NONE
    shape = (student.shape[0], student.shape[2]) if per_position else ()
    grad = torch.empty_like(student) if (compute_grad and not per_position) else student.new_empty((0,))
    return student.new_empty(shape, dtype=dt), grad


def _backward_fake(student, teacher, mask, grad_loss, tau, scale):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, mask, tau, scale, reduction, compute_grad = inputs
    ctx.set_materialize_grads(False)  # no zero-filled gradient-sized tensor for the unused gradient output
    ctx.reduction, ctx.tau, ctx.scale, ctx.compute_grad = reduction, tau, scale, compute_grad
    if reduction == Reduction.NONE:
        ctx.save_for_backward(student, teacher, mask)
    else:
        ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad):
    if not ctx.compute_grad:
        raise RuntimeError("dtkernels.soft_ce: backward called on a call made with compute_grad=False")
    if ctx.reduction == Reduction.NONE:
        student, teacher, mask = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None
        grad = BACKWARD_OP.call_in_backward(ctx, student, teacher, mask, grad_loss, ctx.tau, ctx.scale)
    else:
        (grad,) = _dispatch.scale_saved_grads(ctx.saved_tensors, grad_loss, ctx)
    return grad, None, None, None, None, None, None


BACKWARD_OP = _dispatch.Op(BACKWARD_SCHEMA, reference=reference.soft_ce_backward_op,
                           triton=("soft_ce", "soft_ce_backward"), fake=_backward_fake, public_name="soft_ce")
OP = _dispatch.Op(SCHEMA, reference=reference.soft_ce_op, triton=("soft_ce", "soft_ce"), fake=_fake,
                  setup_context=_setup_context, backward=_backward)


def soft_ce(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, tau: float, scale: float,
            reduction: Reduction, compute_grad: bool) -> torch.Tensor:
    """Run ``dtkernels::soft_ce`` on canonical ``[B, K, P]`` inputs (checked by :func:`dtkernels.soft_ce`).

    Returns:
        The loss: ``[B, P]`` for :attr:`Reduction.NONE`, 0-dim otherwise.
    """
    return OP(student, teacher, mask, float(tau), float(scale), int(reduction), bool(compute_grad))[0]
