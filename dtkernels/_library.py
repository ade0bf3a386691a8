"""Op schemas, fake kernels, autograd and backend choice for the ``dtkernels`` operator namespace.

Schemas are defined here, in Python, so every op exists whether or not the C++ library was built. Kernels:

* CPU: C++ from ``csrc/`` (``dtkernels._C``), registered with ``TORCH_LIBRARY_IMPL(dtkernels, CPU, m)``;
* CUDA: Triton launchers from ``dtkernels.triton``, registered below when Triton imports;
* every other case: the eager reference (``dtkernels.reference``), registered as the ``CompositeExplicitAutograd``
  catch-all, which warns once per op and device type.

A backend can be forced with ``dtkernels.use_backend(name)`` / ``dtkernels.set_backend(name)`` or the environment
variable ``DTKERNELS_BACKEND`` (``auto``, ``cpp``, ``triton``, ``reference``); the functional layer then calls the
chosen implementation directly through :class:`_FeatLossFunction`, which has the same autograd formula as the op.
Eager calls on the automatic backend skip ``register_autograd``'s generic wrapper (:func:`_fast_eager`; about 0.15 ms
of Python per call, a fifth of a small feature-loss call): on CPU tensors ``fused_feat_loss`` calls
``dtkernels::feat_loss_eager``, whose autograd is a C++ ``autograd::Function`` (no Python in forward or backward:
about 15 µs less per forward + backward, 100 -> 84 µs on tiny inputs); other eager calls use the same
``autograd.Function`` around the dispatcher below the Autograd key. Traced calls (torch.compile, fake tensors) go
through the registered op.
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

BACKENDS = ("auto", "cpp", "triton", "reference")

# --------------------------------------------------------------------------------------------------------------
# Native library
# --------------------------------------------------------------------------------------------------------------
_CPP_ERROR: str | None
try:
    # Loading the shared object runs its TORCH_LIBRARY_IMPL registrations.
    _C = importlib.import_module("dtkernels._C")

    _CPP_ERROR = None
except ImportError as exc:  # not built (DTKERNELS_BUILD_CPP=0), or built against another torch
    _C = None
    _CPP_ERROR = f"dtkernels._C did not load ({exc}); build it with `pip install --no-build-isolation -e .`"

_TRITON_ERROR: str | None
try:
    import triton  # noqa: F401

    _TRITON_ERROR = None
except ImportError as exc:
    _TRITON_ERROR = f"triton is not installed ({exc})"


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backends() -> dict[str, dict[str, object]]:
    """Which kernel backends this process can run, and why not when it cannot.

    Returns:
        ``{"cpp": {...}, "triton": {...}, "reference": {...}}``, each with ``available`` (bool), ``devices`` and
        ``detail`` (build information, or the reason it is unavailable).
    """
    cpp_detail = _CPP_ERROR if _C is None else _C.build_info()
    if _TRITON_ERROR is not None:
        triton_ok, triton_detail = False, _TRITON_ERROR
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


_warned: set[tuple[str, str]] = set()


def _warn_fallback(op: str, device: torch.device) -> None:
    key = (op, device.type)
    if key in _warned:
        return
    _warned.add(key)
    if device.type == "cpu":
        why = _CPP_ERROR or "the C++ library has no kernel for this call"
    elif device.type == "cuda":
        why = _TRITON_ERROR or "no Triton kernel for this call"
    else:
        why = f"no kernel for device type {device.type!r}"
    warnings.warn(f"dtkernels.{op}: running the eager PyTorch reference on {device.type} ({why}).",
                  RuntimeWarning, stacklevel=3)


def _triton_launcher(module: str, fn: str) -> Callable:
    def launch(*args):
        mod = importlib.import_module(f"dtkernels.triton.{module}")
        return getattr(mod, fn)(*args)

    return launch


# --------------------------------------------------------------------------------------------------------------
# feat_loss
# --------------------------------------------------------------------------------------------------------------
FEAT_LOSS_SCHEMA = (
    "feat_loss(Tensor[] student, Tensor[] teacher, float[] level_coef, float mse_weight, float at_weight, "
    "float at_p, int at_mode, int whiten, float eps, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor[])"
)

#: The eager CPU path with its autograd in C++ (csrc/feat_loss.cpp registers it at the Autograd and CPU keys): same
#: kernel and backward formula as feat_loss, without re-entering Python in either direction. Only plain eager calls
#: on CPU tensors use it, and only when the C++ library loaded; it has no kernel anywhere else.
FEAT_LOSS_EAGER_SCHEMA = (
    "feat_loss_eager(Tensor[] student, Tensor[] teacher, float[] level_coef, float mse_weight, float at_weight, "
    "float at_p, int at_mode, int whiten, float eps, bool compute_grad) -> (Tensor, Tensor, Tensor)"
)

lib = torch.library.Library("dtkernels", "DEF")  # noqa: TOR901
lib.define(FEAT_LOSS_SCHEMA)
lib.define(FEAT_LOSS_EAGER_SCHEMA)


@torch.library.impl(lib, "feat_loss", "CompositeExplicitAutograd")
def _feat_loss_fallback(student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps,
                        compute_grad):
    _warn_fallback("fused_feat_loss", student[0].device)
    return reference.feat_loss_op(student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps,
                                  compute_grad)


if _TRITON_ERROR is None:
    lib.impl("feat_loss", _triton_launcher("feat_loss", "feat_loss"), "CUDA")


@torch.library.register_fake("dtkernels::feat_loss")
def _feat_loss_fake(student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps, compute_grad):
    out_dtype = reference.compute_dtype(student[0])
    n = len(student)
    loss = student[0].new_empty((), dtype=out_dtype)
    grads = [torch.empty_like(s) for s in student] if compute_grad else []
    return loss, student[0].new_empty((n,), dtype=out_dtype), student[0].new_empty((n,), dtype=out_dtype), grads


def _scale_grads(grads: Sequence[torch.Tensor], grad_out: torch.Tensor | None, ctx=None) -> list[torch.Tensor | None]:
    """``grad * grad_out`` for each precomputed student gradient, skipping the multiply when it is exactly 1.

    CPU: the scalar is read on the host (free) and the multiply skipped when it is 1. CUDA: a Triton kernel reads it
    on the device and scales the saved buffers in place, returning early when it is 1, so there is no host sync and
    no extra buffer; a second backward through the same graph (``retain_graph=True``) is then refused rather than
    scaled twice. Traced (torch.compile): a plain multiply that the compiler fuses. ``grad_out`` is None when the
    loss did not contribute to what is being differentiated (gradients are not materialized).
    """
    if grad_out is None:
        return [None] * len(grads)
    if _is_plain_eager(grad_out):
        if grad_out.device.type == "cpu":
            if float(grad_out) == 1.0:
                return list(grads)
        elif grad_out.device.type == "cuda" and _TRITON_ERROR is None:
            if ctx is not None:
                if getattr(ctx, "grads_consumed", False):
                    raise RuntimeError("dtkernels: backward through the same loss twice is not supported on CUDA "
                                       "(the gradient buffers were scaled in place); recompute the loss instead")
                ctx.grads_consumed = True
                from .triton.utils import scale_

                return scale_(grads, grad_out)
    return [g * grad_out.to(g.dtype) for g in grads]


def _is_plain_eager(t: torch.Tensor) -> bool:
    """True for a real tensor outside any tracing (dynamo, AOT autograd, make_fx), where reading a value is safe."""
    return (type(t) is torch.Tensor and not torch.compiler.is_compiling()
            and _compat.current_dispatch_mode() is None)


def _feat_loss_setup_context(ctx, inputs, output):
    student, teacher, level_coef, mse_weight, at_weight, at_p, at_mode, whiten, eps, compute_grad = inputs
    # The unused outputs (parts, gradient buffers) get no gradient: without this autograd would allocate zero
    # tensors the size of the student gradient for them in backward.
    ctx.set_materialize_grads(False)
    ctx.n_levels = len(student)
    ctx.compute_grad = compute_grad
    ctx.save_for_backward(*output[3])


def _feat_loss_backward(ctx, grad_loss, grad_mse, grad_at, grad_grads):
    if not ctx.compute_grad:
        raise RuntimeError("dtkernels.feat_loss: backward called on a call made with compute_grad=False; "
                           "call fused_feat_loss with grad mode enabled and a student that requires grad")
    grads = _scale_grads(ctx.saved_tensors, grad_loss, ctx)
    return grads, [None] * ctx.n_levels, None, None, None, None, None, None, None, None


torch.library.register_autograd("dtkernels::feat_loss", _feat_loss_backward, setup_context=_feat_loss_setup_context)


_REFERENCE_IMPLS = {
    "feat_loss": reference.feat_loss_op,
    "soft_ce": reference.soft_ce_op,
    "soft_ce_backward": reference.soft_ce_backward_op,
}
_TRITON_IMPLS = {
    "feat_loss": _triton_launcher("feat_loss", "feat_loss"),
    "soft_ce": _triton_launcher("soft_ce", "soft_ce"),
    "soft_ce_backward": _triton_launcher("soft_ce", "soft_ce_backward"),
}


def _below_autograd(op: _compat.OpOverload) -> Callable:
    def call(*args):
        with _compat.auto_dispatch_below_autograd():
            return op(*args)

    return call


_DISPATCH_IMPLS: dict[str, Callable] = {}  # filled on first use (the ops below are defined further down)


def _fast_eager(*tensors: torch.Tensor | None) -> bool:
    """True when an automatic-backend call may skip ``register_autograd``'s Python wrapper: plain tensors, no
    tracing (dynamo, AOT autograd, fake tensors, make_fx) and no dispatch mode. The fast path is a plain
    ``autograd.Function`` around the dispatcher below the Autograd key: same kernels, same backward formula, about
    0.15 ms less Python per call (the wrapper flattens and re-checks every argument on each forward and backward).
    Traced calls keep the registered op, so graphs still contain ``dtkernels::*``."""
    if torch.compiler.is_compiling() or _compat.current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def _impl(op: str, backend: str) -> Callable:
    """The implementation of ``dtkernels::<op>`` on a forced backend (called with grad mode off). ``"dispatch"``:
    the registered kernels chosen by the dispatcher from the tensors' device, below the Autograd key."""
    if backend == "dispatch":
        impl = _DISPATCH_IMPLS.get(op)
        if impl is None:
            impl = _DISPATCH_IMPLS[op] = _below_autograd(getattr(torch.ops.dtkernels, op).default)
        return impl
    if backend == "reference":
        return _REFERENCE_IMPLS[op]
    if backend == "cpp":
        if _C is None:
            raise RuntimeError(f"dtkernels backend 'cpp' was forced but is unavailable: {_CPP_ERROR}")
        if not _compat.has_kernel_for_dispatch_key(f"dtkernels::{op}", "CPU"):
            raise RuntimeError(f"dtkernels backend 'cpp' was forced but the C++ library has no kernel for {op}")
        return getattr(torch.ops.dtkernels, op)
    if backend == "triton":
        info = backends()["triton"]
        if not info["available"]:
            raise RuntimeError(f"dtkernels backend 'triton' was forced but is unavailable: {info['detail']}")
        return _TRITON_IMPLS[op]
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _feat_loss_impl(backend: str) -> Callable:
    return _impl("feat_loss", backend)


class _FeatLossFunction(torch.autograd.Function):
    """Autograd wrapper of eager calls (forced backend or the dispatcher); same formula as the registered op's."""

    @staticmethod
    def forward(ctx, impl, params, n_levels, *tensors):
        student, teacher = list(tensors[:n_levels]), list(tensors[n_levels:])
        loss, mse, at, grads = impl(student, teacher, *params)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*grads)
        ctx.compute_grad = params[-1]
        ctx.mark_non_differentiable(mse, at)
        return loss, mse, at

    @staticmethod
    def backward(ctx, grad_loss, grad_mse, grad_at):
        if not ctx.compute_grad:
            raise RuntimeError("dtkernels.feat_loss: backward called on a call made with compute_grad=False")
        grads = _scale_grads(ctx.saved_tensors, grad_loss, ctx)
        return (None, None, None, *grads, *([None] * len(grads)))


def feat_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], level_coef: Sequence[float],
              mse_weight: float, at_weight: float, at_p: float, at_mode: int, whiten: int, eps: float,
              compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``dtkernels::feat_loss`` on the forced backend, or through the dispatcher when none is forced."""
    backend = get_backend()
    params = (list(level_coef), float(mse_weight), float(at_weight), float(at_p), int(at_mode), int(whiten),
              float(eps), bool(compute_grad))
    if backend == "auto":
        if not _fast_eager(*student, *teacher):
            loss, mse, at, _ = torch.ops.dtkernels.feat_loss(list(student), list(teacher), *params)
            return loss, mse, at
        if _FEAT_LOSS_EAGER is not None and student[0].device.type == "cpu":
            return _FEAT_LOSS_EAGER(list(student), list(teacher), *params)
        backend = "dispatch"
    return _FeatLossFunction.apply(_feat_loss_impl(backend), params, len(student), *student, *teacher)


_FEAT_LOSS_EAGER = (torch.ops.dtkernels.feat_loss_eager.default
                    if _C is not None and _compat.has_kernel_for_dispatch_key("dtkernels::feat_loss_eager", "Autograd")
                    else None)


# --------------------------------------------------------------------------------------------------------------
# soft_ce
# --------------------------------------------------------------------------------------------------------------
SOFT_CE_SCHEMA = ("soft_ce(Tensor student, Tensor teacher, Tensor? mask, float tau, float scale, int reduction, "
                  "bool compute_grad) -> (Tensor, Tensor)")
SOFT_CE_BACKWARD_SCHEMA = ("soft_ce_backward(Tensor student, Tensor teacher, Tensor? mask, Tensor grad_loss, "
                           "float tau, float scale) -> Tensor")
lib.define(SOFT_CE_SCHEMA)
lib.define(SOFT_CE_BACKWARD_SCHEMA)


@torch.library.impl(lib, "soft_ce", "CompositeExplicitAutograd")
def _soft_ce_fallback(student, teacher, mask, tau, scale, reduction, compute_grad):
    _warn_fallback("soft_ce", student.device)
    return reference.soft_ce_op(student, teacher, mask, tau, scale, reduction, compute_grad)


@torch.library.impl(lib, "soft_ce_backward", "CompositeExplicitAutograd")
def _soft_ce_backward_fallback(student, teacher, mask, grad_loss, tau, scale):
    _warn_fallback("soft_ce", student.device)
    return reference.soft_ce_backward_op(student, teacher, mask, grad_loss, tau, scale)


if _TRITON_ERROR is None:
    lib.impl("soft_ce", _TRITON_IMPLS["soft_ce"], "CUDA")
    lib.impl("soft_ce_backward", _TRITON_IMPLS["soft_ce_backward"], "CUDA")


@torch.library.register_fake("dtkernels::soft_ce")
def _soft_ce_fake(student, teacher, mask, tau, scale, reduction, compute_grad):
    dt = reference.compute_dtype(student)
    shape = (student.shape[0], student.shape[2]) if reduction == 0 else ()
    grad = torch.empty_like(student) if (compute_grad and reduction != 0) else student.new_empty((0,))
    return student.new_empty(shape, dtype=dt), grad


@torch.library.register_fake("dtkernels::soft_ce_backward")
def _soft_ce_backward_fake(student, teacher, mask, grad_loss, tau, scale):
    return torch.empty_like(student)


def _soft_ce_setup_context(ctx, inputs, output):
    student, teacher, mask, tau, scale, reduction, compute_grad = inputs
    ctx.set_materialize_grads(False)  # no zero-filled gradient-sized tensor for the unused gradient output
    ctx.reduction, ctx.tau, ctx.scale, ctx.compute_grad = reduction, tau, scale, compute_grad
    if reduction == 0:
        ctx.save_for_backward(student, teacher, mask)
    else:
        ctx.save_for_backward(output[1])


def _soft_ce_backward(ctx, grad_loss, grad_grad):
    if not ctx.compute_grad:
        raise RuntimeError("dtkernels.soft_ce: backward called on a call made with compute_grad=False")
    if ctx.reduction == 0:
        student, teacher, mask = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None
        grad = torch.ops.dtkernels.soft_ce_backward(student, teacher, mask, grad_loss, ctx.tau, ctx.scale)
    else:
        (grad,) = _scale_grads(ctx.saved_tensors, grad_loss, ctx)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("dtkernels::soft_ce", _soft_ce_backward, setup_context=_soft_ce_setup_context)


class _SoftCEFunction(torch.autograd.Function):
    """Autograd wrapper of eager calls (forced backend or the dispatcher); same formula as the registered op's."""

    @staticmethod
    def forward(ctx, backend, student, teacher, mask, tau, scale, reduction, compute_grad):
        loss, grad = _impl("soft_ce", backend)(student, teacher, mask, tau, scale, reduction, compute_grad)
        ctx.backend, ctx.reduction, ctx.tau, ctx.scale, ctx.compute_grad = backend, reduction, tau, scale, compute_grad
        if reduction == 0:
            ctx.save_for_backward(student, teacher, mask)
        else:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.compute_grad:
            raise RuntimeError("dtkernels.soft_ce: backward called on a call made with compute_grad=False")
        if ctx.reduction == 0:
            student, teacher, mask = ctx.saved_tensors
            if grad_loss is None:
                return None, None, None, None, None, None, None, None
            grad = _impl("soft_ce_backward", ctx.backend)(student, teacher, mask, grad_loss, ctx.tau, ctx.scale)
        else:
            (grad,) = _scale_grads(ctx.saved_tensors, grad_loss, ctx)
        return None, grad, None, None, None, None, None, None


def soft_ce(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, tau: float, scale: float,
            reduction: int, compute_grad: bool) -> torch.Tensor:
    """Run ``dtkernels::soft_ce`` on canonical ``[B, K, P]`` inputs on the forced backend or the dispatcher."""
    backend = get_backend()
    if backend == "auto":
        if not _fast_eager(student, teacher, mask):
            return torch.ops.dtkernels.soft_ce(student, teacher, mask, tau, scale, reduction, compute_grad)[0]
        backend = "dispatch"
    return _SoftCEFunction.apply(backend, student, teacher, mask, tau, scale, reduction, compute_grad)


# --------------------------------------------------------------------------------------------------------------
# q_sample
# --------------------------------------------------------------------------------------------------------------
Q_SAMPLE_SCHEMA = ("q_sample(Tensor x0, Tensor t, Tensor alphas_cumprod, Tensor? noise, int seed, bool return_noise)"
                   " -> (Tensor, Tensor)")
lib.define(Q_SAMPLE_SCHEMA)
_REFERENCE_IMPLS["q_sample"] = reference.q_sample_op
_TRITON_IMPLS["q_sample"] = _triton_launcher("q_sample", "q_sample")


@torch.library.impl(lib, "q_sample", "CompositeExplicitAutograd")
def _q_sample_fallback(x0, t, alphas_cumprod, noise, seed, return_noise):
    _warn_fallback("q_sample", x0.device)
    return reference.q_sample_op(x0, t, alphas_cumprod, noise, seed, return_noise)


if _TRITON_ERROR is None:
    lib.impl("q_sample", _TRITON_IMPLS["q_sample"], "CUDA")


@torch.library.register_fake("dtkernels::q_sample")
def _q_sample_fake(x0, t, alphas_cumprod, noise, seed, return_noise):
    eps = torch.empty_like(x0) if (return_noise and noise is None) else x0.new_empty((0,))
    return torch.empty_like(x0), eps


def _q_sample_coefficients(x0, t, alphas_cumprod):
    dt = reference.compute_dtype(x0)
    abar = alphas_cumprod.to(device=x0.device, dtype=dt)[t.to(x0.device).long()]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)


def _q_sample_setup_context(ctx, inputs, output):
    x0, t, alphas_cumprod, noise, seed, return_noise = inputs
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])  # eps is a draw, not a function of x0
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.x0_meta = (x0.dtype, x0.dim())
    ctx.has_noise = noise is not None


def _q_sample_backward(ctx, grad_xt, grad_eps):
    if grad_xt is None:
        return None, None, None, None, None, None
    t, alphas_cumprod = ctx.saved_tensors
    a, b = _q_sample_coefficients(grad_xt, t, alphas_cumprod)
    grad_x0 = (grad_xt * a).to(ctx.x0_meta[0])
    grad_noise = (grad_xt * b).to(grad_xt.dtype) if ctx.has_noise else None
    return grad_x0, None, None, grad_noise, None, None


torch.library.register_autograd("dtkernels::q_sample", _q_sample_backward, setup_context=_q_sample_setup_context)


class _QSampleFunction(torch.autograd.Function):
    """Autograd wrapper of eager calls (forced backend or the dispatcher); same formula as the registered op's."""

    @staticmethod
    def forward(ctx, backend, x0, t, alphas_cumprod, noise, seed, return_noise):
        x_t, eps = _impl("q_sample", backend)(x0, t, alphas_cumprod, noise, seed, return_noise)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(t, alphas_cumprod)
        ctx.x0_meta = (x0.dtype, x0.dim())
        ctx.has_noise = noise is not None
        ctx.mark_non_differentiable(eps)
        return x_t, eps

    @staticmethod
    def backward(ctx, grad_xt, grad_eps):
        grad_x0, _, _, grad_noise, _, _ = _q_sample_backward(ctx, grad_xt, grad_eps)
        return None, grad_x0, None, None, grad_noise, None, None


def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None, seed: int,
             return_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``dtkernels::q_sample`` on the forced backend or through the dispatcher."""
    backend = get_backend()
    if backend == "auto":
        if not _fast_eager(x0, t, alphas_cumprod, noise):
            return torch.ops.dtkernels.q_sample(x0, t, alphas_cumprod, noise, seed, return_noise)
        backend = "dispatch"
    return _QSampleFunction.apply(backend, x0, t, alphas_cumprod, noise, seed, return_noise)
