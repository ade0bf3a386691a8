"""dtkernels: fused kernels for DreamTeacher-style feature distillation (C++ on CPU, Triton on CUDA)."""

from . import reference
from ._library import backends, get_backend, set_backend, use_backend

__all__ = ["reference", "backends", "get_backend", "set_backend", "use_backend"]
__version__ = "0.1.0"
