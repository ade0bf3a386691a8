"""The private PyTorch APIs that dtkernels and dreamteacher use, in one place.

Each has no public equivalent for what it does here (listed in :data:`PRIVATE_APIS`). A PyTorch release may rename
or remove any of them without notice, so they are looked up once, here, and nowhere else: tests/test_compat.py
fails naming the one that is gone (and checks that each still behaves as relied on), and the package still imports
without it; only a call of the missing API raises, with the same message. pyproject.toml pins torch to the releases
this was tested with.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch

__all__ = [
    "PRIVATE_APIS",
    "OpOverload",
    "auto_dispatch_below_autograd",
    "current_dispatch_mode",
    "foreach_lerp_",
    "has_kernel_for_dispatch_key",
    "missing_apis",
]

logger = logging.getLogger("dtkernels")

#: Dotted name of each private API -> what it is used for.
PRIVATE_APIS: dict[str, str] = {
    "torch._C._AutoDispatchBelowAutograd": (
        "context manager: call an op's kernels below the Autograd key, from the eager autograd.Function around the "
        "dispatcher (dtkernels._dispatch.Op.impl('dispatch')); the public alternative, register_autograd's wrapper, "
        "is the per-call Python cost the fast path avoids"),
    "torch._C._dispatch_has_kernel_for_dispatch_key": (
        "whether the C++ library registered a kernel of a dtkernels op for a dispatch key (CPU, Autograd)"),
    "torch.utils._python_dispatch._get_current_dispatch_mode": (
        "whether a TorchDispatchMode (fake tensors, make_fx, FlopCounter...) is active, so eager fast paths that "
        "read tensor values or skip the registered op step aside"),
    "torch._ops.OpOverload": "the type of torch.ops.<ns>.<op>.default (annotations)",
    "torch._foreach_lerp_": "in-place lerp of a list of tensors in one call (EMA of model weights)",
}


def _lookup(dotted: str) -> Any | None:
    """The object at ``dotted`` (``torch.a.b``), importing submodules on the way; None if any part is missing."""
    parts = dotted.split(".")
    obj: Any = torch
    path = parts[0]
    for part in parts[1:]:
        path = f"{path}.{part}"
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:  # a submodule that is not imported yet (torch.utils._python_dispatch)
            obj = importlib.import_module(path)
        except ImportError:
            return None
    return obj


def _missing_message(name: str) -> str:
    return (f"dtkernels needs the private PyTorch API {name}, which torch {torch.__version__} does not have "
            f"(used for: {PRIVATE_APIS[name]}); see dtkernels/_compat.py")


def _resolve(name: str) -> Any:
    obj = _lookup(name)
    if obj is not None:
        return obj

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(_missing_message(name))

    missing.__qualname__ = missing.__name__ = f"missing[{name}]"
    return missing


_RESOLVED: dict[str, Any] = {name: _resolve(name) for name in PRIVATE_APIS}


def missing_apis() -> list[str]:
    """The names in :data:`PRIVATE_APIS` that this torch does not have (empty when all resolve)."""
    return [name for name, obj in _RESOLVED.items() if getattr(obj, "__name__", "").startswith("missing[")]


#: ``with auto_dispatch_below_autograd(): op(*args)`` runs ``op``'s kernel for the tensors' backend, no autograd.
auto_dispatch_below_autograd = _RESOLVED["torch._C._AutoDispatchBelowAutograd"]
#: ``has_kernel_for_dispatch_key("ns::op", "CPU") -> bool``.
has_kernel_for_dispatch_key = _RESOLVED["torch._C._dispatch_has_kernel_for_dispatch_key"]
#: ``current_dispatch_mode()``: the innermost active TorchDispatchMode, or None.
current_dispatch_mode = _RESOLVED["torch.utils._python_dispatch._get_current_dispatch_mode"]
#: ``foreach_lerp_(targets, ends, weight)``: ``t.lerp_(e, weight)`` for every pair, in one call.
foreach_lerp_ = _RESOLVED["torch._foreach_lerp_"]
#: The type of ``torch.ops.<ns>.<op>.<overload>``.
OpOverload = _RESOLVED["torch._ops.OpOverload"]

if missing_apis():
    logger.warning("dtkernels: torch %s lacks private APIs that some code paths need: %s", torch.__version__,
                   ", ".join(missing_apis()))
