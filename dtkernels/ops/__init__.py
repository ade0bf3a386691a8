"""The ``dtkernels`` ops, one module each: schema, fake kernel, autograd formula and dispatch.

Importing this package defines every op in the ``dtkernels`` namespace (``torch.ops.dtkernels.*``). The kernels live
in ``csrc/<op>.cpp`` (CPU) and ``dtkernels/triton/<op>.py`` (CUDA), the specification in ``dtkernels/reference.py``;
ARCHITECTURE.md lists one op's files.
"""

from . import feat_loss, group_norm_act, q_sample, soft_ce

__all__ = ["feat_loss", "soft_ce", "q_sample", "group_norm_act"]
