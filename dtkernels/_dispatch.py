"""Backend choice and the registration machinery shared by the ops in :mod:`dtkernels.ops`.

Each op module (``dtkernels/ops/<op>.py``) writes its schema, fake kernel and autograd formula (``setup_context`` +
``backward``) once and hands them to :class:`Op`, which registers them in the ``dtkernels`` namespace:

* CPU: C++ kernels from ``csrc/`` (``dtkernels._C``, loaded here; the shared object registers them with
  ``TORCH_LIBRARY_IMPL(dtkernels, CPU, m)``);
* CUDA: the op's Triton launcher in ``dtkernels.triton.<module>``, when Triton imports;
* every other case: the eager reference (``dtkernels.reference``), registered as the ``CompositeExplicitAutograd``
  catch-all, which warns once per op and device type;
* autograd: ``torch.library.register_autograd`` with the op's ``setup_context`` and ``backward``.

Calling an :class:`Op` picks the route:

* traced calls (torch.compile, fake tensors, any TorchDispatchMode) call the registered op, so graphs contain
  ``dtkernels::<op>`` with its registered autograd;
* plain eager calls on the automatic backend, and every call on a forced backend (``dtkernels.use_backend(name)``,
  ``set_backend`` or the ``DTKERNELS_BACKEND`` environment variable: ``auto``, ``cpp``, ``triton``, ``reference``),
  run the chosen kernel inside :class:`_EagerFunction`, a plain ``autograd.Function`` that calls the *same*
  ``setup_context`` and ``backward`` the op registered. It skips ``register_autograd``'s generic wrapper, which
  flattens and re-checks every argument in Python on each forward and backward; the formula is not repeated.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from . import _compat, reference

logger = logging.getLogger("dtkernels")

__all__ = ["BACKENDS", "Op", "backends", "get_backend", "set_backend", "use_backend", "is_plain_eager",
           "scale_saved_grads", "triton_interpreting"]

BACKENDS = ("auto", "cpp", "triton", "reference")

# --------------------------------------------------------------------------------------------------------------
# Native library and Triton
# --------------------------------------------------------------------------------------------------------------
CPP_ERROR: str | None
try:
    # Loading the shared object runs its TORCH_LIBRARY_IMPL registrations.
    _C = importlib.import_module("dtkernels._C")

    CPP_ERROR = None
except ImportError as exc:  # not built (DTKERNELS_BUILD_CPP=0), or built against another torch
    _C = None
    CPP_ERROR = f"dtkernels._C did not load ({exc}); build it with `pip install --no-build-isolation -e .`"

TRITON_ERROR: str | None
try:
    import triton  # noqa: F401

    TRITON_ERROR = None
except ImportError as exc:
    TRITON_ERROR = f"triton is not installed ({exc})"

#: The ``dtkernels`` operator namespace; every op module defines its schemas in it.
lib = torch.library.Library("dtkernels", "DEF")  # noqa: TOR901


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backends() -> dict[str, dict[str, object]]:
    """Which kernel backends this process can run, and why not when it cannot.

    Returns:
        ``{"cpp": {...}, "triton": {...}, "reference": {...}}``, each with ``available`` (bool), ``devices`` and
        ``detail`` (build information, or the reason it is unavailable).
    """
    cpp_detail = CPP_ERROR if _C is None else _C.build_info()
    if TRITON_ERROR is not None:
        triton_ok, triton_detail = False, TRITON_ERROR
    elif torch.cuda.is_available():
        triton_ok, triton_detail = True, f"CUDA device {torch.cuda.get_device_name()}"
    elif triton_interpreting():
        triton_ok, triton_detail = True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter on CPU tensors"
    else:
        triton_ok, triton_detail = False, "no CUDA device (torch.cuda.is_available() is False)"
    return {
        "cpp": {"available": _C is not None, "devices": ("cpu",), "detail": cpp_detail},
        "triton": {"available": triton_ok, "devices": ("cuda",), "detail": triton_detail},
        "reference": {"available": True, "devices": ("any",), "detail": "eager PyTorch (dtkernels.reference)"},
    }


# --------------------------------------------------------------------------------------------------------------
# Forcing a backend
# --------------------------------------------------------------------------------------------------------------
_state = threading.local()


def _check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The forced backend, or ``"auto"`` (dispatch on the tensors' device)."""
    forced = getattr(_state, "backend", None)
    if forced is not None:
        return forced
    return _check_backend_name(os.environ.get("DTKERNELS_BACKEND", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Force a backend for this thread: ``"auto"`` (default), ``"cpp"``, ``"triton"`` or ``"reference"``."""
    _state.backend = _check_backend_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that forces a backend for this thread, e.g. ``with dtkernels.use_backend("reference"):``."""
    previous = getattr(_state, "backend", None)
    _state.backend = _check_backend_name(name)
    try:
        yield
    finally:
        _state.backend = previous


# --------------------------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------------------------
def is_plain_eager(t: torch.Tensor) -> bool:
    """True for a real tensor outside any tracing (dynamo, AOT autograd, make_fx), where reading a value is safe."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _compat.current_dispatch_mode() is None)


def _fast_eager(tensors: Sequence[torch.Tensor]) -> bool:
    """True when an automatic-backend call may run in :class:`_EagerFunction` instead of the registered op: plain
    tensors, no tracing (dynamo, AOT autograd, fake tensors, make_fx) and no dispatch mode."""
    if torch.compiler.is_compiling() or _compat.current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor for t in tensors)


def takes_eager_route(tensors: Sequence[torch.Tensor]) -> bool:
    """True when a call on the automatic backend may take an op's C++ eager route (plain tensors, not traced)."""
    return get_backend() == "auto" and _fast_eager(tensors)


def has_cpp_kernel(qualname: str, key: str) -> bool:
    """Whether the C++ library loaded and registered a kernel of ``qualname`` for dispatch key ``key``."""
    return _C is not None and _compat.has_kernel_for_dispatch_key(qualname, key)


_warned: set[tuple[str, str]] = set()


def _warn_fallback(op: str, device: torch.device) -> None:
    key = (op, device.type)
    if key in _warned:
        return
    _warned.add(key)
    if device.type == "cpu":
        why = CPP_ERROR or "the C++ library has no kernel for this call"
    elif device.type == "cuda":
        why = TRITON_ERROR or "no Triton kernel for this call"
    else:
        why = f"no kernel for device type {device.type!r}"
    warnings.warn(f"dtkernels.{op}: running the eager PyTorch reference on {device.type} ({why}).",
                  RuntimeWarning, stacklevel=4)


def _first_tensor(args: Sequence[object]) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("dtkernels: an op call without tensor arguments")


#: The backward kernel of the ops whose forward writes the student gradient: ``grads * grad_out``, handing the saved
#: tensors on unchanged when ``grad_out`` is exactly 1 (so its outputs may be its inputs: it is called only for plain
#: eager tensors, never traced). CPU: ``scale_grads_cpu`` in csrc/feat_loss.cpp, which is also the backward of the
#: C++ eager route ``dtkernels::feat_loss_eager``; elsewhere the reference.
SCALE_GRADS_SCHEMA = "scale_grads(Tensor[] grads, Tensor grad_out) -> Tensor[]"
lib.define(SCALE_GRADS_SCHEMA)
lib.impl("scale_grads", reference.scale_grads_op, "CompositeExplicitAutograd")


def scale_saved_grads(grads: Sequence[torch.Tensor], grad_out: torch.Tensor | None,
                      ctx: object | None = None) -> list[torch.Tensor | None]:
    """``grad * grad_out`` for gradients the forward precomputed for ``grad_output == 1``: the backward of every op
    whose forward writes the student gradient (feat_loss, soft_ce with mean/sum).

    CPU: ``dtkernels::scale_grads`` (the C++ kernel reads the scalar on the host, free, and skips the multiply when
    it is 1). CUDA: a Triton kernel (``dtkernels.triton.feat_loss.scale_``) reads it on the device and scales the
    saved buffers in place, returning early when it is 1, so there is no host sync and no extra buffer; a second
    backward through the same graph (``retain_graph=True``) is then refused rather than scaled twice. Traced
    (torch.compile): the reference's plain multiply, which the compiler fuses. ``grad_out`` is None when the loss
    did not contribute to what is being differentiated.
    """
    if grad_out is None:
        return [None] * len(grads)
    if is_plain_eager(grad_out):
        if grad_out.device.type == "cpu":
            return torch.ops.dtkernels.scale_grads.default(list(grads), grad_out)
        elif grad_out.device.type == "cuda" and TRITON_ERROR is None:
            if ctx is not None:
                if getattr(ctx, "grads_consumed", False):
                    raise RuntimeError("dtkernels: backward through the same loss twice is not supported on CUDA "
                                       "(the gradient buffers were scaled in place); recompute the loss instead")
                ctx.grads_consumed = True
                from .triton.feat_loss import scale_

                return scale_(grads, grad_out)
    return reference.scale_grads_op(grads, grad_out)


# --------------------------------------------------------------------------------------------------------------
# One op
# --------------------------------------------------------------------------------------------------------------
def _flatten(values: Sequence[object]) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """The tensors of ``values`` (an op's arguments: tensors and lists of tensors, in order) and, per value, how many
    it contributed: -1 for a tensor, ``n`` for a list of ``n`` tensors, 0 for anything else."""
    flat: list[torch.Tensor] = []
    counts = []
    for v in values:
        if isinstance(v, torch.Tensor):
            flat.append(v)
            counts.append(-1)
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            flat.extend(v)
            counts.append(len(v))
        else:
            counts.append(0)
    return flat, tuple(counts)


class _Untracked:
    """An output tensor that ``setup_context`` saved for backward, handed out of :class:`_EagerFunction` as a plain
    object: autograd then neither tracks it nor lets ``AccumulateGrad`` steal it as ``.grad`` (a later in-place
    ``.grad`` accumulation would change the saved buffer under a retained graph)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _EagerFunction(torch.autograd.Function):
    """An op's kernel on one backend, with the op's own ``setup_context`` and ``backward`` (see the module doc).

    Outputs keep the op's structure: ``Tensor[]`` outputs pass through as lists (untracked, as autograd passes any
    non-tensor output), and outputs that ``setup_context`` saved come out wrapped in :class:`_Untracked`."""

    @staticmethod
    def forward(ctx, op: Op, backend: str, args: tuple, *tensors: torch.Tensor):
        # ``tensors`` are the tensors inside ``args``, passed again only so that autograd records their edges.
        out = op.impl(backend)(*args)
        ctx.dtk_backend = backend
        ctx.dtk_op = op
        ctx.dtk_in_counts = _flatten(args)[1]
        op.setup_context(ctx, args, out)
        saved = {id(t) for t in (getattr(ctx, "to_save", None) or ()) if t is not None}
        return tuple(_Untracked(o) if isinstance(o, torch.Tensor) and id(o) in saved else o for o in out)

    @staticmethod
    def backward(ctx, *grad_outputs):
        grads = ctx.dtk_op.backward(ctx, *grad_outputs)  # None for the untracked outputs
        flat: list[torch.Tensor | None] = [None, None, None]
        for g, n in zip(grads, ctx.dtk_in_counts):
            if n == -1:
                flat.append(g)
            elif n > 0:
                flat.extend([None] * n if g is None else g)
        return tuple(flat)


class Op:
    """One ``dtkernels`` op: defines the schema and registers every kernel, the fake kernel and the autograd formula.

    Args:
        schema: the op's schema, e.g. ``"q_sample(Tensor x0, ...) -> (Tensor, Tensor)"``.
        reference: the eager reference (``dtkernels.reference.<op>_op``): the fallback kernel and the forced
            ``"reference"`` backend.
        triton: ``(module, function)`` of the Triton launcher in ``dtkernels.triton``.
        fake: the fake (meta) kernel.
        setup_context, backward: the autograd formula, as for ``torch.library.register_autograd``; None for an op
            that is only called from another op's backward (not differentiable itself).
        public_name: the name in the one-time fallback warning (the public function's).
    """

    def __init__(self, schema: str, *, reference: Callable, triton: tuple[str, str], fake: Callable,
                 setup_context: Callable | None = None, backward: Callable | None = None,
                 public_name: str | None = None) -> None:
        self.name = schema.split("(", 1)[0]
        self.qualname = f"dtkernels::{self.name}"
        self.reference = reference
        self.setup_context = setup_context
        self.backward = backward
        self._public = public_name or self.name
        module, fn = triton

        def launch_triton(*args):
            return getattr(importlib.import_module(f"dtkernels.triton.{module}"), fn)(*args)

        def fallback(*args):
            _warn_fallback(self._public, _first_tensor(args).device)
            return reference(*args)

        self.triton = launch_triton
        lib.define(schema)
        lib.impl(self.name, fallback, "CompositeExplicitAutograd")
        if TRITON_ERROR is None:
            lib.impl(self.name, launch_triton, "CUDA")
        torch.library.register_fake(self.qualname, fake)
        if backward is not None:
            torch.library.register_autograd(self.qualname, backward, setup_context=setup_context)
        self._below: Callable | None = None

    @property
    def op(self) -> _compat.OpOverload:
        """``torch.ops.dtkernels.<op>.default``."""
        return getattr(torch.ops.dtkernels, self.name).default

    def impl(self, backend: str) -> Callable:
        """The op's kernel on ``backend`` (called with grad mode off). ``"dispatch"``: the registered kernel the
        dispatcher picks from the tensors' device, below the Autograd key."""
        if backend == "dispatch":
            if self._below is None:
                op = self.op

                def below(*args):
                    with _compat.auto_dispatch_below_autograd():
                        return op(*args)

                self._below = below
            return self._below
        if backend == "reference":
            return self.reference
        if backend == "cpp":
            if _C is None:
                raise RuntimeError(f"dtkernels backend 'cpp' was forced but is unavailable: {CPP_ERROR}")
            if not _compat.has_kernel_for_dispatch_key(self.qualname, "CPU"):
                raise RuntimeError(f"dtkernels backend 'cpp' was forced but the C++ library has no kernel for "
                                   f"{self.name}")
            return self.op
        if backend == "triton":
            info = backends()["triton"]
            if not info["available"]:
                raise RuntimeError(f"dtkernels backend 'triton' was forced but is unavailable: {info['detail']}")
            return self.triton
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")

    def __call__(self, *args):
        """Run the op on the forced backend, or on the tensors' device (the routes in the module docstring).

        Returns what ``torch.ops.dtkernels.<op>`` returns."""
        backend = get_backend()
        tensors, _ = _flatten(args)
        if backend == "auto":
            if not _fast_eager(tensors):
                return self.op(*args)
            backend = "dispatch"
        if self.backward is None:
            with torch.no_grad():
                return self.impl(backend)(*args)
        out = _EagerFunction.apply(self, backend, args, *tensors)
        return tuple(o.tensor if isinstance(o, _Untracked) else o for o in out)

    def call_in_backward(self, ctx: object, *args):
        """Call this op from another op's ``backward`` on the backend that ran the forward (the registered op when
        the forward was the registered op)."""
        backend = getattr(ctx, "dtk_backend", None)
        if backend is None:
            return self.op(*args)
        return self.impl(backend)(*args)

