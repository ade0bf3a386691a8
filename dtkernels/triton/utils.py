"""Shared settings of the Triton kernels: tile sizes, the shipped kernel configurations, stride helpers, and the
device-side ``grad_output`` scale.

Every configuration a launcher can choose is listed in :data:`SHIPPED_CONFIGS`; the launchers look their
constexprs up there (:func:`shipped_config`), so ``dtkernels.triton.aot`` compiles exactly what can run.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "AT_NORM_EPS",
    "BLOCK_C",
    "BLOCK_HW",
    "BLOCK_1D",
    "tile_constexprs",
    "at_block",
    "NUM_WARPS",
    "SHIPPED_CONFIGS",
    "shipped_config",
    "ConfigIndex",
    "flat_strides",
    "layout_of",
    "compute_dtype",
    "scale_",
]

#: Lower bound on the L2 norm of an attention map (``torch.nn.functional.normalize`` semantics).
AT_NORM_EPS = 1e-12

#: Tile of the streaming kernels: BLOCK_C channels x BLOCK_HW positions per loop step (2048 elements, 16 per
#: thread with 4 warps). The unit-stride axis (HW for NCHW, C for channels_last) is 4-element vectorized.
BLOCK_C = 32
BLOCK_HW = 64
#: float64 math needs twice the registers: its tiles have half the channels, or ptxas spills (see aot.py).
BLOCK_C_FP64 = 16
#: The gradient kernel's tile has 16 channels for every dtype (with 32, ptxas spills 8 bytes in one float16 variant
#: on sm_90; the kernel is a plain stream, so the smaller tile costs nothing measurable in occupancy terms).
BLOCK_C_GRAD = 16
#: The per-sample AT kernel streams [B, HW] maps in blocks of BLOCK_1D (float32) or BLOCK_1D // 2 (float64, which
#: spills at 1024 on sm_90 with a gradient).
#: Block of the kernels that stream [B, HW] maps, per-tile partial sums or flat gradients.
BLOCK_1D = 1024
NUM_WARPS = 4

#: Element dtypes of the inputs, and the dtype the math runs in for each (float64 stays float64).
INPUT_DTYPES = ("fp32", "fp16", "bf16", "fp64")
COMPUTE_DTYPE = {"fp32": "fp32", "fp16": "fp32", "bf16": "fp32", "fp64": "fp64"}
#: Layouts whose unit stride the JIT specializes (stride == 1 becomes a constant, which the loads vectorize on).
LAYOUTS = ("nchw", "channels_last")
#: Whiten variants of the forward tile kernel: (WHITEN, STORE_STATS). Per-position statistics are stored only for
#: whiten="channel" with a gradient; whiten="sample" reads the per-sample statistics of its own reduction.
FWD_WHITEN_VARIANTS = ((0, False), (1, False), (1, True), (2, False))
#: P_MODE: 1 for p == 1 (|x|), 2 for p == 2 (x*x), 0 for any other p >= 1 (exp2(p*log2|x|)).
P_MODES = (1, 2, 0)


_TORCH_TO_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    """Triton's short name (``fp32``, ``fp16``, ``bf16``, ``fp64``) of a floating torch dtype."""
    return _TORCH_TO_TL[dtype]


def tile_constexprs(dtype: str | torch.dtype, grad: bool = False) -> dict[str, int]:
    """``{"BLOCK_C": ..., "BLOCK_HW": ...}`` of the streaming kernels for an input dtype (torch or short name);
    ``grad`` selects the gradient kernel's tile. Every tile has BLOCK_HW positions, so all phases share n_tiles."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if grad:
        return {"BLOCK_C": BLOCK_C_GRAD, "BLOCK_HW": BLOCK_HW}
    return {"BLOCK_C": BLOCK_C_FP64 if name == "fp64" else BLOCK_C, "BLOCK_HW": BLOCK_HW}


def at_block(cdt: str | torch.dtype) -> int:
    """Block of the per-sample AT kernel for a compute dtype."""
    name = cdt if isinstance(cdt, str) else dtype_name(cdt)
    return BLOCK_1D // 2 if name == "fp64" else BLOCK_1D


def _build_shipped_configs() -> list[dict]:
    """Every (kernel, dtypes, constexprs, layout) the launchers can choose; see the module docstring."""
    out = []
    for dt, layout in itertools.product(INPUT_DTYPES, LAYOUTS):
        out.append({"kernel": "_sample_stats_partial_kernel", "dtype": dt, "layout": layout,
                    "constexprs": tile_constexprs(dt)})
    for cdt in ("fp32", "fp64"):
        out.append({"kernel": "_sample_stats_kernel", "dtype": cdt, "layout": None,
                    "constexprs": {"BLOCK": BLOCK_1D}})
    for dt, layout, (whiten, store), p_mode in itertools.product(INPUT_DTYPES, LAYOUTS, FWD_WHITEN_VARIANTS,
                                                                  P_MODES):
        out.append({"kernel": "_feat_loss_fwd_kernel", "dtype": dt, "layout": layout,
                    "constexprs": {"WHITEN": whiten, "STORE_STATS": store, "P_MODE": p_mode,
                                   **tile_constexprs(dt)}})
    for cdt, at_mode, grad in itertools.product(("fp32", "fp64"), (0, 1), (False, True)):
        out.append({"kernel": "_feat_loss_at_kernel", "dtype": cdt, "layout": None,
                    "constexprs": {"AT_MODE": at_mode, "COMPUTE_GRAD": grad, "BLOCK": at_block(cdt)}})
    for cdt, out_dt, last in itertools.product(("fp32", "fp64"), ("fp32", "fp64"), (False, True)):
        out.append({"kernel": "_feat_loss_finalize_kernel", "dtype": cdt, "out_dtype": out_dt, "layout": None,
                    "constexprs": {"IS_LAST": last, "BLOCK": BLOCK_1D}})
    for dt, layout, whiten, p_mode in itertools.product(INPUT_DTYPES, LAYOUTS, (0, 1, 2), P_MODES):
        out.append({"kernel": "_feat_loss_grad_kernel", "dtype": dt, "layout": layout,
                    "constexprs": {"WHITEN": whiten, "P_MODE": p_mode, **tile_constexprs(dt, grad=True)}})
    for dt, go_dt in itertools.product(INPUT_DTYPES, ("fp32", "fp64")):
        out.append({"kernel": "_scale_kernel", "dtype": dt, "out_dtype": go_dt, "layout": None,
                    "constexprs": {"BLOCK": BLOCK_1D}})
    return out


#: The kernel configurations the launchers can choose (the ahead-of-time compile check covers exactly these).
#: ``dtype`` is the element type of the main input pointers, ``out_dtype`` the second dtype where a kernel has one,
#: ``layout`` the unit stride the JIT specializes on ("nchw": HW stride 1; "channels_last": C stride 1; other
#: strided inputs run the same constexprs with no unit-stride specialization).
SHIPPED_CONFIGS: list[dict] = _build_shipped_configs()

class ConfigIndex:
    """Looks up the constexprs of a shipped configuration; the one lookup every Triton module's launchers use.

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


#: Lookup for feat_loss and scale_ (the configurations above).
shipped_config = ConfigIndex(SHIPPED_CONFIGS, "dtkernels.triton")


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


# --------------------------------------------------------------------------------------------------------------
# grad * grad_output on the device, skipped when grad_output is exactly 1
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _scale_kernel(
    G_ptr,  # [N] a dense gradient, in memory order
    GO_ptr,  # [] grad_output (float32 or float64)
    N,
    BLOCK: tl.constexpr,
):
    go = tl.load(GO_ptr)
    # Exactly 1 (what loss.backward() passes): return before touching the gradient, without a host sync.
    if go != 1.0:
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(G_ptr + offs, mask=mask, other=0.0)
        # Same rounding as the eager ``g * grad_out.to(g.dtype)`` for float32/float64; half types multiply in
        # float32 and round once.
        if G_ptr.dtype.element_ty == tl.float64:
            prod = g * go.to(tl.float64)
        else:
            prod = g.to(tl.float32) * go.to(G_ptr.dtype.element_ty).to(tl.float32)
        tl.store(G_ptr + offs, prod.to(G_ptr.dtype.element_ty), mask=mask)


def _is_dense(x: torch.Tensor) -> bool:
    """True when the elements of ``x`` fill ``numel`` consecutive storage slots (any dimension order)."""
    dims = sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def scale_(grads: Sequence[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Multiply each gradient in place by the 0-dim ``grad_out``, read on the device; no write when it is exactly 1.

    Args:
        grads: per-level gradients (any floating dtype, dense in any dimension order, e.g. from ``empty_like``).
        grad_out: 0-dim float32/float64 tensor on the same device.

    Returns:
        ``grads`` (the same tensors, scaled in place).
    """
    grads = list(grads)
    if grad_out.dtype not in (torch.float32, torch.float64):
        grad_out = grad_out.to(torch.float32)
    grad_out = grad_out.reshape(())
    for g in grads:
        n = g.numel()
        if n == 0:
            continue
        if not _is_dense(g):  # not produced by the op; keep the semantics with an eager multiply
            g.mul_(grad_out.to(g.dtype))
            continue
        cfg = shipped_config("_scale_kernel", g.dtype, grad_out.dtype, BLOCK=BLOCK_1D)
        # A dense tensor's storage from its lowest-address element is the flat [N] array the kernel walks.
        flat = g.as_strided((n,), (1,))
        _scale_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](flat, grad_out, n, num_warps=NUM_WARPS, **cfg)
    return grads
