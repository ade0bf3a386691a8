"""Triton kernel and host launcher of ``dtkernels::q_sample`` (one-step forward diffusion).

The contract is :func:`dtkernels.reference.q_sample_op`: ``x_t = sqrt(abar[t_b]) x0 + sqrt(1 - abar[t_b]) eps`` per
sample ``b``, ``x_t`` with the layout of ``torch.empty_like(x0)`` and ``x0``'s dtype; ``eps`` (same layout) is
returned only when ``return_noise`` and no noise was given, else an empty ``[0]`` tensor.

Noise: element ``i`` of ``x0`` in logical row-major order is ``tl.randn4x(seed, g)[i % 4]`` with ``g = i // 4``.
Since Triton 3.x ``randint4x`` splits a 64-bit offset into the counter ``(g & 0xffffffff, g >> 32, 0, 0)``, which is
the spec's counter, so the kernel passes the int64 group index and there is no 2**31-group limit. The seed is the
op's signed 64-bit int; ``philox`` reinterprets it as uint64 (key ``(seed & 0xffffffff, seed >> 32)``), as the spec.
float32 / float16 / bfloat16 use ``tl.randn4x`` itself (float32 Box-Muller with the GPU's log/sin/cos); float64
``x0`` takes the words from ``tl.randint4x`` and does the uniform conversion and Box-Muller in float64, as
:func:`dtkernels.reference.philox_normal` does. Compiled for a GPU, ``uint_to_uniform_float`` rounds the word to
float32 before scaling and its float32 transcendentals are not correctly rounded, so float32 noise there agrees with
the float64 reference within a few 1e-6 (not bit for bit); in the interpreter it matches within ~1e-6.

One program handles ``BLOCK`` Philox groups (``4 * BLOCK`` consecutive logical elements): the four ``randn4x``
outputs are interleaved back into element order with ``tl.interleave`` so loads and stores of a contiguous ``x0``
are unit-stride (vectorized). Layouts:

* ``CONTIG`` (``x0`` row-major contiguous; any rank): element offset = logical index;
* strided ``[B, C, HW]`` views (channels_last ``[B, C, H, W]`` with strides ``(HWC, 1, C)``, or any ``[B, C, H, W]``
  whose H and W flatten): offset ``b sb + c sc + s shw`` from the logical index; no copy;
* anything else is computed on a contiguous copy and copied into ``torch.empty_like(x0)``.

With ``noise`` given the same kernel runs with ``HAS_NOISE`` (no RNG): one fused pass reading ``x0`` and ``noise``
(noise with other strides than ``x0`` is copied to ``x0``'s layout first; any floating noise dtype is converted in
registers to the compute dtype, as the reference converts it).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .utils import INPUT_DTYPES, NUM_WARPS, ConfigIndex, compute_dtype

__all__ = ["q_sample", "SHIPPED_CONFIGS", "shipped_config", "aot_source_args", "BLOCK_GROUPS"]

#: Philox groups per program: 4 * BLOCK_GROUPS = 1024 elements, 8 per thread with 4 warps.
BLOCK_GROUPS = 256


# --------------------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _q_sample_kernel(
    X_ptr,  # [B, C, HW] x0 (strided view; with CONTIG the logical index is the offset)
    N_ptr,  # [B, C, HW] given noise (HAS_NOISE), same strides as X_ptr; any floating dtype
    OUT_ptr,  # [B, C, HW] x_t, same strides as X_ptr (torch.empty_like of a dense x0)
    EPS_ptr,  # [B, C, HW] the generated noise (STORE_EPS), same strides as X_ptr
    A_ptr,  # [B] sqrt(abar[t_b]) in the compute dtype
    S_ptr,  # [B] sqrt(1 - abar[t_b]) in the compute dtype
    seed: tl.int64,
    numel,  # B * C * HW
    per_sample,  # C * HW
    HW,
    stride_b, stride_c, stride_hw,
    HAS_NOISE: tl.constexpr, STORE_EPS: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cdt: tl.constexpr = A_ptr.dtype.element_ty
    idx = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)  # logical row-major indices, int64
    mask = idx < numel
    b = idx // per_sample
    if CONTIG:
        off = idx
    else:
        rem = idx - b * per_sample
        c = rem // HW
        s = rem - c * HW
        off = b * stride_b + c * stride_c + s * stride_hw
    x = tl.load(X_ptr + off, mask=mask, other=0.0).to(cdt)
    a = tl.load(A_ptr + b, mask=mask, other=0.0)
    sg = tl.load(S_ptr + b, mask=mask, other=0.0)
    if HAS_NOISE:
        eps = tl.load(N_ptr + off, mask=mask, other=0.0).to(cdt)
    else:
        g = pid * BLOCK + tl.arange(0, BLOCK)  # int64 group index: counter (g & 0xffffffff, g >> 32, 0, 0)
        if cdt == tl.float64:
            w0, w1, w2, w3 = tl.randint4x(seed, g)
            n0, n1 = _box_muller_fp64(w0, w1)
            n2, n3 = _box_muller_fp64(w2, w3)
        else:
            n0, n1, n2, n3 = tl.randn4x(seed, g)
        # Element 4g + j is n_j[g]: interleave (n0, n2) and (n1, n3), then the two.
        eps = tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
        if STORE_EPS:
            tl.store(EPS_ptr + off, eps.to(EPS_ptr.dtype.element_ty), mask=mask)
    # Two rounded products and a sum, as the eager reference computes it.
    out = a * x + sg * eps
    tl.store(OUT_ptr + off, out.to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _uniform_fp64(w):
    """A Philox word as the reference's uniform: int32 x, x < 0 -> ~x, times 4.6566127342e-10 in float64, rounded
    to float32 (then widened back)."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return (x.to(tl.float64) * 4.6566127342e-10).to(tl.float32).to(tl.float64)


@triton.jit
def _box_muller_fp64(w1, w2):
    u1 = tl.maximum(_uniform_fp64(w1), 1e-7)
    u2 = _uniform_fp64(w2)
    r = tl.sqrt(-2.0 * tl.log(u1))
    th = 6.283185307179586 * u2
    return r * tl.cos(th), r * tl.sin(th)


# --------------------------------------------------------------------------------------------------------------
# Shipped configurations
# --------------------------------------------------------------------------------------------------------------
#: Variants (HAS_NOISE, STORE_EPS): generate, generate and return the noise, fuse a given noise.
VARIANTS = ((False, False), (False, True), (True, False))
LAYOUTS = ("contiguous", "strided")


def _build_shipped_configs() -> list[dict]:
    """Every (kernel, dtypes, layout, constexprs) the launcher can choose, in the format of
    :data:`dtkernels.triton.utils.SHIPPED_CONFIGS`. ``dtype`` is x0's (and x_t's) element type; ``out_dtype`` the
    given noise's dtype (``x0``'s or the compute dtype: the launcher converts any other), None without noise."""
    out = []
    for dt, layout, (has_noise, store_eps) in itertools.product(INPUT_DTYPES, LAYOUTS, VARIANTS):
        cdt = "fp64" if dt == "fp64" else "fp32"
        noise_dtypes = sorted({dt, cdt}) if has_noise else [None]
        for nd in noise_dtypes:
            out.append({"kernel": "_q_sample_kernel", "dtype": dt, "out_dtype": nd, "layout": layout,
                        "constexprs": {"HAS_NOISE": has_noise, "STORE_EPS": store_eps,
                                       "CONTIG": layout == "contiguous", "BLOCK": BLOCK_GROUPS}})
    return out


#: The kernel configurations the launcher can choose (the ahead-of-time compile check covers exactly these).
SHIPPED_CONFIGS: list[dict] = _build_shipped_configs()

shipped_config = ConfigIndex(SHIPPED_CONFIGS, "dtkernels.triton.q_sample")


def aot_source_args(cfg: dict) -> tuple:
    """``(fn, signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` of one shipped configuration.

    Pointers have the dtypes the launcher passes and 16-byte divisibility; the integers are i32 multiples of 16
    (``numel``, ``per_sample``, ``HW`` and the strides of an aligned image batch), except ``stride_c``, which is 1
    for the channels_last strided view (the JIT's specialization of a unit stride), and ``seed`` (int64). In the
    contiguous layout the strides are unused (the launcher passes zeros, i32).
    """
    fn = _q_sample_kernel
    dt = cfg["dtype"]
    cdt = "fp64" if dt == "fp64" else "fp32"
    nd = cfg.get("out_dtype") or dt
    ptr_types = {"X_ptr": dt, "N_ptr": nd, "OUT_ptr": dt, "EPS_ptr": dt, "A_ptr": cdt, "S_ptr": cdt}
    constexprs = dict(cfg["constexprs"])
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + ptr_types[name]
        elif name == "seed":
            signature[name] = "i64"
        elif name == "stride_c" and cfg["layout"] == "strided":
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] not in ("constexpr", "i64")}
    return fn, signature, constexprs, attrs


# --------------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------------
def _bch_view(x: torch.Tensor) -> tuple[bool, tuple[int, int, int] | None]:
    """``(contiguous, (stride_b, stride_c, stride_hw))`` of ``x`` viewed as ``[B, C, HW]`` without a copy: contiguous
    for a row-major ``x`` of any rank; strides for a 4-D ``x`` whose H and W flatten (channels_last among them);
    ``(False, None)`` otherwise."""
    if x.is_contiguous():
        return True, None
    if x.dim() == 4:
        _, _, h, w = x.shape
        sb, sc, sh, sw = x.stride()
        if h == 1:
            return False, (sb, sc, sw)
        if w == 1 or sh == w * sw:
            return False, (sb, sc, sh if w == 1 else sw)
    return False, None


def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None,
             seed: int, return_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton implementation of ``dtkernels::q_sample`` (contract: :func:`dtkernels.reference.q_sample_op`).

    Args:
        x0: ``[B, ...]`` float32/float16/bfloat16/float64 (row-major, channels_last or any 4-D view whose H and W
            flatten run without a copy).
        t: ``[B]`` integer timesteps in ``[0, T)`` (not checked here: :func:`dtkernels.q_sample` checks them).
        alphas_cumprod: ``[T]`` floating.
        noise: optional ``eps`` of ``x0``'s shape, any floating dtype.
        seed: signed 64-bit key of the noise stream (reinterpreted as unsigned).
        return_noise: also return the generated ``eps`` (only when ``noise`` is None).

    Returns:
        ``(x_t, eps)``: ``x_t`` like ``torch.empty_like(x0)``; ``eps`` likewise, or an empty ``[0]`` tensor.
    """
    cdt = compute_dtype(x0.dtype)
    abar = alphas_cumprod.to(device=x0.device, dtype=cdt)[t.to(x0.device).long()]
    a = abar.sqrt().contiguous()
    s = (1.0 - abar).sqrt().contiguous()
    has_noise = noise is not None
    want_eps = bool(return_noise) and not has_noise
    x_t = torch.empty_like(x0)
    eps = torch.empty_like(x0) if want_eps else x0.new_empty((0,))
    numel = x0.numel()
    if numel == 0:
        return x_t, eps

    contig, strides = _bch_view(x0)
    dense_same = x_t.stride() == x0.stride() and (not want_eps or eps.stride() == x0.stride())
    if not (contig or strides is not None) or not dense_same:
        # Any other layout: compute on a contiguous copy, then copy into empty_like(x0).
        out_c, eps_c = q_sample(x0.contiguous(), t, alphas_cumprod,
                                None if noise is None else noise.contiguous(), seed, return_noise)
        x_t.copy_(out_c)
        if want_eps:
            eps.copy_(eps_c)
        return x_t, eps

    if has_noise:
        if noise.dtype not in (x0.dtype, cdt):
            noise = noise.to(cdt)
        if noise.stride() != x0.stride():
            noise = torch.empty_like(x0, dtype=noise.dtype).copy_(noise)
    bsz = x0.shape[0]
    per_sample = numel // bsz
    if contig:
        hw, (sb, sc, shw) = 1, (0, 0, 0)
    else:
        hw = x0.shape[2] * x0.shape[3]
        sb, sc, shw = strides
    cfg = shipped_config("_q_sample_kernel", x0.dtype, noise.dtype if has_noise else None, HAS_NOISE=has_noise,
                         STORE_EPS=want_eps, CONTIG=contig, BLOCK=BLOCK_GROUPS)
    grid = (triton.cdiv(numel, 4 * cfg["BLOCK"]),)
    _q_sample_kernel[grid](x0, noise if has_noise else x0, x_t, eps if want_eps else x_t, a, s, int(seed), numel,
                           per_sample, hw, sb, sc, shw, num_warps=NUM_WARPS, **cfg)
    return x_t, eps
