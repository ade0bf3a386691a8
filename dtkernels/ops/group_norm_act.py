"""``dtkernels::group_norm_act``: ``act(GroupNorm(x) * (1 + scale) + shift)``, the teacher's fused normalization.

Kernels: ``csrc/group_norm_act.cpp`` (CPU), :mod:`dtkernels.triton.group_norm_act` (CUDA), reference
:func:`dtkernels.reference.group_norm_act_op`. Inference only: no autograd is registered (the teacher is frozen);
:func:`dtkernels.group_norm_act` refuses inputs that require grad while grad mode is on, so no call can silently
produce a wrong gradient.
"""

from __future__ import annotations

import torch

from .. import _dispatch, reference

__all__ = ["SCHEMA", "OP", "group_norm_act"]

SCHEMA = ("group_norm_act(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, "
          "float eps, int act) -> Tensor")


def _fake(x, num_groups, weight, bias, scale, shift, eps, act):
    return torch.empty_like(x)


OP = _dispatch.Op(SCHEMA, reference=reference.group_norm_act_op, triton=("group_norm_act", "group_norm_act"),
                  fake=_fake, public_name="group_norm_act")


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float, act: int) -> torch.Tensor:
    """Run ``dtkernels::group_norm_act`` (arguments checked by :func:`dtkernels.group_norm_act`).

    Returns:
        ``[B, C, *spatial]`` like ``torch.empty_like(x)``.
    """
    return OP(x, int(num_groups), weight, bias, scale, shift, float(eps), int(act))
