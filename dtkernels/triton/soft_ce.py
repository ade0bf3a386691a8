"""Triton kernels and host launchers of ``dtkernels::soft_ce`` and ``dtkernels::soft_ce_backward``.

The math is :mod:`dtkernels.reference` (``soft_ce_op`` and ``soft_ce_backward_op``). Inputs are the canonical
``[B, K, P]`` strided views built by :func:`dtkernels.functional.soft_ce` (NCHW: position stride 1; channels_last
and ``[N, K]`` rows: class stride 1); nothing is copied. Per position ``p``, with ``c = log2(e) / tau``:

* one pass over the K classes in chunks of BLOCK_K keeps an online softmax of the student and of the teacher:
  running maxima ``m_s``, ``m_t`` of the raw logits and the rescaled sums ``z_s = sum_k 2**((s_k - m_s) c)``,
  ``z_t = sum_k 2**((t_k - m_t) c)``, plus ``d = sum_k 2**((t_k - m_t) c) * (m_s - s_k)``, whose terms are all
  ``>= 0`` (no cancellation, even for logits of +-1e4). Then ``l_p = scale * (d / (tau z_t) + ln z_s)``, which is
  ``scale * (lse(s/tau) - sum_k pt_k s_k / tau)``. Exponents are formed from ``s_k - m_s`` (exact near the maximum)
  before scaling, so the probabilities that matter are more accurate than ``softmax(s / tau)`` in the same dtype;
* when a gradient is needed, a second loop over K for the same tile of positions (its reads hit L1/L2) writes
  ``w_p * scale * (ps_k - pt_k) / tau`` in the student's dtype and layout.

Kernels:

* ``_soft_ce_fwd_kernel`` per (tile of BLOCK_P positions, sample): reduction "none" stores the ``[B, P]`` map;
  "mean"/"sum" store one partial sum per program, and with ``compute_grad`` write the gradient for
  ``grad_output == 1`` (weight ``m_p``, times ``1 / sum(m)`` for mean: the mask sum is a device-side
  ``torch.sum`` launched before, so there is no host sync; 1 / (B*P) without a mask);
* ``_soft_ce_finalize_kernel`` (one program): the loss from the partials in a fixed order (mean: divided by the
  mask sum, 0 when it is 0). Every reduction is deterministic; there are no atomics;
* ``_soft_ce_bwd_kernel`` per (tile, sample): the gradient for a per-position upstream gradient (reduction "none").

Masked positions (``m == 0``) are computed like the others, so the loads of a tile keep one mask per vector and
vectorize, and every quantity is per position; their loss and gradient are then selected to exactly 0, so NaN
logits there do not propagate. NaN in an unmasked position propagates to its loss and gradient.
"""

from __future__ import annotations

import inspect
import itertools
import math

import torch
import triton
import triton.language as tl

from ..modes import Reduction
from .utils import BLOCK_1D, INPUT_DTYPES, NUM_WARPS, ConfigIndex, compute_dtype, dtype_name

__all__ = ["soft_ce", "soft_ce_backward", "SHIPPED_CONFIGS", "shipped_config", "tile_for", "aot_source_args"]

# --------------------------------------------------------------------------------------------------------------
# Tiles and shipped configurations
# --------------------------------------------------------------------------------------------------------------
#: Tile (BLOCK_K, BLOCK_P) per unit-stride layout and class count (2048 elements per input and loop step, 16 per
#: thread with 4 warps). NCHW (positions contiguous): wide in P so each thread holds vectorized position columns
#: and the per-chunk reductions over K stay (mostly) in registers. channels_last / [N, K] rows (classes contiguous):
#: the K chunk is the unit-stride axis. Class counts up to 32 (Cityscapes-like 19) use a narrower K chunk than
#: larger ones (ADE20K's 150, ImageNet's 1000), so few lanes idle. float64 students use half the positions (twice the
#: registers per element; the full tile spills).
SMALL_K = 32
TILES = {
    ("nchw", "small_k"): (4, 256),  # 4 x 512 spilled 8-16 bytes (fp32 masked mean/sum on sm_80, bf16 grad on sm_90)
    ("nchw", "large_k"): (16, 128),
    ("channels_last", "small_k"): (32, 64),
    ("channels_last", "large_k"): (64, 32),
}


def _tile(layout: str, k: int, dtype: str) -> tuple[int, int]:
    """``(BLOCK_K, BLOCK_P)`` for a layout, class count and student dtype name."""
    block_k, block_p = TILES[(layout, "small_k" if k <= SMALL_K else "large_k")]
    # fp64 everywhere, and half types in channels_last (the fp16 backward spilled 4 bytes on sm_90), use half the
    # positions per program.
    halve = dtype == "fp64" or (layout == "channels_last" and dtype in ("fp16", "bf16"))
    return (block_k, block_p // 2) if halve else (block_k, block_p)


# The launcher passes int(reduction) as the REDUCTION constexpr; the kernels compare it with these.
RED_NONE = tl.constexpr(int(Reduction.NONE))
RED_MEAN = tl.constexpr(int(Reduction.MEAN))
RED_SUM = tl.constexpr(int(Reduction.SUM))

#: Forward variants (REDUCTION, HAS_MASK, COMPUTE_GRAD); reduction "none" never writes a gradient.
FWD_VARIANTS = tuple((int(r), m, g) for r in Reduction for m in (False, True) for g in (False, True)
                     if not (r == Reduction.NONE and g))


#: Teacher dtypes compiled for each student dtype. Any other pairing is converted to the student's compute dtype
#: first (exact: the kernel would convert each teacher element to that dtype anyway), which keeps the compiled set at
#: 6 pairs instead of 16 so the ahead-of-time check of every shipped config stays within minutes.
TEACHER_DTYPES = {"fp32": ("fp32",), "fp16": ("fp16", "fp32"), "bf16": ("bf16", "fp32"), "fp64": ("fp64",)}


def _teacher_for(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The teacher in a dtype shipped for the student's (a copy only for unusual pairings such as fp32 + bf16)."""
    if dtype_name(teacher.dtype) in TEACHER_DTYPES[dtype_name(student.dtype)]:
        return teacher
    return teacher.to(compute_dtype(student.dtype))


def _build_shipped_configs() -> list[dict]:
    """Every (kernel, dtypes, constexprs, layout) the launchers can choose.

    ``dtype`` is the student's element type (the gradient has it too; the loss, mask and upstream gradient are in
    its compute dtype), ``out_dtype`` the teacher's (see :data:`TEACHER_DTYPES`), ``layout`` the
    unit stride the JIT specializes on ("nchw": position stride 1; "channels_last": class stride 1).
    """
    out = []
    for (layout, kclass) in TILES:
        for s_dt, t_dt in ((s, t) for s in INPUT_DTYPES for t in TEACHER_DTYPES[s]):
            block_k, block_p = _tile(layout, 1 if kclass == "small_k" else SMALL_K + 1, s_dt)
            tiles = {"BLOCK_K": block_k, "BLOCK_P": block_p}
            for reduction, has_mask, grad in FWD_VARIANTS:
                out.append({"kernel": "_soft_ce_fwd_kernel", "dtype": s_dt, "out_dtype": t_dt, "layout": layout,
                            "constexprs": {"REDUCTION": reduction, "HAS_MASK": has_mask, "COMPUTE_GRAD": grad,
                                           **tiles}})
            for has_mask in (False, True):
                out.append({"kernel": "_soft_ce_bwd_kernel", "dtype": s_dt, "out_dtype": t_dt, "layout": layout,
                            "constexprs": {"HAS_MASK": has_mask, **tiles}})
    for cdt, reduction, has_mask in itertools.product(("fp32", "fp64"), (int(Reduction.MEAN), int(Reduction.SUM)),
                                                      (False, True)):
        out.append({"kernel": "_soft_ce_finalize_kernel", "dtype": cdt, "layout": None,
                    "constexprs": {"REDUCTION": reduction, "HAS_MASK": has_mask, "BLOCK": BLOCK_1D}})
    return out


#: The kernel configurations the launchers can choose (the ahead-of-time compile check covers exactly these), in
#: the format of :data:`dtkernels.triton.utils.SHIPPED_CONFIGS`.
SHIPPED_CONFIGS: list[dict] = _build_shipped_configs()

shipped_config = ConfigIndex(SHIPPED_CONFIGS, "dtkernels.triton.soft_ce")


def tile_for(student: torch.Tensor) -> tuple[str, int, int]:
    """``(layout, BLOCK_K, BLOCK_P)`` for a canonical ``[B, K, P]`` student: the tile follows its unit stride
    (position stride 1 -> "nchw"; otherwise the class-contiguous tile, also used for fully strided views)."""
    _, k, p = student.shape
    _, sk, sp = student.stride()
    if p == 1 or k == 1:
        layout = "channels_last" if p == 1 else "nchw"
    elif sp == 1 or sk == 1:
        layout = "nchw" if sp == 1 else "channels_last"
    else:  # fully strided view: the tile's wide axis is the one with the smaller stride
        layout = "nchw" if abs(sp) <= abs(sk) else "channels_last"
    return (layout, *_tile(layout, k, dtype_name(student.dtype)))


# --------------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _scalar(x, dtype: tl.constexpr):
    """A float64 scalar argument in the compute dtype (adding it to a typed zero keeps its value in the
    interpreter too, where float arguments arrive as Python floats)."""
    return (tl.zeros([], dtype=dtype) + x).to(dtype)


@triton.jit
def _softmax_stats(
    s_ptrs, stride_sk,  # [1, BLOCK_P] student pointers of the tile's positions at class 0
    t_ptrs, stride_tk,  # [1, BLOCK_P] teacher pointers
    p_ok,  # [BLOCK_P] positions inside P
    K, c,  # c = log2(e) / tau in the compute dtype
    WITH_CE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Online softmax over K of the student and the teacher at BLOCK_P positions.

    Returns ``(m_s, z_s, m_t, z_t, d)``, each [BLOCK_P]: maxima of the raw logits, sums of ``2**((x - m) c)`` and
    (WITH_CE) ``d = sum_k 2**((t_k - m_t) c) * (m_s - s_k)`` relative to the final ``m_s``.
    """
    cdt = c.dtype
    rk = tl.arange(0, BLOCK_K)
    m_s = tl.full([BLOCK_P], float("-inf"), cdt)
    m_t = tl.full([BLOCK_P], float("-inf"), cdt)
    z_s = tl.zeros([BLOCK_P], cdt)
    z_t = tl.zeros([BLOCK_P], cdt)
    d = tl.zeros([BLOCK_P], cdt)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = (k < K)[:, None]
        ld = k_ok & p_ok[None, :]
        k64 = k[:, None].to(tl.int64)
        s = tl.load(s_ptrs + k64 * stride_sk, mask=ld, other=0.0).to(cdt)
        t = tl.load(t_ptrs + k64 * stride_tk, mask=ld, other=0.0).to(cdt)
        s_k = tl.where(k_ok, s, float("-inf"))  # classes past K take no part (other=0 keeps positions past P finite)
        t_k = tl.where(k_ok, t, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(s_k, axis=0))
        m_t_new = tl.maximum(m_t, tl.max(t_k, axis=0))
        alpha_s = tl.exp2((m_s - m_s_new) * c)
        alpha_t = tl.exp2((m_t - m_t_new) * c)
        e_s = tl.exp2((s_k - m_s_new[None, :]) * c)
        e_t = tl.exp2((t_k - m_t_new[None, :]) * c)
        z_s = z_s * alpha_s + tl.sum(e_s, axis=0)
        if WITH_CE:
            # Re-reference d to the new student maximum (+ (m_new - m_old) z_t), then to the new teacher maximum.
            # z_t == 0 only before the first chunk, where m_s is -inf.
            shift = tl.where(z_t > 0, m_s_new - m_s, 0.0) * z_t
            # e_t is 0 past K, where s was loaded as 0: the product stays finite.
            d = (d + shift) * alpha_t + tl.sum(e_t * (m_s_new[None, :] - s), axis=0)
        z_t = z_t * alpha_t + tl.sum(e_t, axis=0)
        m_s = m_s_new
        m_t = m_t_new
    return m_s, z_s, m_t, z_t, d


@triton.jit
def _store_grad(
    s_ptrs, stride_sk,  # [1, BLOCK_P] student pointers at class 0
    t_ptrs, stride_tk,  # [1, BLOCK_P] teacher pointers
    g_ptrs, stride_gk,  # [1, BLOCK_P] gradient pointers
    p_ok, valid,  # [BLOCK_P] positions inside P / inside P with m != 0
    m_s, z_s, m_t, z_t,  # [BLOCK_P] from _softmax_stats
    w,  # [BLOCK_P] per-position weight: scale / tau * (upstream gradient) * m_p
    K, c,
    BLOCK_K: tl.constexpr,
):
    """Second loop over K: ``g = w * (ps - pt)``, exactly 0 at masked positions (whatever their logits)."""
    rk = tl.arange(0, BLOCK_K)
    a_s = (w / z_s)[None, :]
    a_t = (w / z_t)[None, :]
    m_s2 = m_s[None, :]
    m_t2 = m_t[None, :]
    skip = (~valid)[None, :]
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = (k < K)[:, None]
        ld = k_ok & p_ok[None, :]
        k64 = k[:, None].to(tl.int64)
        s = tl.load(s_ptrs + k64 * stride_sk, mask=ld, other=0.0).to(c.dtype)
        t = tl.load(t_ptrs + k64 * stride_tk, mask=ld, other=0.0).to(c.dtype)
        g = a_s * tl.exp2((s - m_s2) * c) - a_t * tl.exp2((t - m_t2) * c)
        g = tl.where(skip, 0.0, g)
        tl.store(g_ptrs + k64 * stride_gk, g.to(g_ptrs.dtype.element_ty), mask=ld)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _soft_ce_fwd_kernel(
    S_ptr,  # [B, K, P] student logits
    stride_sb, stride_sk, stride_sp,
    T_ptr,  # [B, K, P] teacher logits (any floating dtype)
    stride_tb, stride_tk, stride_tp,
    M_ptr,  # [B, P] mask weights (compute dtype); unused unless HAS_MASK
    stride_mb, stride_mp,
    OUT_ptr,  # reduction none: [B, P] per-position loss; else [B, n_tiles] per-program partial sums (compute dtype)
    G_ptr,  # [B, K, P] d loss / d student for grad_output == 1 (student dtype); unused unless COMPUTE_GRAD
    stride_gb, stride_gk, stride_gp,
    DENOM_ptr,  # [] sum of the mask (compute dtype); read for reduction mean with HAS_MASK and COMPUTE_GRAD
    K, P, n_tiles,
    c_arg: tl.float64,  # log2(e) / tau
    inv_tau: tl.float64,
    scale: tl.float64,  # 1 or tau**2
    grad_scale: tl.float64,  # scale / tau (divided by B*P for mean without a mask)
    REDUCTION: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cdt = OUT_ptr.dtype.element_ty
    c = _scalar(c_arg, cdt)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    if HAS_MASK:
        m = tl.load(M_ptr + b * stride_mb + p * stride_mp, mask=p_ok, other=0.0).to(cdt)
        valid = p_ok & (m != 0)
    else:
        valid = p_ok
    s_ptrs = S_ptr + b * stride_sb + p[None, :] * stride_sp
    t_ptrs = T_ptr + b * stride_tb + p[None, :] * stride_tp
    m_s, z_s, m_t, z_t, d = _softmax_stats(s_ptrs, stride_sk, t_ptrs, stride_tk, p_ok, K, c,
                                           True, BLOCK_K, BLOCK_P)
    loss = _scalar(scale, cdt) * (d / z_t * _scalar(inv_tau, cdt) + tl.log(z_s))
    if HAS_MASK:
        loss = loss * m
    loss = tl.where(valid, loss, 0.0)
    if REDUCTION == RED_NONE:
        tl.store(OUT_ptr + b * P + p, loss, mask=p_ok)
    else:
        tl.store(OUT_ptr + b * n_tiles + tile, tl.sum(loss, axis=0))
        if COMPUTE_GRAD:
            w = tl.zeros([BLOCK_P], cdt) + _scalar(grad_scale, cdt)
            if HAS_MASK:
                w = w * m
                if REDUCTION == RED_MEAN:
                    denom = tl.load(DENOM_ptr).to(cdt)
                    w = tl.where(denom != 0, w / denom, 0.0)  # no valid position: zero gradient
            g_ptrs = G_ptr + b * stride_gb + p[None, :] * stride_gp
            _store_grad(s_ptrs, stride_sk, t_ptrs, stride_tk, g_ptrs, stride_gk, p_ok, valid, m_s, z_s, m_t, z_t,
                        w, K, c, BLOCK_K)


@triton.jit
def _soft_ce_finalize_kernel(
    PART_ptr,  # [n_part] per-program partial sums (compute dtype)
    DENOM_ptr,  # [] sum of the mask; read for reduction mean with HAS_MASK
    LOSS_ptr,  # [] the loss (compute dtype)
    n_part,
    n_pos: tl.float64,  # B*P, the divisor of mean without a mask
    REDUCTION: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    cdt = PART_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=cdt)
    for i0 in range(0, n_part, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(PART_ptr + i, mask=i < n_part, other=0.0)
    total = tl.sum(acc, axis=0)
    if REDUCTION == RED_MEAN:
        if HAS_MASK:
            denom = tl.load(DENOM_ptr).to(cdt)
            # 0 (not 0/0) when no position is valid; total * 0 keeps a NaN/Inf total visible, as the reference.
            loss = tl.where(denom != 0, total / tl.where(denom != 0, denom, 1.0), total * 0.0)
        else:
            loss = total / _scalar(n_pos, cdt)
    else:
        loss = total
    tl.store(LOSS_ptr, loss)


@triton.jit
def _soft_ce_bwd_kernel(
    S_ptr,  # [B, K, P] student logits
    stride_sb, stride_sk, stride_sp,
    T_ptr,  # [B, K, P] teacher logits
    stride_tb, stride_tk, stride_tp,
    M_ptr,  # [B, P] mask weights (compute dtype); unused unless HAS_MASK
    stride_mb, stride_mp,
    GL_ptr,  # [B, P] upstream gradient of the per-position loss (compute dtype; any strides, e.g. expanded)
    stride_lb, stride_lp,
    G_ptr,  # [B, K, P] d loss / d student (student dtype)
    stride_gb, stride_gk, stride_gp,
    K, P,
    c_arg: tl.float64,  # log2(e) / tau
    grad_scale: tl.float64,  # scale / tau
    HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cdt = GL_ptr.dtype.element_ty
    c = _scalar(c_arg, cdt)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    w = tl.load(GL_ptr + b * stride_lb + p * stride_lp, mask=p_ok, other=0.0).to(cdt) * _scalar(grad_scale, cdt)
    if HAS_MASK:
        m = tl.load(M_ptr + b * stride_mb + p * stride_mp, mask=p_ok, other=0.0).to(cdt)
        valid = p_ok & (m != 0)
        w = w * m
    else:
        valid = p_ok
    s_ptrs = S_ptr + b * stride_sb + p[None, :] * stride_sp
    t_ptrs = T_ptr + b * stride_tb + p[None, :] * stride_tp
    m_s, z_s, m_t, z_t, d = _softmax_stats(s_ptrs, stride_sk, t_ptrs, stride_tk, p_ok, K, c,
                                           False, BLOCK_K, BLOCK_P)
    g_ptrs = G_ptr + b * stride_gb + p[None, :] * stride_gp
    _store_grad(s_ptrs, stride_sk, t_ptrs, stride_tk, g_ptrs, stride_gk, p_ok, valid, m_s, z_s, m_t, z_t,
                w, K, c, BLOCK_K)


# --------------------------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------------------------
_LOG2E = 1.0 / math.log(2.0)


def _mask_in(mask: torch.Tensor | None, cdt: torch.dtype) -> torch.Tensor | None:
    """The ``[B, P]`` mask in the compute dtype (the public function already passes it so: no copy then)."""
    if mask is None or mask.dtype == cdt:
        return mask
    return mask.to(cdt)


def soft_ce(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, tau: float, scale: float,
            reduction: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of ``dtkernels::soft_ce`` (contract: :func:`dtkernels.reference.soft_ce_op`).

    Args:
        student: ``[B, K, P]`` logits, float32/float16/bfloat16/float64, any strides (no copy is made).
        teacher: ``[B, K, P]`` logits, any floating dtype, any strides.
        mask: ``[B, P]`` float weights, or None.
        tau: temperature (> 0); scale: 1 or ``tau**2``.
        reduction: a :class:`~dtkernels.modes.Reduction` value.
        compute_grad: for mean/sum, also write ``d loss / d student`` for ``grad_output == 1``.

    Returns:
        ``(loss, grad)``: loss ``[B, P]`` (none) or 0-dim, float32 (float64 for a float64 student); grad like
        ``torch.empty_like(student)``, or an empty ``[0]`` tensor when not computed.
    """
    teacher = _teacher_for(student, teacher.detach())
    bsz, k, p = student.shape
    device = student.device
    cdt = compute_dtype(student.dtype)
    reduction = Reduction(reduction)
    compute_grad = bool(compute_grad) and reduction != Reduction.NONE
    tau = float(tau)
    scale = float(scale)
    _, block_k, block_p = tile_for(student)
    n_tiles = triton.cdiv(p, block_p)
    grid = (n_tiles, bsz)

    out = torch.empty((bsz, p) if reduction == Reduction.NONE else (bsz, n_tiles), dtype=cdt, device=device)
    m = _mask_in(mask, cdt)
    has_mask = m is not None
    m_arg, m_strides = (m, m.stride()) if has_mask else (out, (0, 1))
    denom = m.sum() if (has_mask and reduction == Reduction.MEAN) else out  # device-side, deterministic; no host sync
    grad = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    g_arg, g_strides = (grad, grad.stride()) if compute_grad else (student, student.stride())
    grad_scale = scale / tau
    if reduction == Reduction.MEAN and not has_mask:
        grad_scale /= bsz * p

    cfg = shipped_config("_soft_ce_fwd_kernel", student.dtype, teacher.dtype, REDUCTION=reduction,
                         HAS_MASK=has_mask, COMPUTE_GRAD=compute_grad, BLOCK_K=block_k, BLOCK_P=block_p)
    _soft_ce_fwd_kernel[grid](student, *student.stride(), teacher, *teacher.stride(), m_arg, *m_strides, out,
                              g_arg, *g_strides, denom, k, p, n_tiles, _LOG2E / tau, 1.0 / tau, scale, grad_scale,
                              num_warps=NUM_WARPS, **cfg)
    if reduction == Reduction.NONE:
        return out, grad
    loss = torch.empty((), dtype=cdt, device=device)
    cfg = shipped_config("_soft_ce_finalize_kernel", cdt, REDUCTION=reduction, HAS_MASK=has_mask, BLOCK=BLOCK_1D)
    _soft_ce_finalize_kernel[(1,)](out, denom, loss, out.numel(), float(bsz * p), num_warps=NUM_WARPS, **cfg)
    return loss, grad


def soft_ce_backward(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
                     grad_loss: torch.Tensor, tau: float, scale: float) -> torch.Tensor:
    """Triton implementation of ``dtkernels::soft_ce_backward`` (contract:
    :func:`dtkernels.reference.soft_ce_backward_op`): ``grad_loss[b, p] * m[b, p] * scale * (ps - pt) / tau``.

    Args:
        student, teacher, mask: as for :func:`soft_ce`.
        grad_loss: ``[B, P]`` upstream gradient of the per-position loss (any strides, e.g. an expanded scalar).

    Returns:
        ``[B, K, P]`` like ``torch.empty_like(student)``.
    """
    teacher = _teacher_for(student, teacher.detach())
    bsz, k, p = student.shape
    cdt = compute_dtype(student.dtype)
    _, block_k, block_p = tile_for(student)
    grid = (triton.cdiv(p, block_p), bsz)
    gl = grad_loss.detach().expand(bsz, p)
    if gl.dtype != cdt:
        gl = gl.to(cdt)
    m = _mask_in(mask, cdt)
    has_mask = m is not None
    m_arg, m_strides = (m, m.stride()) if has_mask else (gl, (0, 1))
    grad = torch.empty_like(student)
    tau = float(tau)
    cfg = shipped_config("_soft_ce_bwd_kernel", student.dtype, teacher.dtype, HAS_MASK=has_mask, BLOCK_K=block_k,
                         BLOCK_P=block_p)
    _soft_ce_bwd_kernel[grid](student, *student.stride(), teacher, *teacher.stride(), m_arg, *m_strides, gl,
                              *gl.stride(), grad, *grad.stride(), k, p, _LOG2E / tau, float(scale) / tau,
                              num_warps=NUM_WARPS, **cfg)
    return grad


# --------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile support
# --------------------------------------------------------------------------------------------------------------
def aot_source_args(cfg: dict) -> tuple:
    """``(fn, signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` of one shipped configuration.

    The unit strides of its layout are specialized to 1 the way the JIT does, pointers have the dtypes the
    launchers pass and, like the JIT's hints for aligned shapes, 16-byte divisibility; the other strides and P are
    i32 multiples of 16 (e.g. H*W = 64*64), the case where the loads can vectorize. Other integers are plain i32.
    """
    fn = globals()[cfg["kernel"]]
    s_dt, t_dt = cfg["dtype"], cfg.get("out_dtype")
    cdt = "fp64" if s_dt == "fp64" else "fp32"
    ptr_types = {"S_ptr": s_dt, "T_ptr": t_dt, "G_ptr": s_dt, "M_ptr": cdt, "OUT_ptr": cdt, "DENOM_ptr": cdt,
                 "GL_ptr": cdt, "PART_ptr": cdt, "LOSS_ptr": cdt}
    if cfg["kernel"] == "_soft_ce_finalize_kernel":
        ptr_types = {name: s_dt for name in ptr_types}  # its dtype is the compute dtype
    ones = {"stride_mp", "stride_lp"}
    if cfg["layout"] == "nchw":
        ones |= {"stride_sp", "stride_tp", "stride_gp"}
    elif cfg["layout"] == "channels_last":
        ones |= {"stride_sk", "stride_tk", "stride_gk"}
    constexprs = dict(cfg["constexprs"])
    signature = {}
    # str(tl.float64) is "fp64"; under ``from __future__ import annotations`` the annotation is a string.
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    fp64 = {name for name, param in params.items() if str(param.annotation) in ("fp64", "tl.float64")}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + ptr_types[name]
        elif name in ones:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in fp64:
            signature[name] = "fp64"
        else:
            signature[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and (name.endswith("_ptr") or name.startswith("stride_") or name == "P")}
    return fn, signature, constexprs, attrs
