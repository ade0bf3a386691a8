"""Triton kernels and host launcher of ``dtkernels::feat_loss`` (the DreamTeacher feature-distillation loss).

The math is :mod:`dtkernels.reference` (``feat_loss_op`` and ``feat_loss_level_grad``). Per level, with ``s``, ``t``
viewed as ``[B, C, HW]`` through their strides (NCHW and channels_last run without a copy):

* phase 0 (whiten="sample" only): ``_sample_stats_partial_kernel`` per (tile of positions, sample) writes the
  Welford statistics (mean, M2) of its tile of the teacher, then ``_sample_stats_kernel`` per sample merges them
  (Chan's parallel formula, fixed order) into the per-sample mean and 1/sqrt(var + eps);
* phase 1: ``_feat_loss_fwd_kernel`` per (tile of positions, sample): per-position whitening statistics
  (whiten="channel": Welford over C in BLOCK_C-wide lanes, merged with Chan's formula), then one pass over C that
  accumulates ``(s - W(t))**2`` and the attention maps ``a_s``, ``a_t`` [B, HW]; writes one MSE partial sum per
  program;
* phase 2: ``_feat_loss_at_kernel`` per sample: the norms of ``a_s``, ``a_t``, the AT term of the sample and (with a
  gradient) the map gradient ``g_a`` [B, HW] of the reference formula;
* ``_feat_loss_finalize_kernel`` (one program): the level's ``mse``, ``at`` and loss contribution from the partials
  in a fixed order; the last level's call also sums the contributions into the loss;
* phase 3 (only with compute_grad): ``_feat_loss_grad_kernel`` per (tile, sample) re-reads ``s`` and ``t`` and
  writes ``c_mse * (s - W(t)) + g_a * d|s|^p/ds`` in the student's dtype and layout.

Launches: one per level per phase (levels of different shapes, dtypes and layouts keep their own compiled
specializations); every reduction is a fixed-order sum of per-program partials, with no atomics, so results are
bitwise reproducible.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..modes import AtMode, Whitening
from .utils import (
    AT_NORM_EPS,
    BLOCK_1D,
    COMPUTE_DTYPE,
    INPUT_DTYPES,
    NUM_WARPS,
    ConfigIndex,
    compute_dtype,
    dtype_name,
    flat_strides,
)

__all__ = ["feat_loss", "scale_", "SHIPPED_CONFIGS", "shipped_config", "AOT_ARGS", "aot_source_args"]

# --------------------------------------------------------------------------------------------------------------
# Modes as kernel constants
# --------------------------------------------------------------------------------------------------------------
# The launcher passes int(mode) as the WHITEN / AT_MODE constexprs; the kernels compare them with these.
WHITEN_NONE = tl.constexpr(int(Whitening.NONE))
WHITEN_CHANNEL = tl.constexpr(int(Whitening.CHANNEL))
WHITEN_SAMPLE = tl.constexpr(int(Whitening.SAMPLE))
AT_PAPER = tl.constexpr(int(AtMode.PAPER))
AT_MEAN_SQ = tl.constexpr(int(AtMode.MEAN_SQ))
#: P_MODE, the kernels' specialization of ``|x|**p``: p == 1 (``|x|``), p == 2 (``x*x``), any other p >= 1
#: (``exp2(p*log2|x|)``).
P_GENERAL = tl.constexpr(0)
P_ONE = tl.constexpr(1)
P_TWO = tl.constexpr(2)

# --------------------------------------------------------------------------------------------------------------
# Tiles and shipped configurations
# --------------------------------------------------------------------------------------------------------------
#: Tile of the streaming kernels: BLOCK_C channels x BLOCK_HW positions per loop step (2048 elements, 16 per
#: thread with 4 warps). The unit-stride axis (HW for NCHW, C for channels_last) is 4-element vectorized.
BLOCK_C = 32
BLOCK_HW = 64
#: float64 math needs twice the registers: its tiles have half the channels, or ptxas spills (see aot.py).
BLOCK_C_FP64 = 16
#: The gradient kernel's tile has 16 channels for every dtype (with 32, ptxas spills in a float16 variant on
#: sm_90; the kernel is a plain stream, so the smaller tile does not cost occupancy that matters).
BLOCK_C_GRAD = 16

#: Layouts whose unit stride the JIT specializes (stride == 1 becomes a constant, which the loads vectorize on).
LAYOUTS = ("nchw", "channels_last")
#: Whiten variants of the forward tile kernel: (WHITEN, STORE_STATS). Per-position statistics are stored only for
#: channel whitening with a gradient; sample whitening reads the per-sample statistics of its own reduction.
FWD_WHITEN_VARIANTS = ((int(Whitening.NONE), False), (int(Whitening.CHANNEL), False),
                       (int(Whitening.CHANNEL), True), (int(Whitening.SAMPLE), False))
P_MODES = (P_ONE.value, P_TWO.value, P_GENERAL.value)


def tile_constexprs(dtype: str | torch.dtype, grad: bool = False) -> dict[str, int]:
    """``{"BLOCK_C": ..., "BLOCK_HW": ...}`` of the streaming kernels for an input dtype (torch or short name);
    ``grad`` selects the gradient kernel's tile. Every tile has BLOCK_HW positions, so all phases share n_tiles."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if grad:
        return {"BLOCK_C": BLOCK_C_GRAD, "BLOCK_HW": BLOCK_HW}
    return {"BLOCK_C": BLOCK_C_FP64 if name == "fp64" else BLOCK_C, "BLOCK_HW": BLOCK_HW}


def at_block(cdt: str | torch.dtype) -> int:
    """Block of the per-sample AT kernel for a compute dtype: BLOCK_1D, halved for float64 (which spills at the
    full block on sm_90 with a gradient)."""
    name = cdt if isinstance(cdt, str) else dtype_name(cdt)
    return BLOCK_1D // 2 if name == "fp64" else BLOCK_1D


def _build_shipped_configs() -> list[dict]:
    """Every (kernel, dtypes, constexprs, layout) the launchers can choose (format: :class:`ConfigIndex`)."""
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
    for cdt, at_mode, grad in itertools.product(("fp32", "fp64"), [int(m) for m in AtMode], (False, True)):
        out.append({"kernel": "_feat_loss_at_kernel", "dtype": cdt, "layout": None,
                    "constexprs": {"AT_MODE": at_mode, "COMPUTE_GRAD": grad, "BLOCK": at_block(cdt)}})
    for cdt, out_dt, last in itertools.product(("fp32", "fp64"), ("fp32", "fp64"), (False, True)):
        out.append({"kernel": "_feat_loss_finalize_kernel", "dtype": cdt, "out_dtype": out_dt, "layout": None,
                    "constexprs": {"IS_LAST": last, "BLOCK": BLOCK_1D}})
    for dt, layout, whiten, p_mode in itertools.product(INPUT_DTYPES, LAYOUTS, [int(w) for w in Whitening], P_MODES):
        out.append({"kernel": "_feat_loss_grad_kernel", "dtype": dt, "layout": layout,
                    "constexprs": {"WHITEN": whiten, "P_MODE": p_mode, **tile_constexprs(dt, grad=True)}})
    for dt, go_dt in itertools.product(INPUT_DTYPES, ("fp32", "fp64")):
        out.append({"kernel": "_scale_kernel", "dtype": dt, "out_dtype": go_dt, "layout": None,
                    "constexprs": {"BLOCK": BLOCK_1D}})
    return out


#: The kernel configurations the launchers can choose (the ahead-of-time compile check covers exactly these).
#: ``layout``: "nchw" (HW stride 1) or "channels_last" (C stride 1); other strided inputs run the same constexprs
#: with no unit-stride specialization. ``_scale_kernel`` (the CUDA backward, :func:`scale_`) is listed here too.
SHIPPED_CONFIGS: list[dict] = _build_shipped_configs()

shipped_config = ConfigIndex(SHIPPED_CONFIGS, "dtkernels.triton.feat_loss")

#: Argument kinds of each kernel for the ahead-of-time compile (:func:`dtkernels.triton.aot.signature_from_kinds`):
#: ``ptr:<role>`` pointer (role "in": the config's dtype, "cdt": its compute dtype, "out": its out_dtype);
#: ``stride:<axis>``: a stride of a [B, C, HW] view (the layout's unit axis becomes the constant 1); ``i32``: an
#: int argument (shape, count), ``i32d``: an int argument divisible by 16; ``fp64``: an annotated float.
AOT_ARGS = {
    "_sample_stats_partial_kernel": [
        ("T_ptr", "ptr:in"), ("stride_tb", "stride:b"), ("stride_tc", "stride:c"), ("stride_thw", "stride:hw"),
        ("PMEAN_ptr", "ptr:cdt"), ("PM2_ptr", "ptr:cdt"), ("C", "i32d"), ("HW", "i32d"), ("n_tiles", "i32d")],
    "_sample_stats_kernel": [
        ("PMEAN_ptr", "ptr:in"), ("PM2_ptr", "ptr:in"), ("MEAN_ptr", "ptr:in"), ("RSTD_ptr", "ptr:in"),
        ("C", "i32d"), ("HW", "i32d"), ("n_tiles", "i32d"), ("tile_hw", "i32d"), ("eps", "fp64")],
    "_feat_loss_fwd_kernel": [
        ("S_ptr", "ptr:in"), ("stride_sb", "stride:b"), ("stride_sc", "stride:c"), ("stride_shw", "stride:hw"),
        ("T_ptr", "ptr:in"), ("stride_tb", "stride:b"), ("stride_tc", "stride:c"), ("stride_thw", "stride:hw"),
        ("AS_ptr", "ptr:cdt"), ("AT_ptr", "ptr:cdt"), ("MSE_ptr", "ptr:cdt"), ("MEAN_ptr", "ptr:cdt"),
        ("RSTD_ptr", "ptr:cdt"), ("C", "i32d"), ("HW", "i32d"), ("n_tiles", "i32d"), ("p", "fp64"), ("eps", "fp64")],
    "_feat_loss_at_kernel": [
        ("AS_ptr", "ptr:in"), ("AT_ptr", "ptr:in"), ("GA_ptr", "ptr:in"), ("ATB_ptr", "ptr:in"), ("HW", "i32d"),
        ("at_norm", "fp64"), ("g_scale", "fp64"), ("at_eps", "fp64"), ("tiny", "fp64")],
    "_feat_loss_finalize_kernel": [
        ("MSE_ptr", "ptr:in"), ("ATB_ptr", "ptr:in"), ("MSE_OUT_ptr", "ptr:out"), ("AT_OUT_ptr", "ptr:out"),
        ("CONTRIB_ptr", "ptr:out"), ("LOSS_ptr", "ptr:out"), ("n_mse", "i32d"), ("B", "i32"), ("level", "i32"),
        ("n_levels", "i32"), ("inv_n", "fp64"), ("coef", "fp64"), ("mse_weight", "fp64"), ("at_weight", "fp64")],
    "_feat_loss_grad_kernel": [
        ("S_ptr", "ptr:in"), ("stride_sb", "stride:b"), ("stride_sc", "stride:c"), ("stride_shw", "stride:hw"),
        ("T_ptr", "ptr:in"), ("stride_tb", "stride:b"), ("stride_tc", "stride:c"), ("stride_thw", "stride:hw"),
        ("G_ptr", "ptr:in"), ("stride_gb", "stride:b"), ("stride_gc", "stride:c"), ("stride_ghw", "stride:hw"),
        ("GA_ptr", "ptr:cdt"), ("MEAN_ptr", "ptr:cdt"), ("RSTD_ptr", "ptr:cdt"), ("C", "i32d"), ("HW", "i32d"),
        ("p", "fp64"), ("mse_scale", "fp64")],
    "_scale_kernel": [("G_ptr", "ptr:in"), ("GO_ptr", "ptr:out"), ("N", "i32d")],
}


def aot_source_args(cfg: dict) -> tuple:
    """``(fn, signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` of one shipped configuration.

    Signatures mirror what the JIT specializes at run time for a typical aligned DreamTeacher level (pointers
    16-byte aligned, shapes and non-unit strides divisible by 16, the unit stride a constant 1)."""
    from .aot import signature_from_kinds

    fn = globals()[cfg["kernel"]]
    roles = {"in": cfg["dtype"], "cdt": COMPUTE_DTYPE[cfg["dtype"]], "out": cfg.get("out_dtype") or cfg["dtype"]}
    unit_axis = {"nchw": "hw", "channels_last": "c"}.get(cfg.get("layout"))
    signature, constexprs, attrs = signature_from_kinds(fn, AOT_ARGS[cfg["kernel"]], roles, unit_axis,
                                                        cfg["constexprs"])
    return fn, signature, constexprs, attrs


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _scalar(x, dtype: tl.constexpr):
    """A float64 scalar argument in the compute dtype. (Adding it to a typed zero, rather than tl.cast, keeps its
    float64 value in the interpreter too, where float arguments arrive as Python floats.)"""
    return (tl.zeros([], dtype=dtype) + x).to(dtype)


@triton.jit
def _sqrt(x):
    """Correctly rounded square root (sqrt.rn) in float32 and float64."""
    if x.dtype == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _div_rn(x, y):
    """Correctly rounded quotient (div.rn) in float32 and float64; ``/`` on float32 is an approximation (div.full)."""
    if x.dtype == tl.float64:
        r = x / y
    else:
        r = tl.math.div_rn(x, y)
    return r


@triton.jit
def _abs_pow(x, p, P_MODE: tl.constexpr):
    """``|x|**p``: P_MODE 1 is p == 1, 2 is p == 2, 0 any other p >= 1 (0 at x == 0, NaN and Inf propagate)."""
    if P_MODE == P_ONE:
        r = tl.abs(x)
    elif P_MODE == P_TWO:
        r = x * x
    else:
        r = tl.exp2(p * tl.log2(tl.abs(x)))
    return r


@triton.jit
def _abs_pow_grad(x, p, P_MODE: tl.constexpr):
    """``d|x|**p / dx = p * |x|**(p-1) * sign(x)``; ``sign(x)`` for p == 1 (zero at zero)."""
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))  # x itself at 0 (and NaN)
    if P_MODE == P_ONE:
        r = sign.to(x.dtype)
    elif P_MODE == P_TWO:
        r = 2.0 * x
    else:
        r = p * tl.exp2((p - 1.0) * tl.log2(tl.abs(x))) * sign
    return r


# --------------------------------------------------------------------------------------------------------------
# Phase 0: per-sample whitening statistics (whiten="sample")
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _sample_stats_partial_kernel(
    T_ptr,  # [B, C, HW] teacher
    stride_tb, stride_tc, stride_thw,
    PMEAN_ptr,  # [B, n_tiles] mean of each tile (compute dtype)
    PM2_ptr,  # [B, n_tiles] sum of squared deviations of each tile
    C, HW, n_tiles,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cdt = PMEAN_ptr.dtype.element_ty
    hw = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    rows = tl.arange(0, BLOCK_C)
    t_base = T_ptr + b * stride_tb + hw[None, :] * stride_thw
    # Welford per lane: lane (r, j) sees channels r, r + BLOCK_C, ... of position j.
    mean = tl.zeros([BLOCK_C, BLOCK_HW], dtype=cdt)
    m2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=cdt)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + rows
        mask = (c < C)[:, None] & hw_mask[None, :]
        t = tl.load(t_base + c[:, None].to(tl.int64) * stride_tc, mask=mask, other=0.0).to(cdt)
        inv_n = 1.0 / tl.cast(c0 // BLOCK_C + 1, cdt)
        delta = t - mean
        new_mean = mean + delta * inv_n
        m2 = tl.where(mask, m2 + delta * (t - new_mean), m2)
        mean = tl.where(mask, new_mean, mean)
    # Chan's merge of the lanes: n_r = number of channels lane row r saw.
    n_row = tl.maximum((C - rows + BLOCK_C - 1) // BLOCK_C, 0).to(cdt)
    n_lane = tl.where(hw_mask[None, :], n_row[:, None], 0.0)
    n_tile = (C * tl.minimum(HW - tile * BLOCK_HW, BLOCK_HW)).to(cdt)
    tile_mean = tl.sum(tl.sum(n_lane * mean, axis=1), axis=0) / n_tile
    dev = mean - tile_mean
    tile_m2 = tl.sum(tl.sum(tl.where(n_lane > 0, m2 + n_lane * dev * dev, 0.0), axis=1), axis=0)
    tl.store(PMEAN_ptr + b * n_tiles + tile, tile_mean)
    tl.store(PM2_ptr + b * n_tiles + tile, tile_m2)


@triton.jit
def _sample_stats_kernel(
    PMEAN_ptr,  # [B, n_tiles]
    PM2_ptr,  # [B, n_tiles]
    MEAN_ptr,  # [B] per-sample mean of the teacher
    RSTD_ptr,  # [B] per-sample 1/sqrt(var + eps)
    C, HW, n_tiles, tile_hw,
    eps: tl.float64,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cdt = PMEAN_ptr.dtype.element_ty
    base = b * n_tiles
    n_total = C.to(cdt) * HW.to(cdt)
    acc = tl.zeros([BLOCK], dtype=cdt)
    for i0 in range(0, n_tiles, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < n_tiles
        n_i = (C * tl.minimum(HW - i * tile_hw, tile_hw)).to(cdt)
        m_i = tl.load(PMEAN_ptr + base + i, mask=mask, other=0.0)
        acc += tl.where(mask, n_i * m_i, 0.0)
    mean = tl.sum(acc, axis=0) / n_total
    acc = tl.zeros([BLOCK], dtype=cdt)
    for i0 in range(0, n_tiles, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < n_tiles
        n_i = (C * tl.minimum(HW - i * tile_hw, tile_hw)).to(cdt)
        m_i = tl.load(PMEAN_ptr + base + i, mask=mask, other=0.0)
        m2_i = tl.load(PM2_ptr + base + i, mask=mask, other=0.0)
        dev = m_i - mean
        acc += tl.where(mask, m2_i + n_i * dev * dev, 0.0)
    var = tl.sum(acc, axis=0) / n_total
    rstd = 1.0 / _sqrt(var + _scalar(eps, cdt))
    tl.store(MEAN_ptr + b, mean)
    tl.store(RSTD_ptr + b, rstd)


# --------------------------------------------------------------------------------------------------------------
# Phase 1: whitening statistics, MSE partials and attention maps
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _feat_loss_fwd_kernel(
    S_ptr,  # [B, C, HW] student
    stride_sb, stride_sc, stride_shw,
    T_ptr,  # [B, C, HW] teacher
    stride_tb, stride_tc, stride_thw,
    AS_ptr,  # [B, HW] attention map sum_c |s|^p (compute dtype)
    AT_ptr,  # [B, HW] attention map sum_c |t|^p of the raw teacher
    MSE_ptr,  # [B, n_tiles] partial sums of (s - W(t))**2
    MEAN_ptr,  # channel whitening: [B, HW] per-position mean (written if STORE_STATS); sample: [B] (read)
    RSTD_ptr,  # same shape as MEAN_ptr: 1/sqrt(var + eps)
    C, HW, n_tiles,
    p: tl.float64, eps: tl.float64,
    WHITEN: tl.constexpr, STORE_STATS: tl.constexpr, P_MODE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cdt = AS_ptr.dtype.element_ty
    pc = _scalar(p, cdt)
    hw = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    rows = tl.arange(0, BLOCK_C)
    s_base = S_ptr + b * stride_sb + hw[None, :] * stride_shw
    t_base = T_ptr + b * stride_tb + hw[None, :] * stride_thw

    if WHITEN == WHITEN_CHANNEL:
        # LayerNorm over C at each position: Welford per lane (lane row r sees channels r, r + BLOCK_C, ...), then
        # Chan's merge of the BLOCK_C lanes. One read of t; the biased variance is never formed as E[t^2]-E[t]^2.
        w_mean = tl.zeros([BLOCK_C, BLOCK_HW], dtype=cdt)
        w_m2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=cdt)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + rows
            mask = (c < C)[:, None] & hw_mask[None, :]
            t = tl.load(t_base + c[:, None].to(tl.int64) * stride_tc, mask=mask, other=0.0).to(cdt)
            inv_n = 1.0 / tl.cast(c0 // BLOCK_C + 1, cdt)
            delta = t - w_mean
            new_mean = w_mean + delta * inv_n
            w_m2 = tl.where(mask, w_m2 + delta * (t - new_mean), w_m2)
            w_mean = tl.where(mask, new_mean, w_mean)
        n_row = tl.maximum((C - rows + BLOCK_C - 1) // BLOCK_C, 0).to(cdt)[:, None]
        mean = tl.sum(n_row * w_mean, axis=0) / C.to(cdt)  # [BLOCK_HW]
        dev = w_mean - mean[None, :]
        var = tl.sum(tl.where(n_row > 0, w_m2 + n_row * dev * dev, 0.0), axis=0) / C.to(cdt)
        rstd = 1.0 / _sqrt(var + _scalar(eps, cdt))
        if STORE_STATS:
            tl.store(MEAN_ptr + b * HW + hw, mean, mask=hw_mask)
            tl.store(RSTD_ptr + b * HW + hw, rstd, mask=hw_mask)
        mean2 = mean[None, :]
        rstd2 = rstd[None, :]
    elif WHITEN == WHITEN_SAMPLE:
        mean2 = tl.load(MEAN_ptr + b)
        rstd2 = tl.load(RSTD_ptr + b)

    # One pass over C: accumulate lane-wise, reduce over the channel lanes once at the end.
    sq = tl.zeros([BLOCK_C, BLOCK_HW], dtype=cdt)
    a_s = tl.zeros([BLOCK_C, BLOCK_HW], dtype=cdt)
    a_t = tl.zeros([BLOCK_C, BLOCK_HW], dtype=cdt)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + rows
        mask = (c < C)[:, None] & hw_mask[None, :]
        c64 = c[:, None].to(tl.int64)
        s = tl.load(s_base + c64 * stride_sc, mask=mask, other=0.0).to(cdt)
        t = tl.load(t_base + c64 * stride_tc, mask=mask, other=0.0).to(cdt)
        if WHITEN == WHITEN_NONE:
            w = t
        else:
            w = (t - mean2) * rstd2
        diff = tl.where(mask, s - w, 0.0)
        sq += diff * diff
        a_s += _abs_pow(s, pc, P_MODE)  # masked lanes load 0 and add |0|^p = 0
        a_t += _abs_pow(t, pc, P_MODE)
    tl.store(AS_ptr + b * HW + hw, tl.sum(a_s, axis=0), mask=hw_mask)
    tl.store(AT_ptr + b * HW + hw, tl.sum(a_t, axis=0), mask=hw_mask)
    tl.store(MSE_ptr + b * n_tiles + tile, tl.sum(tl.sum(sq, axis=1), axis=0))


# --------------------------------------------------------------------------------------------------------------
# Phase 2: per-sample attention-transfer term and map gradient
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _feat_loss_at_kernel(
    AS_ptr,  # [B, HW] student attention map
    AT_ptr,  # [B, HW] teacher attention map
    GA_ptr,  # [B, HW] d loss / d a_s (written if COMPUTE_GRAD)
    ATB_ptr,  # [B] AT term of each sample (already divided by B, or by B*HW for mean_sq)
    HW,
    at_norm: tl.float64,  # 1/B (paper) or 1/(B*HW) (mean_sq)
    g_scale: tl.float64,  # c_l*at_weight/B (paper) or 2*c_l*at_weight/(B*HW) (mean_sq)
    at_eps: tl.float64,  # AT_NORM_EPS
    tiny: tl.float64,  # smallest normal number of the compute dtype (the reference's clamp of ||d||)
    AT_MODE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cdt = AS_ptr.dtype.element_ty
    base = b * HW
    acc_s = tl.zeros([BLOCK], dtype=cdt)
    acc_t = tl.zeros([BLOCK], dtype=cdt)
    for j0 in range(0, HW, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        mask = j < HW
        xs = tl.load(AS_ptr + base + j, mask=mask, other=0.0)
        xt = tl.load(AT_ptr + base + j, mask=mask, other=0.0)
        acc_s += xs * xs
        acc_t += xt * xt
    n_s = _sqrt(tl.sum(acc_s, axis=0))
    n_t = _sqrt(tl.sum(acc_t, axis=0))
    # clamp_min(norm, AT_NORM_EPS), NaN-propagating like torch.clamp_min.
    eps_c = _scalar(at_eps, cdt)
    den_s = tl.where(n_s < eps_c, eps_c, n_s)
    den_t = tl.where(n_t < eps_c, eps_c, n_t)
    acc_dd = tl.zeros([BLOCK], dtype=cdt)
    acc_dq = tl.zeros([BLOCK], dtype=cdt)
    acc_nan = tl.zeros([BLOCK], dtype=cdt)  # NaN if any q_s is NaN, else 0
    for j0 in range(0, HW, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        mask = j < HW
        # d is a plain difference of two correctly rounded quotients, never a*b - c*d (which the compiler contracts
        # into an FMA, leaving one product unrounded): identical maps, and maps that differ by a power of two, give
        # bitwise equal q_s and q_t, so d and ||d|| are exactly 0 and the zero subgradient below applies.
        q_s = _div_rn(tl.load(AS_ptr + base + j, mask=mask, other=0.0), den_s)
        q_t = _div_rn(tl.load(AT_ptr + base + j, mask=mask, other=0.0), den_t)
        d = q_s - q_t
        acc_dd += d * d
        if COMPUTE_GRAD:
            acc_dq += d * q_s
            if AT_MODE == AT_PAPER:
                acc_nan += tl.where(q_s != q_s, q_s, 0.0)
    dd = tl.sum(acc_dd, axis=0)
    if AT_MODE == AT_PAPER:
        dn = _sqrt(dd)
        tl.store(ATB_ptr + b, dn * _scalar(at_norm, cdt))
    else:
        tl.store(ATB_ptr + b, dd * _scalar(at_norm, cdt))
    if COMPUTE_GRAD:
        if AT_MODE == AT_PAPER:
            # g_q = g_scale * d / ||d|| (zero where ||d|| == 0, and where it is NaN, as the reference's where()).
            tiny_c = _scalar(tiny, cdt)
            dn_c = tl.where(dn < tiny_c, tiny_c, dn)
            has_d = dn > 0  # False for NaN too: the reference's where() then zeroes g_q, even where d is NaN
            k = tl.where(has_d, _scalar(g_scale, cdt) / dn_c, 0.0).to(cdt)
            # <g_q, q_s>; with g_q zeroed it is sum(0 * q_s): 0, or NaN when q_s has a NaN (an Inf student).
            inner = tl.where(has_d, k * tl.sum(acc_dq, axis=0), tl.sum(acc_nan, axis=0)).to(cdt)
        else:
            k = _scalar(g_scale, cdt)
            inner = k * tl.sum(acc_dq, axis=0)
        big = n_s > eps_c
        for j0 in range(0, HW, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            mask = j < HW
            q_s = _div_rn(tl.load(AS_ptr + base + j, mask=mask, other=0.0), den_s)
            q_t = _div_rn(tl.load(AT_ptr + base + j, mask=mask, other=0.0), den_t)
            g_q = k * (q_s - q_t)  # q_s, q_t as in the loop above, so d is exactly 0 where it was there
            if AT_MODE == AT_PAPER:
                g_q = tl.where(has_d, g_q, 0.0)
            g_a = tl.where(big, (g_q - q_s * inner) / den_s, g_q / eps_c)
            tl.store(GA_ptr + base + j, g_a.to(cdt), mask=mask)


@triton.jit
def _feat_loss_finalize_kernel(
    MSE_ptr,  # [n_mse] MSE partial sums of the level (compute dtype)
    ATB_ptr,  # [B] AT terms of the level's samples
    MSE_OUT_ptr,  # [L] per-level mse (output dtype)
    AT_OUT_ptr,  # [L] per-level at
    CONTRIB_ptr,  # [L] c_l * (mse_weight * mse_l + at_weight * at_l)
    LOSS_ptr,  # [] the loss (written by the last level's call)
    n_mse, B, level, n_levels,
    inv_n: tl.float64, coef: tl.float64, mse_weight: tl.float64, at_weight: tl.float64,
    IS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    cdt = MSE_ptr.dtype.element_ty
    odt = MSE_OUT_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=cdt)
    for i0 in range(0, n_mse, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(MSE_ptr + i, mask=i < n_mse, other=0.0)
    mse = (tl.sum(acc, axis=0) * _scalar(inv_n, cdt)).to(odt)
    acc = tl.zeros([BLOCK], dtype=cdt)
    for i0 in range(0, B, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(ATB_ptr + i, mask=i < B, other=0.0)
    at = tl.sum(acc, axis=0).to(odt)
    tl.store(MSE_OUT_ptr + level, mse)
    tl.store(AT_OUT_ptr + level, at)
    tl.store(CONTRIB_ptr + level, _scalar(coef, odt) * (_scalar(mse_weight, odt) * mse + _scalar(at_weight, odt) * at))
    if IS_LAST:
        # Stream order guarantees the earlier levels' contributions are written; sum them in level order.
        loss = tl.load(CONTRIB_ptr)
        for lvl in range(1, n_levels):
            loss += tl.load(CONTRIB_ptr + lvl)
        tl.store(LOSS_ptr, loss)


# --------------------------------------------------------------------------------------------------------------
# Phase 3: the student gradient
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _feat_loss_grad_kernel(
    S_ptr,  # [B, C, HW] student
    stride_sb, stride_sc, stride_shw,
    T_ptr,  # [B, C, HW] teacher
    stride_tb, stride_tc, stride_thw,
    G_ptr,  # [B, C, HW] d loss / d s (student dtype)
    stride_gb, stride_gc, stride_ghw,
    GA_ptr,  # [B, HW] d loss / d a_s (compute dtype)
    MEAN_ptr,  # channel whitening: [B, HW]; sample whitening: [B]
    RSTD_ptr,  # same shape as MEAN_ptr
    C, HW,
    p: tl.float64,
    mse_scale: tl.float64,  # c_l * mse_weight * 2 / (B*C*H*W)
    WHITEN: tl.constexpr, P_MODE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cdt = GA_ptr.dtype.element_ty
    pc = _scalar(p, cdt)
    k_mse = _scalar(mse_scale, cdt)
    hw = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    rows = tl.arange(0, BLOCK_C)
    s_base = S_ptr + b * stride_sb + hw[None, :] * stride_shw
    t_base = T_ptr + b * stride_tb + hw[None, :] * stride_thw
    g_base = G_ptr + b * stride_gb + hw[None, :] * stride_ghw
    g_a = tl.load(GA_ptr + b * HW + hw, mask=hw_mask, other=0.0)[None, :]
    if WHITEN == WHITEN_CHANNEL:
        mean2 = tl.load(MEAN_ptr + b * HW + hw, mask=hw_mask, other=0.0)[None, :]
        rstd2 = tl.load(RSTD_ptr + b * HW + hw, mask=hw_mask, other=0.0)[None, :]
    elif WHITEN == WHITEN_SAMPLE:
        mean2 = tl.load(MEAN_ptr + b)
        rstd2 = tl.load(RSTD_ptr + b)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + rows
        mask = (c < C)[:, None] & hw_mask[None, :]
        c64 = c[:, None].to(tl.int64)
        s = tl.load(s_base + c64 * stride_sc, mask=mask, other=0.0).to(cdt)
        t = tl.load(t_base + c64 * stride_tc, mask=mask, other=0.0).to(cdt)
        if WHITEN == WHITEN_NONE:
            w = t
        else:
            w = (t - mean2) * rstd2
        g = k_mse * (s - w) + g_a * _abs_pow_grad(s, pc, P_MODE)
        tl.store(g_base + c64 * stride_gc, g.to(G_ptr.dtype.element_ty), mask=mask)


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


# --------------------------------------------------------------------------------------------------------------
# Host launcher
# --------------------------------------------------------------------------------------------------------------
def _p_mode(p: float) -> int:
    return P_ONE.value if p == 1.0 else P_TWO.value if p == 2.0 else P_GENERAL.value


def _as_flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``x`` with strides that flatten [B, C, H, W] to [B, C, HW]. NCHW and channels_last (and channel slices) are
    used as they are; a spatially sliced view whose H and W cannot share one stride is copied (the only copy)."""
    strides = flat_strides(x)
    if strides is None:
        x = x.contiguous()
        strides = flat_strides(x)
    return x, strides


def feat_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], level_coef: Sequence[float],
              mse_weight: float, at_weight: float, at_p: float, at_mode: int, whiten: int, eps: float,
              compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Triton implementation of ``dtkernels::feat_loss`` (contract: :func:`dtkernels.reference.feat_loss_op`).

    Args:
        student: L tensors ``[B_l, C_l, H_l, W_l]`` (float32/float16/bfloat16/float64, any strides).
        teacher: L tensors of the same shapes and dtypes.
        level_coef: ``w_l / sum(w)`` per level.
        mse_weight, at_weight, at_p, eps: loss parameters (checked by the caller).
        at_mode: an :class:`~dtkernels.modes.AtMode` value.
        whiten: a :class:`~dtkernels.modes.Whitening` value.
        compute_grad: also write ``d loss / d student`` for ``grad_output == 1``.

    Returns:
        ``(loss [], mse [L], at [L], grads)``: float32 (float64 when ``student[0]`` is float64); ``grads`` has one
        tensor per level like ``torch.empty_like(student[l])``, or is empty when ``compute_grad`` is false.
    """
    n_levels = len(student)
    device = student[0].device
    out_dtype = compute_dtype(student[0].dtype)
    loss = torch.empty((), dtype=out_dtype, device=device)
    mse_out = torch.empty((n_levels,), dtype=out_dtype, device=device)
    at_out = torch.empty((n_levels,), dtype=out_dtype, device=device)
    contrib = torch.empty((n_levels,), dtype=out_dtype, device=device)
    p_mode = _p_mode(float(at_p))
    at_mode = AtMode(at_mode)
    whiten = Whitening(whiten)
    grads: list[torch.Tensor] = []
    for level, (s_in, t_in, coef) in enumerate(zip(student, teacher, level_coef)):
        s, s_strides = _as_flat(s_in)
        t, t_strides = _as_flat(t_in.detach())
        bsz, chans, h, w = s.shape
        hw = h * w
        cdt = compute_dtype(s.dtype)
        tiles = tile_constexprs(s.dtype)
        n_tiles = triton.cdiv(hw, tiles["BLOCK_HW"])
        grid = (n_tiles, bsz)

        a_s = torch.empty((bsz, hw), dtype=cdt, device=device)
        a_t = torch.empty((bsz, hw), dtype=cdt, device=device)
        mse_part = torch.empty((bsz, n_tiles), dtype=cdt, device=device)
        if whiten == Whitening.CHANNEL:
            stat_shape = (bsz, hw) if compute_grad else (1,)
        elif whiten == Whitening.SAMPLE:
            stat_shape = (bsz,)
        else:
            stat_shape = (1,)
        mean = torch.empty(stat_shape, dtype=cdt, device=device)
        rstd = torch.empty(stat_shape, dtype=cdt, device=device)

        if whiten == Whitening.SAMPLE:
            cfg = shipped_config("_sample_stats_partial_kernel", t.dtype, **tiles)
            p_mean = torch.empty((bsz, n_tiles), dtype=cdt, device=device)
            p_m2 = torch.empty((bsz, n_tiles), dtype=cdt, device=device)
            _sample_stats_partial_kernel[grid](t, *t_strides, p_mean, p_m2, chans, hw, n_tiles,
                                               num_warps=NUM_WARPS, **cfg)
            cfg = shipped_config("_sample_stats_kernel", cdt, BLOCK=BLOCK_1D)
            _sample_stats_kernel[(bsz,)](p_mean, p_m2, mean, rstd, chans, hw, n_tiles, tiles["BLOCK_HW"],
                                         float(eps), num_warps=NUM_WARPS, **cfg)

        cfg = shipped_config("_feat_loss_fwd_kernel", s.dtype, WHITEN=whiten,
                             STORE_STATS=bool(whiten == Whitening.CHANNEL and compute_grad), P_MODE=p_mode, **tiles)
        _feat_loss_fwd_kernel[grid](s, *s_strides, t, *t_strides, a_s, a_t, mse_part, mean, rstd, chans, hw,
                                    n_tiles, float(at_p), float(eps), num_warps=NUM_WARPS, **cfg)

        coef = float(coef)
        if at_mode == AtMode.PAPER:
            at_norm, g_scale = 1.0 / bsz, coef * float(at_weight) / bsz
        else:
            at_norm, g_scale = 1.0 / (bsz * hw), 2.0 * coef * float(at_weight) / (bsz * hw)
        g_a = torch.empty((bsz, hw), dtype=cdt, device=device) if compute_grad else a_s  # a_s: unused placeholder
        at_b = torch.empty((bsz,), dtype=cdt, device=device)
        cfg = shipped_config("_feat_loss_at_kernel", cdt, AT_MODE=at_mode, COMPUTE_GRAD=bool(compute_grad),
                             BLOCK=at_block(cdt))
        _feat_loss_at_kernel[(bsz,)](a_s, a_t, g_a, at_b, hw, at_norm, g_scale, AT_NORM_EPS,
                                     torch.finfo(cdt).tiny, num_warps=NUM_WARPS, **cfg)

        n_elem = s.numel()
        cfg = shipped_config("_feat_loss_finalize_kernel", cdt, out_dtype, IS_LAST=level == n_levels - 1,
                             BLOCK=BLOCK_1D)
        _feat_loss_finalize_kernel[(1,)](mse_part, at_b, mse_out, at_out, contrib, loss, bsz * n_tiles, bsz, level,
                                         n_levels, 1.0 / n_elem, coef, float(mse_weight), float(at_weight),
                                         num_warps=NUM_WARPS, **cfg)

        if compute_grad:
            grad = torch.empty_like(s_in)
            g_strides = flat_strides(grad)
            # empty_like of a non-dense view can come back in a layout that does not flatten: write a contiguous
            # buffer and copy it over (never happens for NCHW / channels_last students).
            g_buf = grad if g_strides is not None else torch.empty(s_in.shape, dtype=s_in.dtype, device=device)
            if g_strides is None:
                g_strides = flat_strides(g_buf)
            cfg = shipped_config("_feat_loss_grad_kernel", s.dtype, WHITEN=whiten, P_MODE=p_mode,
                                 **tile_constexprs(s.dtype, grad=True))
            _feat_loss_grad_kernel[grid](s, *s_strides, t, *t_strides, g_buf, *g_strides, g_a, mean, rstd,
                                         chans, hw, float(at_p), 2.0 * coef * float(mse_weight) / n_elem,
                                         num_warps=NUM_WARPS, **cfg)
            if g_buf is not grad:
                grad.copy_(g_buf)
            grads.append(grad)
    return loss, mse_out, at_out, grads


