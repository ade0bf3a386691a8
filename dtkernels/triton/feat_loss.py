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

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .utils import (
    AT_NORM_EPS,
    BLOCK_1D,
    NUM_WARPS,
    at_block,
    compute_dtype,
    flat_strides,
    shipped_config,
    tile_constexprs,
)

__all__ = ["feat_loss"]


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
    if P_MODE == 1:
        r = tl.abs(x)
    elif P_MODE == 2:
        r = x * x
    else:
        r = tl.exp2(p * tl.log2(tl.abs(x)))
    return r


@triton.jit
def _abs_pow_grad(x, p, P_MODE: tl.constexpr):
    """``d|x|**p / dx = p * |x|**(p-1) * sign(x)``; ``sign(x)`` for p == 1 (zero at zero)."""
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))  # x itself at 0 (and NaN)
    if P_MODE == 1:
        r = sign.to(x.dtype)
    elif P_MODE == 2:
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
    MEAN_ptr,  # whiten=1: [B, HW] per-position mean (written if STORE_STATS); whiten=2: [B] (read)
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

    if WHITEN == 1:
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
    elif WHITEN == 2:
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
        if WHITEN == 0:
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
            if AT_MODE == 0:
                acc_nan += tl.where(q_s != q_s, q_s, 0.0)
    dd = tl.sum(acc_dd, axis=0)
    if AT_MODE == 0:
        dn = _sqrt(dd)
        tl.store(ATB_ptr + b, dn * _scalar(at_norm, cdt))
    else:
        tl.store(ATB_ptr + b, dd * _scalar(at_norm, cdt))
    if COMPUTE_GRAD:
        if AT_MODE == 0:
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
            if AT_MODE == 0:
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
    MEAN_ptr,  # whiten=1: [B, HW]; whiten=2: [B]
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
    if WHITEN == 1:
        mean2 = tl.load(MEAN_ptr + b * HW + hw, mask=hw_mask, other=0.0)[None, :]
        rstd2 = tl.load(RSTD_ptr + b * HW + hw, mask=hw_mask, other=0.0)[None, :]
    elif WHITEN == 2:
        mean2 = tl.load(MEAN_ptr + b)
        rstd2 = tl.load(RSTD_ptr + b)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + rows
        mask = (c < C)[:, None] & hw_mask[None, :]
        c64 = c[:, None].to(tl.int64)
        s = tl.load(s_base + c64 * stride_sc, mask=mask, other=0.0).to(cdt)
        t = tl.load(t_base + c64 * stride_tc, mask=mask, other=0.0).to(cdt)
        if WHITEN == 0:
            w = t
        else:
            w = (t - mean2) * rstd2
        g = k_mse * (s - w) + g_a * _abs_pow_grad(s, pc, P_MODE)
        tl.store(g_base + c64 * stride_gc, g.to(G_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Host launcher
# --------------------------------------------------------------------------------------------------------------
def _p_mode(p: float) -> int:
    return 1 if p == 1.0 else 2 if p == 2.0 else 0


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
        at_mode: 0 = "paper", 1 = "mean_sq".
        whiten: 0 = none, 1 = "channel", 2 = "sample".
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
    at_mode = int(at_mode)
    whiten = int(whiten)
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
        if whiten == 1:
            stat_shape = (bsz, hw) if compute_grad else (1,)
        elif whiten == 2:
            stat_shape = (bsz,)
        else:
            stat_shape = (1,)
        mean = torch.empty(stat_shape, dtype=cdt, device=device)
        rstd = torch.empty(stat_shape, dtype=cdt, device=device)

        if whiten == 2:
            cfg = shipped_config("_sample_stats_partial_kernel", t.dtype, **tiles)
            p_mean = torch.empty((bsz, n_tiles), dtype=cdt, device=device)
            p_m2 = torch.empty((bsz, n_tiles), dtype=cdt, device=device)
            _sample_stats_partial_kernel[grid](t, *t_strides, p_mean, p_m2, chans, hw, n_tiles,
                                               num_warps=NUM_WARPS, **cfg)
            cfg = shipped_config("_sample_stats_kernel", cdt, BLOCK=BLOCK_1D)
            _sample_stats_kernel[(bsz,)](p_mean, p_m2, mean, rstd, chans, hw, n_tiles, tiles["BLOCK_HW"],
                                         float(eps), num_warps=NUM_WARPS, **cfg)

        cfg = shipped_config("_feat_loss_fwd_kernel", s.dtype, WHITEN=whiten,
                             STORE_STATS=bool(whiten == 1 and compute_grad), P_MODE=p_mode, **tiles)
        _feat_loss_fwd_kernel[grid](s, *s_strides, t, *t_strides, a_s, a_t, mse_part, mean, rstd, chans, hw,
                                    n_tiles, float(at_p), float(eps), num_warps=NUM_WARPS, **cfg)

        coef = float(coef)
        if at_mode == 0:
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


