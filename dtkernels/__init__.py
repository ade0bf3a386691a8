"""dtkernels: fused kernels for DreamTeacher-style feature distillation.

CPU tensors run C++ kernels (``dtkernels._C``), CUDA tensors run Triton kernels, anything else runs the eager
reference in :mod:`dtkernels.reference`. :func:`backends` says which are available here and why not.
"""

from . import modes, reference
from ._dispatch import backends, get_backend, set_backend, use_backend
from .functional import (
    FeatLossParts,
    at_loss,
    attention_map,
    fused_feat_loss,
    group_norm_act,
    ln_mse_loss,
    q_sample,
    soft_ce,
)
from .modules import FusedFeatLoss, SoftCrossEntropy

__all__ = [
    "fused_feat_loss",
    "ln_mse_loss",
    "at_loss",
    "attention_map",
    "FeatLossParts",
    "FusedFeatLoss",
    "soft_ce",
    "q_sample",
    "group_norm_act",
    "SoftCrossEntropy",
    "backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "reference",
    "modes",
]
__version__ = "0.1.0"
