"""Helpers shared by the Triton modules: dtype names, the launch width, stride helpers and :class:`ConfigIndex`.

Each op's module (``dtkernels/triton/<op>.py``) lists every kernel configuration its launchers can choose in its own
``SHIPPED_CONFIGS`` (in the format described at :class:`ConfigIndex`) and gives the ahead-of-time compile check its
kernels' argument types with ``aot_source_args(cfg)``; the launchers look their constexprs up in that list, so
``dtkernels.triton.aot`` compiles exactly what can run.
"""

from __future__ import annotations

import torch

__all__ = [
    "AT_NORM_EPS",
    "BLOCK_1D",
    "NUM_WARPS",
    "INPUT_DTYPES",
    "COMPUTE_DTYPE",
    "ConfigIndex",
    "dtype_name",
    "flat_strides",
    "layout_of",
    "compute_dtype",
]

#: Lower bound on the L2 norm of an attention map (``torch.nn.functional.normalize`` semantics).
AT_NORM_EPS = 1e-12

#: Block of the kernels that stream 1-D data (maps, per-program partial sums, flat gradients).
BLOCK_1D = 1024
NUM_WARPS = 4

#: Element dtypes of the inputs, and the dtype the math runs in for each (float64 stays float64).
INPUT_DTYPES = ("fp32", "fp16", "bf16", "fp64")
COMPUTE_DTYPE = {"fp32": "fp32", "fp16": "fp32", "bf16": "fp32", "fp64": "fp64"}
_TORCH_TO_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    """Triton's short name (``fp32``, ``fp16``, ``bf16``, ``fp64``) of a floating torch dtype."""
    return _TORCH_TO_TL[dtype]


class ConfigIndex:
    """Looks up the constexprs of a shipped configuration; the one lookup every Triton module's launchers use.

    A configuration is a dict: ``kernel`` (the kernel's name), ``dtype`` (element type of the main input pointers),
    ``out_dtype`` (a second dtype where a kernel has one, else absent or None), ``layout`` (the unit stride the JIT
    specializes on, or None) and ``constexprs``.

    Args:
        configs: a module's ``SHIPPED_CONFIGS``.
        owner: the module's name, for the error message.
    """

    def __init__(self, configs: list[dict], owner: str) -> None:
        self.owner = owner
        self._index = {(c["kernel"], c["dtype"], c.get("out_dtype"), tuple(sorted(c["constexprs"].items()))): c
                       for c in configs}

    def __call__(self, kernel: str, dtype: torch.dtype, out_dtype: torch.dtype | None = None, **constexprs) -> dict:
        """The constexprs of a shipped configuration; raises if a launcher asks for one that is not shipped."""
        key = (kernel, dtype_name(dtype), None if out_dtype is None else dtype_name(out_dtype),
               tuple(sorted(constexprs.items())))
        if key not in self._index:
            raise RuntimeError(f"{self.owner}: {kernel} has no shipped configuration for {key}")
        return dict(self._index[key]["constexprs"])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(stride_b, stride_c, stride_hw)`` of ``x`` [B, C, H, W] viewed as [B, C, H*W], or None when H and W do not
    flatten into one stride (a spatially sliced view). NCHW and channels_last both flatten."""
    _, _, h, w = x.shape
    sb, sc, sh, sw = x.stride()
    if h == 1:
        return sb, sc, sw
    if w == 1 or sh == w * sw:
        return sb, sc, sh if w == 1 else sw
    return None


def layout_of(*strides: tuple[int, int, int]) -> str:
    """The layout name a set of flattened strides shares: ``nchw``, ``channels_last`` or ``strided``."""
    if all(s[2] == 1 for s in strides):
        return "nchw"
    if all(s[1] == 1 for s in strides):
        return "channels_last"
    return "strided"
