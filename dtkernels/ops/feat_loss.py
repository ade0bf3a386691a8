"""``dtkernels::feat_loss``: the multi-level DreamTeacher feature-distillation loss and its student gradient.

Kernels: ``csrc/feat_loss.cpp`` (CPU), :mod:`dtkernels.triton.feat_loss` (CUDA), reference
:func:`dtkernels.reference.feat_loss_op` (everything else, and the specification). The forward writes the student
gradient for ``grad_output == 1`` in the same pass (``compute_grad``), so the backward only scales it
(:func:`dtkernels._dispatch.scale_saved_grads`).

Plain eager calls on CPU tensors (automatic backend) take ``dtkernels::feat_loss_eager``: the same C++ kernel with
the same backward (``scale_grads_cpu``, the CPU kernel of ``dtkernels::scale_grads`` that :func:`_backward` calls)
in a C++ ``autograd::Function``, so neither direction re-enters Python; a Python ``autograd.Function`` round trip
is a visible share of a call on small levels (benchmarks/README.md). Every other call takes :data:`OP`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _dispatch, reference
from ..modes import AtMode, Whitening

__all__ = ["SCHEMA", "EAGER_SCHEMA", "OP", "feat_loss"]

SCHEMA = (
    "feat_loss(Tensor[] student, Tensor[] teacher, float[] level_coef, float mse_weight, float at_weight, "
    "float at_p, int at_mode, int whiten, float eps, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor[])"
)


#: The C++ eager route (csrc/feat_loss.cpp registers it at the CPU and Autograd keys; no other kernel anywhere).
EAGER_SCHEMA = (
    "feat_loss_eager(Tensor[] student, Tensor[] teacher, float[] level_coef, float mse_weight, float at_weight, "
    "float at_p, int at_mode, int whiten, float eps, bool compute_grad) -> (Tensor, Tensor, Tensor)"
)


def _fake(student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps, compute_grad):
    out_dtype = reference.compute_dtype(student[0])
    n = len(student)
    loss = student[0].new_empty((), dtype=out_dtype)
    grads = [torch.empty_like(s) for s in student] if compute_grad else []
    return loss, student[0].new_empty((n,), dtype=out_dtype), student[0].new_empty((n,), dtype=out_dtype), grads


def _setup_context(ctx, inputs, output):
    student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps, compute_grad = inputs
    # The unused outputs (parts, gradient buffers) get no gradient: without this autograd would allocate zero
    # tensors the size of the student gradient for them in backward.
    ctx.set_materialize_grads(False)
    ctx.n_levels = len(student)
    ctx.compute_grad = compute_grad
    ctx.save_for_backward(*output[3])


def _backward(ctx, grad_loss, grad_mse, grad_at, grad_grads):
    if not ctx.compute_grad:
        raise RuntimeError("dtkernels.feat_loss: backward called on a call made with compute_grad=False; "
                           "call fused_feat_loss with grad mode enabled and a student that requires grad")
    grads = _dispatch.scale_saved_grads(ctx.saved_tensors, grad_loss, ctx)
    return grads, [None] * ctx.n_levels, None, None, None, None, None, None, None, None


OP = _dispatch.Op(SCHEMA, reference=reference.feat_loss_op, triton=("feat_loss", "feat_loss"), fake=_fake,
                  setup_context=_setup_context, backward=_backward, public_name="fused_feat_loss")
_dispatch.lib.define(EAGER_SCHEMA)
_EAGER = (torch.ops.dtkernels.feat_loss_eager.default
          if _dispatch.has_cpp_kernel("dtkernels::feat_loss_eager", "Autograd") else None)


def feat_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], level_coef: Sequence[float],
              mse_weight: float, at_weight: float, at_p: float, at_mode: AtMode, whiten: Whitening, eps: float,
              compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``dtkernels::feat_loss`` (arguments already checked by :func:`dtkernels.fused_feat_loss`).

    Returns:
        ``(loss [], mse [L], at [L])``.
    """
    args = (list(student), list(teacher), list(level_coef), float(mse_weight), float(at_weight), float(at_p),
            int(at_mode), int(whiten), float(eps), bool(compute_grad))
    if _EAGER is not None and student[0].device.type == "cpu" and _dispatch.takes_eager_route(args[0] + args[1]):
        return _EAGER(*args)
    loss, mse, at, _ = OP(*args)
    return loss, mse, at
