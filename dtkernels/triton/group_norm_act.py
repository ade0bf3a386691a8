"""Triton kernels and host launcher of ``dtkernels::group_norm_act`` (inference only).

The contract is :func:`dtkernels.reference.group_norm_act_op`: ``act(GN(x) * (1 + scale) + shift)`` with x viewed as
``[B, C, S]`` (the spatial dimensions flattened), the output like ``torch.empty_like(x)`` in x's dtype, statistics in
float32 (float64 for float64 x).

Two launches over the grid ``(B * G, n_split)``: the group's ``S`` positions are cut into ``n_split`` spans (enough
programs to fill the GPU when ``B * G`` is small, at most :data:`MAX_SPLIT`):

* ``_gn_stats_kernel``: each program reduces its span of one group, tile by tile (``[BLOCK_C, BLOCK_S]`` tiles over
  the group's channels and its positions): each tile's mean and centred sum of squares are computed from the
  registers (two passes over the tile, no ``E[x^2] - E[x]^2``), merged into the program's running moments with
  Chan et al.'s update; it writes ``(mean, M2)`` of its span;
* ``_gn_apply_kernel``: each program merges the ``n_split`` partial moments of its group (the exact parallel
  formula, in a fixed order: deterministic), builds the per-channel coefficients ``a = rstd w (1 + scale)``,
  ``d = bias (1 + scale) + shift`` and writes ``act((x - mean) a + d)`` over the same span.

Strides, not copies: NCHW (unit spatial stride) and channels_last (unit channel stride) run as they are, each with
its own tile shape (:data:`TILES`); the JIT specializes the unit stride. A view whose spatial dimensions do not
flatten (e.g. ``x[..., 1:-1, 1:-1]``) runs on a contiguous copy. Loads are upcast to the compute dtype; ``act`` is a
``tl.constexpr`` compared with constants built from :class:`dtkernels.modes.Activation`.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ..modes import Activation
from .utils import COMPUTE_DTYPE, INPUT_DTYPES, NUM_WARPS, ConfigIndex, compute_dtype

__all__ = ["group_norm_act", "SHIPPED_CONFIGS", "shipped_config", "aot_source_args", "AOT_ARGS", "TILES",
           "MAX_SPLIT"]

ACT_NONE = tl.constexpr(int(Activation.NONE))
ACT_SILU = tl.constexpr(int(Activation.SILU))

#: (BLOCK_C, BLOCK_S) per layout: NCHW tiles are long along the unit-stride positions, channels_last tiles along the
#: unit-stride channels (a group's channels are contiguous within a pixel).
TILES = {"nchw": (4, 256), "channels_last": (16, 64)}
#: Largest number of spans per group (the apply kernel merges the partials in one block of this size).
MAX_SPLIT = 64
#: Programs the launcher aims for (a few per SM of a large GPU).
TARGET_PROGRAMS = 1024


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _scalar(x, dtype: tl.constexpr):
    """A float argument in the compute dtype (adding it to a typed zero keeps a float64 value in the interpreter,
    where float arguments arrive as Python floats)."""
    return (tl.zeros([], dtype=dtype) + x).to(dtype)


@triton.jit
def _gn_stats_kernel(
    X_ptr,  # [B, C, S] (strided view)
    PART_ptr,  # [B * G, n_split, 2] (mean, M2) of each span, compute dtype
    S, G, cpg, span,  # positions, groups, channels per group, positions per span
    stride_b, stride_c, stride_s,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bg = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    n_split = tl.num_programs(1)
    cdt: tl.constexpr = PART_ptr.dtype.element_ty
    b = bg // G
    g = bg - b * G
    s_lo = sp * span
    s_hi = tl.minimum(s_lo + span, S)
    base = X_ptr + b * stride_b + (g * cpg) * stride_c
    n = tl.zeros([], dtype=cdt)
    mean = tl.zeros([], dtype=cdt)
    m2 = tl.zeros([], dtype=cdt)
    for c0 in range(0, cpg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < cpg
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cm[:, None] & (ss < s_hi)[None, :]
            x = tl.load(base + cs[:, None] * stride_c + ss[None, :] * stride_s, mask=mask, other=0.0).to(cdt)
            nb = tl.sum(mask.to(cdt))
            mb = tl.sum(x) / nb
            d = tl.where(mask, x - mb, 0.0)
            m2b = tl.sum(d * d)
            total = n + nb
            delta = mb - mean
            mean += delta * (nb / total)
            m2 += m2b + delta * delta * (n * nb / total)
            n = total
    out = PART_ptr + (bg * n_split + sp) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _gn_apply_kernel(
    X_ptr,  # [B, C, S] (strided view)
    OUT_ptr,  # [B, C, S] (strided view, the layout of empty_like(x))
    PART_ptr,  # [B * G, n_split, 2] (mean, M2) of each span, compute dtype
    W_ptr, BIAS_ptr,  # [C] compute dtype
    SCALE_ptr, SHIFT_ptr,  # [B, C] compute dtype, contiguous
    C, S, G, cpg, span, eps,
    stride_b, stride_c, stride_s,
    stride_ob, stride_oc, stride_os,
    ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, MAX_SPLIT: tl.constexpr,
):
    bg = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    n_split = tl.num_programs(1)
    cdt: tl.constexpr = PART_ptr.dtype.element_ty
    b = bg // G
    g = bg - b * G
    # The group's moments from its spans' partials: N = sum n_k, mean = sum n_k m_k / N,
    # M2 = sum M2_k + sum n_k (m_k - mean)^2.
    k = tl.arange(0, MAX_SPLIT).to(tl.int64)
    km = k < n_split
    pm = tl.load(PART_ptr + (bg * n_split + k) * 2, mask=km, other=0.0)
    pq = tl.load(PART_ptr + (bg * n_split + k) * 2 + 1, mask=km, other=0.0)
    cnt = tl.where(km, (tl.minimum((k + 1) * span, S) - k * span) * cpg, 0).to(cdt)
    n_total = tl.sum(cnt)
    mean = tl.sum(cnt * pm) / n_total
    dm = tl.where(km, pm - mean, 0.0)
    var = (tl.sum(pq) + tl.sum(cnt * dm * dm)) / n_total
    rstd = 1.0 / tl.sqrt(var + _scalar(eps, cdt))

    s_lo = sp * span
    s_hi = tl.minimum(s_lo + span, S)
    xbase = X_ptr + b * stride_b + (g * cpg) * stride_c
    obase = OUT_ptr + b * stride_ob + (g * cpg) * stride_oc
    for c0 in range(0, cpg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < cpg
        ch = g * cpg + cs
        w = tl.load(W_ptr + ch, mask=cm, other=0.0)
        bias = tl.load(BIAS_ptr + ch, mask=cm, other=0.0)
        s1 = 1.0 + tl.load(SCALE_ptr + b * C + ch, mask=cm, other=0.0)
        sh = tl.load(SHIFT_ptr + b * C + ch, mask=cm, other=0.0)
        a = (rstd * w * s1)[:, None]
        d = (bias * s1 + sh)[:, None]
        for s0 in range(s_lo, s_hi, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)
            mask = cm[:, None] & (ss < s_hi)[None, :]
            x = tl.load(xbase + cs[:, None] * stride_c + ss[None, :] * stride_s, mask=mask, other=0.0).to(cdt)
            y = (x - mean) * a + d
            if ACT == ACT_SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(obase + cs[:, None] * stride_oc + ss[None, :] * stride_os,
                     y.to(OUT_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Shipped configurations
# --------------------------------------------------------------------------------------------------------------
LAYOUTS = tuple(TILES)


def _tile(layout: str) -> dict:
    block_c, block_s = TILES[layout]
    return {"BLOCK_C": block_c, "BLOCK_S": block_s}


def _build_shipped_configs() -> list[dict]:
    """Every (kernel, dtype, layout, constexprs) the launcher can choose (format: :class:`ConfigIndex`)."""
    out = []
    for dt, layout in itertools.product(INPUT_DTYPES, LAYOUTS):
        out.append({"kernel": "_gn_stats_kernel", "dtype": dt, "layout": layout, "constexprs": _tile(layout)})
    for dt, layout, act in itertools.product(INPUT_DTYPES, LAYOUTS, [int(a) for a in Activation]):
        out.append({"kernel": "_gn_apply_kernel", "dtype": dt, "layout": layout,
                    "constexprs": {"ACT": act, **_tile(layout), "MAX_SPLIT": MAX_SPLIT}})
    return out


#: The kernel configurations the launcher can choose (the ahead-of-time compile check covers exactly these).
SHIPPED_CONFIGS: list[dict] = _build_shipped_configs()

shipped_config = ConfigIndex(SHIPPED_CONFIGS, "dtkernels.triton.group_norm_act")

#: Argument kinds for the ahead-of-time compile (:func:`dtkernels.triton.aot.signature_from_kinds`): ``ptr:in`` the
#: config's dtype, ``ptr:cdt`` its compute dtype; ``stride:<axis>`` a stride of the [B, C, S] view (the layout's
#: unit axis becomes the constant 1); ``i32d`` an int divisible by 16 (``cpg`` is 8 for ADM's 256 / 32 and ``G``
#: 32, both plain ``i32`` to cover other widths); ``fp64`` an annotated float.
AOT_ARGS = {
    "_gn_stats_kernel": [
        ("X_ptr", "ptr:in"), ("PART_ptr", "ptr:cdt"), ("S", "i32d"), ("G", "i32"), ("cpg", "i32"), ("span", "i32d"),
        ("stride_b", "stride:b"), ("stride_c", "stride:c"), ("stride_s", "stride:s")],
    "_gn_apply_kernel": [
        ("X_ptr", "ptr:in"), ("OUT_ptr", "ptr:in"), ("PART_ptr", "ptr:cdt"), ("W_ptr", "ptr:cdt"),
        ("BIAS_ptr", "ptr:cdt"), ("SCALE_ptr", "ptr:cdt"), ("SHIFT_ptr", "ptr:cdt"), ("C", "i32d"), ("S", "i32d"),
        ("G", "i32"), ("cpg", "i32"), ("span", "i32d"), ("eps", "fp64"),
        ("stride_b", "stride:b"), ("stride_c", "stride:c"), ("stride_s", "stride:s"),
        ("stride_ob", "stride:b"), ("stride_oc", "stride:c"), ("stride_os", "stride:s")],
}


def aot_source_args(cfg: dict) -> tuple:
    """``(fn, signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` of one shipped configuration:
    pointers 16-byte aligned, shapes and non-unit strides divisible by 16, the layout's unit stride the constant 1
    (what the JIT specializes for an aligned ``[B, C, H, W]`` activation)."""
    from .aot import signature_from_kinds

    fn = globals()[cfg["kernel"]]
    roles = {"in": cfg["dtype"], "cdt": COMPUTE_DTYPE[cfg["dtype"]]}
    unit_axis = {"nchw": "s", "channels_last": "c"}[cfg["layout"]]
    signature, constexprs, attrs = signature_from_kinds(fn, AOT_ARGS[cfg["kernel"]], roles, unit_axis,
                                                        cfg["constexprs"])
    return fn, signature, constexprs, attrs


# --------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------
def _bcs_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(stride_b, stride_c, stride_s)`` of ``t`` [B, C, *spatial] viewed as [B, C, S] without a copy, or None when
    the spatial dimensions do not flatten into one stride (size-1 dimensions are ignored)."""
    st, expect = None, None
    for d in range(t.dim() - 1, 1, -1):
        if t.shape[d] == 1:
            continue
        if st is None:
            st, expect = t.stride(d), t.stride(d) * t.shape[d]
        elif t.stride(d) != expect:
            return None
        else:
            expect *= t.shape[d]
    return t.stride(0), t.stride(1), 1 if st is None else st


def _param(t: torch.Tensor | None, shape: tuple[int, ...], fill: float, cdt: torch.dtype,
           like: torch.Tensor) -> torch.Tensor:
    """An optional parameter as a contiguous tensor in the compute dtype (absent: filled with ``fill``)."""
    if t is None:
        return torch.full(shape, fill, dtype=cdt, device=like.device)
    return t.to(device=like.device, dtype=cdt).contiguous()


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float, act: int) -> torch.Tensor:
    """Triton implementation of ``dtkernels::group_norm_act`` (contract: :func:`dtkernels.reference.group_norm_act_op`;
    arguments checked by :func:`dtkernels.group_norm_act`).

    Args:
        x: ``[B, C, *spatial]`` float32/float16/bfloat16/float64 (NCHW, channels_last and channel-sliced views run
            without a copy).
        num_groups: ``G`` dividing ``C``.
        weight, bias: optional ``[C]``; scale, shift: optional ``[B, C]``.
        eps: added to the biased variance.
        act: an :class:`~dtkernels.modes.Activation` value.

    Returns:
        ``[B, C, *spatial]`` like ``torch.empty_like(x)``.
    """
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    xs, os_ = _bcs_strides(x), _bcs_strides(out)
    if xs is None or os_ is None or not ((xs[2] == 1 and os_[2] == 1) or (xs[1] == 1 and os_[1] == 1)):
        # A view whose positions do not flatten, or x and out in different unit strides: a contiguous copy.
        out.copy_(group_norm_act(x.contiguous(), num_groups, weight, bias, scale, shift, eps, act))
        return out
    layout = "nchw" if xs[2] == 1 and os_[2] == 1 else "channels_last"
    bsz, channels = x.shape[0], x.shape[1]
    positions = x.numel() // (bsz * channels)
    cpg = channels // num_groups
    cdt = compute_dtype(x.dtype)
    w = _param(weight, (channels,), 1.0, cdt, x)
    b = _param(bias, (channels,), 0.0, cdt, x)
    s = _param(scale, (bsz, channels), 0.0, cdt, x)
    t = _param(shift, (bsz, channels), 0.0, cdt, x)

    stats_cfg = shipped_config("_gn_stats_kernel", x.dtype, **_tile(layout))
    apply_cfg = shipped_config("_gn_apply_kernel", x.dtype, ACT=int(act), **_tile(layout), MAX_SPLIT=MAX_SPLIT)
    block_s = stats_cfg["BLOCK_S"]
    groups_total = bsz * num_groups
    n_split = max(1, min(MAX_SPLIT, triton.cdiv(TARGET_PROGRAMS, groups_total), triton.cdiv(positions, block_s)))
    span = triton.cdiv(triton.cdiv(positions, n_split), block_s) * block_s  # spans start on whole tiles
    n_split = triton.cdiv(positions, span)
    partials = torch.empty((groups_total, n_split, 2), dtype=cdt, device=x.device)
    grid = (groups_total, n_split)
    _gn_stats_kernel[grid](x, partials, positions, num_groups, cpg, span, *xs, num_warps=NUM_WARPS, **stats_cfg)
    _gn_apply_kernel[grid](x, out, partials, w, b, s, t, channels, positions, num_groups, cpg, span, float(eps),
                           *xs, *os_, num_warps=NUM_WARPS, **apply_cfg)
    return out
