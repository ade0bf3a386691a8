"""CPU training throughput: a process-level allocator setting and a model transform.

**Allocator** (:func:`keep_freed_memory`). glibc's malloc hands freed memory back to the kernel (``munmap`` of large
chunks, ``trim`` of the heap top), so a training step that frees its activations and gradients and allocates them again
next step page-faults every page back in, zero-filled by the kernel. On a small VM that is a large share of the demo
pretraining step's time (``benchmarks/bench_train_step.py``; numbers in benchmarks/README.md). PyTorch's CPU performance
guides recommend preloading jemalloc or tcmalloc for the same reason; :func:`keep_freed_memory` gets the effect with
glibc alone, at run time.

The cost: the process keeps its peak heap mapped (resident memory does not shrink after a peak), which is what a
long training process wants anyway.

**Convolutions on single-pixel maps** (:func:`single_pixel_convs_as_linear`). At small images the deepest stage of a
stride-32 backbone sees 1×1 maps (resnet18 at 32×32: layer4's 3×3 convolutions, and the regressor's pool-1 and coarsest
FPN convolutions). oneDNN's weight gradient for these shapes is pathologically slow on the CPU: many times slower than
the same numbers as one matrix product (benchmarks/README.md). A convolution whose input is one pixel *is* a matrix
product: with zero padding, the single output pixel sees the input pixel through one kernel tap only, every other tap
multiplies padding. :class:`SinglePixelConv2d` computes exactly that when its input is 1×1 and is an ordinary
``nn.Conv2d`` otherwise.

**Pointwise convolutions at small batches** (:func:`pointwise_convs_as_linear`). A 1×1 convolution is a matrix
product over channels at every pixel. PyTorch's CPU convolution leaves oneDNN for its own im2col path when a 1×1
convolution sees fewer than 16 images on one thread, which is the evaluation probe's case (its FPN head's laterals and
classifier at batch 8); :class:`PointwiseConv2d` runs them as ``F.linear`` over the channel dimension instead
(benchmarks/README.md, probe step). Same values up to float summation order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["keep_freed_memory", "PointwiseConv2d", "SinglePixelConv2d", "pointwise_convs_as_linear",
           "single_pixel_convs_as_linear"]

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest allowed mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): chunks below it come from the heap.
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: Heap top kept before glibc trims it (an int for mallopt).
_TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel (process-wide).

    Sets ``M_MMAP_THRESHOLD`` to 32 MiB (allocations below it are served from the heap and reused; the default
    threshold starts at 128 KiB) and ``M_TRIM_THRESHOLD`` to 2 GiB (the heap top is not trimmed). Returns True when
    applied (now or by an earlier call), False where the C library is not glibc (the call is then a no-op; preload
    jemalloc or tcmalloc there instead). Allocations of 32 MiB and more still come from mmap each time.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    _applied = ok
    return ok


class SinglePixelConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs as ``F.linear`` on the one kernel tap that matters when its input is a single pixel.

    For an input ``[N, C_in, 1, 1]``, zero padding ``(p_h, p_w)`` with ``p < k``, dilation 1, one group, and a 1×1
    output (``0 <= 2p + 1 - k < s``: "same" padding ``p = k // 2`` of an odd kernel at any stride), the output is
    ``x[:, :, 0, 0] @ W[:, :, p_h, p_w].T + b``: the only tap that does not multiply padding is ``(p_h, p_w)``. Same
    values up to float summation order, and the same gradients (exactly zero for the other taps, as the convolution
    gives them). One difference: a NaN or Inf stored in an *unused* tap of the weight does not reach the output,
    where the convolution would give ``0 * inf = nan``; NaN and Inf in the input propagate as usual. Every other
    input shape or setting runs ``nn.Conv2d.forward``.
    Parameters and ``state_dict`` are those of ``nn.Conv2d``, so checkpoints and exported backbones do not change.
    """

    def _single_pixel_tap(self, x: torch.Tensor) -> tuple[int, int] | None:
        if x.dim() != 4 or x.shape[-2:] != (1, 1) or self.groups != 1 or self.padding_mode != "zeros":
            return None
        if self.dilation != (1, 1) or isinstance(self.padding, str):
            return None
        (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
        if ph >= kh or pw >= kw or (1 + 2 * ph - kh) // sh + 1 != 1 or (1 + 2 * pw - kw) // sw + 1 != 1:
            return None
        return ph, pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tap = self._single_pixel_tap(x)
        if tap is None:
            return super().forward(x)
        y = _SinglePixelLinear.apply(x.flatten(1), self.weight, self.bias, tap)
        return y.view(x.shape[0], self.out_channels, 1, 1)


class _SinglePixelLinear(torch.autograd.Function):
    """``x @ weight[:, :, i, j].T + bias``, with the weight gradient written once into a zeroed full-size tensor
    (autograd through two ``select`` views zero-fills and copies it twice). Under autocast
    the forward's matmul runs in the autocast dtype and the backward casts to the gradient's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tap: tuple[int, int]):
        w = weight[:, :, tap[0], tap[1]].contiguous()  # one gather of the tap (it strides over the whole weight)
        ctx.save_for_backward(x, w)
        ctx.tap, ctx.bias_dtype = tap, None if bias is None else bias.dtype
        ctx.weight_layout = weight.shape, weight.stride()
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        i, j = ctx.tap
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.mm(w.to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            shape, stride = ctx.weight_layout
            grad_w = torch.empty_strided(shape, stride, dtype=w.dtype, device=w.device)  # laid out like the weight
            if shape[2:] != (1, 1):  # the other taps' gradient is zero (a 1x1 kernel has no other tap)
                grad_w.zero_()
            grad_w[:, :, i, j] = grad.t().mm(x.to(grad.dtype))
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def single_pixel_convs_as_linear(model: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d`` in ``model`` into a :class:`SinglePixelConv2d`, in place; returns how many.

    Only modules whose type is exactly ``nn.Conv2d`` change (subclasses keep their own forward). Parameters, buffers,
    hooks and ``state_dict`` keys stay as they are; calling it twice changes nothing more. Worth it on the CPU when
    some convolutions see 1×1 maps (small images, see the module docstring); elsewhere it only adds a shape check.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = SinglePixelConv2d
            count += 1
    return count


class PointwiseConv2d(SinglePixelConv2d):
    """A 1×1 convolution (stride 1, no padding, one group) run as ``F.linear`` over the channel dimension:
    ``[N, C, H, W]`` is read as ``[N, H, W, C]`` (a view), multiplied by the ``[C_out, C]`` weight and handed back as
    ``[N, C_out, H, W]`` in channels-last strides (a view again), which the following ops take as they are. Any other
    kernel, stride, padding or grouping, and a 1×1 input, run :class:`SinglePixelConv2d`'s forward. Parameters and
    ``state_dict`` are those of ``nn.Conv2d``."""

    def _pointwise(self) -> bool:
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1
                and self.dilation == (1, 1) and self.padding in ((0, 0), "valid"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] == (1, 1) or not self._pointwise():
            return super().forward(x)
        w = self.weight.view(self.out_channels, self.in_channels)
        return F.linear(x.permute(0, 2, 3, 1), w, self.bias).permute(0, 3, 1, 2)


def pointwise_convs_as_linear(module: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d`` or :class:`SinglePixelConv2d` with a 1×1 kernel, stride 1, no padding and one
    group in ``module`` into a :class:`PointwiseConv2d`, in place; returns how many. Worth it on the CPU for 1×1
    convolutions at small batches (see the module docstring); elsewhere oneDNN's convolution is the better choice."""
    count = 0
    for m in module.modules():
        if type(m) in (nn.Conv2d, SinglePixelConv2d) and PointwiseConv2d._pointwise(m):
            m.__class__ = PointwiseConv2d
            count += 1
    return count
