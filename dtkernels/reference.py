"""Eager PyTorch reference of every dtkernels op.

This module is the specification: the C++ and Triton kernels must compute the same function, the tests compare
them with it in float64, and it is the fallback for devices without a kernel. It is written the way a user would
write the loss, with autograd providing the gradient; nothing here is tuned for speed.

Feature-distillation loss (DreamTeacher, arXiv 2307.07487, Sec. 3.2), for one level with student ``s`` and teacher
``t`` of shape ``[B, C, H, W]``:

* whitening ``W(t)``: LayerNorm without affine parameters (biased variance, ``eps`` inside the square root) over the
  channels at each ``(b, h, w)`` (``"channel"``), over ``(C, H, W)`` of each sample (``"sample"``), or identity
  (``None``);
* ``mse = mean((s - W(t))**2)`` over all ``B*C*H*W`` elements;
* attention map ``a(x)[b, j] = sum_c |x[b, c, j]|**p`` with ``j`` the flattened ``H*W`` position, and
  ``q(x) = a / max(||a||_2, AT_NORM_EPS)`` per sample (``torch.nn.functional.normalize`` semantics, so an all-zero
  map gives ``q = 0`` instead of NaN). The teacher's map uses the raw, unwhitened teacher;
* ``at_mode="paper"``: ``at = (1/B) sum_b ||q(s_b) - q(t_b)||_2``; ``at_mode="mean_sq"``:
  ``at = mean_{b,j} (q(s) - q(t))**2``;
* over levels: ``loss = sum_l w_l (mse_weight*mse_l + at_weight*at_l) / sum_l w_l``.

Gradient (what the kernels write; derived here once so every backend uses the same formulas). With ``c_l`` the
level's weight ``w_l / sum w``, ``N = B*C*H*W``, ``n_b = ||a(s_b)||``, ``d = q(s) - q(t)``:

* MSE part: ``c_l * mse_weight * 2 * (s - W(t)) / N``;
* AT part: ``g_a[b, j] * p * |s|**(p-1) * sign(s)``, where ``g_q = c_l * at_weight * d / (B * ||d_b||)`` (paper;
  zero where ``||d_b|| == 0``) or ``c_l * at_weight * 2 * d / (B*H*W)`` (mean_sq), and
  ``g_a = (g_q - q(s) * <g_q, q(s)>_b) / n_b`` when ``n_b > AT_NORM_EPS``, else ``g_q / AT_NORM_EPS``.
  For ``p == 1`` the factor is ``sign(s)`` (zero at zero); for ``p > 1`` it is zero at ``s == 0``.
  ``d`` is the plain difference of the two quotients ``a / max(||a||, eps)``, each rounded on its own (never a
  difference of products, which compilers contract into an FMA), so where both maps round to the same ``q``
  (identical samples, a student that is the teacher times a power of two with ``p`` 1 or 2, any two nonzero 1x1
  maps) ``d`` is exactly 0 on every backend and the zero subgradient applies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .modes import Activation, AtMode, Reduction, Whitening

__all__ = [
    "AT_NORM_EPS",
    "WHITEN_MODES",
    "AT_MODES",
    "compute_dtype",
    "whiten",
    "attention_map",
    "ln_mse_loss",
    "at_loss",
    "fused_feat_loss",
    "feat_loss_level_grad",
    "feat_loss_op",
    "scale_grads_op",
    "SOFT_CE_REDUCTIONS",
    "soft_ce",
    "soft_ce_op",
    "soft_ce_backward_op",
    "philox4x32",
    "philox_normal",
    "q_sample",
    "q_sample_op",
    "group_norm_act",
    "group_norm_act_op",
]

#: Lower bound on the L2 norm of an attention map, as in ``torch.nn.functional.normalize``.
AT_NORM_EPS = 1e-12
WHITEN_MODES = (Whitening.CHANNEL.arg, Whitening.SAMPLE.arg, Whitening.NONE.arg)
AT_MODES = AtMode.args()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def whiten(t: torch.Tensor, mode: str | None = "channel", eps: float = 1e-5) -> torch.Tensor:
    """Non-affine LayerNorm of teacher features ``[B, C, H, W]``.

    Args:
        t: teacher features ``[B, C, H, W]``.
        mode: ``"channel"`` (over C at each position), ``"sample"`` (over C, H, W per sample) or ``None``.
        eps: added to the biased variance inside the square root.

    Returns:
        ``[B, C, H, W]`` in the compute dtype (float32, or float64 for float64 input).
    """
    t = t.to(compute_dtype(t))
    if mode is None:
        return t
    if mode == "channel":
        return F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), eps=eps).permute(0, 3, 1, 2)
    if mode == "sample":
        return F.layer_norm(t, tuple(t.shape[1:]), eps=eps)
    raise ValueError(f"whiten: expected one of {WHITEN_MODES}, got {mode!r}")


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Normalized spatial attention map ``sum_c |x_c|**p`` with unit L2 norm per sample.

    Args:
        x: features ``[B, C, H, W]``.
        p: exponent, ``p >= 1``.

    Returns:
        ``[B, H, W]`` in the compute dtype.
    """
    x = x.to(compute_dtype(x))
    a = x.abs().pow(p).sum(dim=1)  # [B, H, W]
    return F.normalize(a.flatten(1), p=2.0, dim=1, eps=AT_NORM_EPS).view_as(a)


def ln_mse_loss(student: torch.Tensor, teacher: torch.Tensor, whiten_mode: str | None = "channel",
                eps: float = 1e-5) -> torch.Tensor:
    """``mean((student - W(teacher))**2)`` for one level; no gradient flows to the teacher."""
    target = whiten(teacher.detach(), whiten_mode, eps)
    return (student.to(target.dtype) - target).pow(2).mean()


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0, mode: str = "paper") -> torch.Tensor:
    """Attention-transfer loss for one level; no gradient flows to the teacher."""
    qs = attention_map(student, p).flatten(1)
    qt = attention_map(teacher.detach(), p).flatten(1)
    diff = qs - qt
    if mode == "paper":
        return torch.linalg.vector_norm(diff, ord=2, dim=1).mean()
    if mode == "mean_sq":
        return diff.pow(2).mean()
    raise ValueError(f"at_mode: expected one of {AT_MODES}, got {mode!r}")


def fused_feat_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], *, mse_weight: float = 1.0,
                    at_weight: float = 10.0, at_p: float = 2.0, at_mode: str = "paper",
                    whiten: str | None = "channel", eps: float = 1e-5,
                    level_weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-level DreamTeacher feature loss (the formulation a user writes by hand).

    Returns:
        ``(loss, mse, at)``: the scalar loss (differentiable w.r.t. the student) and the per-level ``[L]`` parts,
        detached. All in the compute dtype of the first student level.
    """
    whiten_mode = whiten
    n = len(student)
    weights = [1.0] * n if level_weights is None else [float(w) for w in level_weights]
    total = sum(weights)
    mse_parts, at_parts, loss = [], [], 0.0
    for s, t, w in zip(student, teacher, weights):
        mse_l = ln_mse_loss(s, t, whiten_mode, eps)
        at_l = at_loss(s, t, at_p, at_mode)
        loss = loss + (w / total) * (mse_weight * mse_l + at_weight * at_l)
        mse_parts.append(mse_l.detach())
        at_parts.append(at_l.detach())
    return loss, torch.stack(mse_parts), torch.stack(at_parts)


def feat_loss_level_grad(s: torch.Tensor, t: torch.Tensor, coef: float, mse_weight: float, at_weight: float,
                         at_p: float, at_mode: str, whiten_mode: str | None, eps: float) -> torch.Tensor:
    """Analytic ``d loss / d s`` of one level (the formulas in the module docstring), in the compute dtype.

    This is what the kernels implement; the tests check it against autograd of :func:`fused_feat_loss`.
    """
    dt = compute_dtype(s)
    s = s.to(dt)
    t = t.detach()
    b, hw = s.shape[0], s.shape[2] * s.shape[3]
    grad = (coef * mse_weight * 2.0 / s.numel()) * (s - whiten(t, whiten_mode, eps))
    a_s = s.abs().pow(at_p).sum(dim=1).flatten(1)  # [B, HW]
    a_t = t.to(dt).abs().pow(at_p).sum(dim=1).flatten(1)
    n_s = torch.linalg.vector_norm(a_s, dim=1, keepdim=True)
    n_t = torch.linalg.vector_norm(a_t, dim=1, keepdim=True)
    # q_s and q_t by the same expression, d their plain difference: identical maps (and maps that differ by a power
    # of two) give bitwise equal q, so d is exactly 0 and the where(dn > 0) below gives the zero subgradient.
    q_s = a_s / n_s.clamp_min(AT_NORM_EPS)
    q_t = a_t / n_t.clamp_min(AT_NORM_EPS)
    d = q_s - q_t
    if at_mode == "paper":
        dn = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        g_q = torch.where(dn > 0, d / dn.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(d)) / b
    else:
        g_q = 2.0 * d / (b * hw)
    g_q = g_q * (coef * at_weight)
    inner = (g_q * q_s).sum(dim=1, keepdim=True)
    g_a = torch.where(n_s > AT_NORM_EPS, (g_q - q_s * inner) / n_s.clamp_min(AT_NORM_EPS), g_q / AT_NORM_EPS)
    if at_p == 1.0:
        dphi = torch.sign(s)
    else:
        dphi = at_p * s.abs().pow(at_p - 1.0) * torch.sign(s)
    return grad + g_a.view(b, 1, s.shape[2], s.shape[3]) * dphi


def feat_loss_op(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], level_coef: Sequence[float],
                 mse_weight: float, at_weight: float, at_p: float, at_mode: int, whiten: int, eps: float,
                 compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Reference of the ``dtkernels::feat_loss`` op, with the kernels' calling convention.

    Args:
        level_coef: ``w_l / sum(w)`` per level (already normalized by the caller).
        at_mode: an :class:`~dtkernels.modes.AtMode` value.
        whiten: a :class:`~dtkernels.modes.Whitening` value.
        compute_grad: also return ``d loss / d student`` for ``grad_output == 1``.

    Returns:
        ``loss`` (0-dim), ``mse`` ``[L]``, ``at`` ``[L]`` (float32, or float64 when the first student level is
        float64), and the per-level student gradients, each with the dtype and layout of
        ``torch.empty_like(student[l])`` (an empty list when ``compute_grad`` is false).
    """
    whiten_mode = Whitening(whiten).arg
    mode = AtMode(at_mode).arg
    out_dtype = compute_dtype(student[0])
    loss = torch.zeros((), dtype=out_dtype, device=student[0].device)
    mse_parts, at_parts, grads = [], [], []
    with torch.no_grad():
        for s, t, c in zip(student, teacher, level_coef):
            mse_l = ln_mse_loss(s, t, whiten_mode, eps).to(out_dtype)
            at_l = at_loss(s, t, at_p, mode).to(out_dtype)
            loss = loss + c * (mse_weight * mse_l + at_weight * at_l)
            mse_parts.append(mse_l)
            at_parts.append(at_l)
            if compute_grad:
                g = torch.empty_like(s)
                g.copy_(feat_loss_level_grad(s, t, c, mse_weight, at_weight, at_p, mode, whiten_mode, eps))
                grads.append(g)
    return loss, torch.stack(mse_parts), torch.stack(at_parts), grads


def scale_grads_op(grads: Sequence[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Reference of ``dtkernels::scale_grads``, the backward of the ops whose forward writes the student gradient
    for ``grad_output == 1`` (``feat_loss``; ``soft_ce`` with mean/sum): each gradient times the 0-dim upstream
    gradient, in the gradient's dtype."""
    return [g * grad_out.to(g.dtype) for g in grads]


# --------------------------------------------------------------------------------------------------------------
# soft_ce: temperature-scaled soft cross-entropy (label distillation)
# --------------------------------------------------------------------------------------------------------------
#
# Per position p (every index except the class axis): with ``pt = softmax(t_p / tau)`` and
# ``log ps = log_softmax(s_p / tau)`` over the K classes,
#
#     l_p = scale * (-sum_k pt_k * log ps_k),        d l_p / d s_pk = scale * (ps_k - pt_k) / tau,
#
# where ``scale`` is ``tau**2`` with ``scale_by_tau_sq`` (Hinton's convention) and 1 otherwise (the DreamTeacher
# paper). A mask ``m_p`` (bool or float weights) multiplies ``l_p``; positions with ``m_p == 0`` are skipped
# entirely (not computed, so NaN logits there do not propagate: the caller said to ignore them). Reductions:
# ``"none"`` -> the map ``m_p * l_p``; ``"sum"`` -> ``sum_p m_p * l_p``; ``"mean"`` -> ``sum_p m_p * l_p / sum_p m_p``
# (``/ P`` without a mask), defined as 0 with a zero gradient when no position is valid (``sum_p m_p == 0``).
#
# Canonical layout used by the op: ``[B, K, P]`` with any strides (class axis 1, positions flattened), mask
# ``[B, P]`` float or None.

SOFT_CE_REDUCTIONS = Reduction.args()


def soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 4.0, dim: int = 1,
            scale_by_tau_sq: bool = False, reduction: str = "mean",
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft cross-entropy ``H(softmax(t/tau), softmax(s/tau))`` as a user writes it with ``log_softmax``.

    Args:
        student_logits: ``[B, K, H, W]`` or ``[N, K]`` (class axis ``dim``); receives the gradient.
        teacher_logits: same shape, any floating dtype; never receives a gradient.
        tau: temperature, ``> 0``.
        dim: the class axis.
        scale_by_tau_sq: multiply by ``tau**2``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the per-position map, shape of the input without ``dim``).
        mask: optional ``[B, H, W]`` / ``[N]`` bool or float weights of valid positions.

    Returns:
        The loss in the compute dtype (float32, or float64 for float64 student logits).
    """
    dt = compute_dtype(student_logits)
    s = student_logits.to(dt)
    t = teacher_logits.detach().to(dt)
    log_ps = torch.log_softmax(s / tau, dim=dim)
    pt = torch.softmax(t / tau, dim=dim)
    per_pos = -(pt * log_ps).sum(dim=dim)
    if scale_by_tau_sq:
        per_pos = per_pos * (tau * tau)
    if mask is not None:
        m = mask.to(dt)
        per_pos = torch.where(m != 0, per_pos * m, torch.zeros_like(per_pos))
    if reduction == "none":
        return per_pos
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "mean":
        if mask is None:
            return per_pos.mean()
        denom = mask.to(dt).sum()
        return torch.where(denom != 0, per_pos.sum() / torch.where(denom != 0, denom, 1.0), per_pos.sum() * 0)
    raise ValueError(f"reduction: expected one of {SOFT_CE_REDUCTIONS}, got {reduction!r}")


def soft_ce_op(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, tau: float, scale: float,
               reduction: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the ``dtkernels::soft_ce`` op on canonical ``[B, K, P]`` inputs.

    Args:
        student, teacher: ``[B, K, P]`` logits (any strides; dtypes may differ).
        mask: ``[B, P]`` float weights, or None.
        scale: 1 or ``tau**2``.
        reduction: a :class:`~dtkernels.modes.Reduction` value.
        compute_grad: for ``mean``/``sum``, also return ``d loss / d student`` for ``grad_output == 1``.

    Returns:
        ``loss`` (``[B, P]`` for none, 0-dim otherwise; float32, float64 for float64 students) and the gradient
        (dtype and layout of ``torch.empty_like(student)``), or an empty ``[0]`` tensor when not computed.
    """
    dt = compute_dtype(student)
    with torch.no_grad():
        reduction = Reduction(reduction)
        loss = soft_ce(student, teacher, tau, 1, False, reduction.arg, mask) * scale
        if not compute_grad or reduction == Reduction.NONE:
            return loss.to(dt), student.new_empty((0,))
        weights = torch.ones(student.shape[0], student.shape[2], dtype=dt, device=student.device)
        if mask is not None:
            weights = mask.to(dt)
        if reduction == Reduction.MEAN:
            denom = weights.sum()
            weights = weights / denom if float(denom) != 0 else torch.zeros_like(weights)
        grad = torch.empty_like(student)
        grad.copy_(soft_ce_backward_op(student, teacher, mask, weights, tau, scale, apply_mask=False))
    return loss.to(dt), grad


def soft_ce_backward_op(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
                        grad_loss: torch.Tensor, tau: float, scale: float, apply_mask: bool = True) -> torch.Tensor:
    """Reference of ``dtkernels::soft_ce_backward``: the student gradient for a per-position upstream gradient.

    ``grad[b, k, p] = grad_loss[b, p] * m[b, p] * scale * (ps_k - pt_k) / tau`` (zero where ``m == 0``).

    Returns:
        ``[B, K, P]`` with the dtype and layout of ``torch.empty_like(student)``.
    """
    dt = compute_dtype(student)
    with torch.no_grad():
        ps = torch.softmax(student.to(dt) / tau, dim=1)
        pt = torch.softmax(teacher.to(dt) / tau, dim=1)
        w = grad_loss.to(dt)
        if apply_mask and mask is not None:
            w = w * mask.to(dt)
        g = (ps - pt) * (w * (scale / tau)).unsqueeze(1)
        if mask is not None:
            g = torch.where((mask != 0).unsqueeze(1), g, torch.zeros_like(g))
        out = torch.empty_like(student)
        out.copy_(g)
    return out


# --------------------------------------------------------------------------------------------------------------
# q_sample: one-step forward diffusion ("stochastic encoding")
# --------------------------------------------------------------------------------------------------------------
#
# x_t = sqrt(abar[t_b]) * x0 + sqrt(1 - abar[t_b]) * eps, one timestep per sample b, abar = alphas_cumprod [T].
#
# When no noise is given, eps is a counter-based stream that every backend reproduces (integers exactly, floats
# within libm rounding): element i of x0 in logical row-major order uses Philox4x32-10 with key
# (seed & 0xffffffff, seed >> 32) and counter (g & 0xffffffff, g >> 32, 0, 0), g = i // 4, output word i % 4. Words
# become uniforms as Triton's ``uint_to_uniform_float`` does (reinterpret as int32, x < 0 -> -x - 1, times 2**-31)
# and pairs (words 0, 1) and (2, 3) become normals by Box-Muller as Triton's ``pair_uniform_to_normal`` does
# (u1 clamped to >= 1e-7; r = sqrt(-2 ln u1); (r cos 2 pi u2, r sin 2 pi u2)). This is exactly ``tl.randn4x`` on
# the GPU, so a seed gives the same noise on the CPU and on CUDA.

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _umul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for uint32 values held in int64 tensors (no int64 overflow)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    lo_part = a * b_lo  # < 2**48
    hi_part = a * b_hi  # < 2**48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _U32
    return hi & _U32, lo


def philox4x32(counter: torch.Tensor, seed: int, rounds: int = 10) -> torch.Tensor:
    """Philox4x32 (Salmon et al., 2011) on int64 tensors holding uint32 words.

    Args:
        counter: ``[N, 4]`` int64 with values in ``[0, 2**32)``.
        seed: 64-bit key.

    Returns:
        ``[N, 4]`` int64 random words in ``[0, 2**32)``.
    """
    c0, c1, c2, c3 = (counter[:, i].clone() for i in range(4))
    seed = int(seed) % 2**64  # signed 64-bit seeds are the same key as their unsigned reinterpretation
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(rounds):
        hi0, lo0 = _umul32(c0, _PHILOX_M0)
        hi1, lo1 = _umul32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
    return torch.stack([c0, c1, c2, c3], dim=1)


def philox_normal(numel: int, seed: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise stream of :func:`q_sample`: ``numel`` standard normals for ``seed`` (the spec of every backend)."""
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    counter = torch.stack([g & _U32, g >> 32, torch.zeros_like(g), torch.zeros_like(g)], dim=1)
    words = philox4x32(counter, int(seed))
    signed = torch.where(words >= 2**31, words - 2**32, words)
    signed = torch.where(signed < 0, -signed - 1, signed)
    u = signed.to(torch.float64) * 4.6566127342e-10
    u = u.to(torch.float32).to(torch.float64)  # Triton rounds the uniforms to float32
    u1 = torch.clamp(u[:, 0::2], min=1e-7)
    u2 = u[:, 1::2]
    r = torch.sqrt(-2.0 * torch.log(u1))
    th = 6.283185307179586 * u2
    normals = torch.stack([r * torch.cos(th), r * torch.sin(th)], dim=2)  # [G, 2 pairs, 2]
    return normals.reshape(-1)[:numel].to(dtype)


def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None,
             seed: int = 0, return_noise: bool = False):
    """``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` per sample (diffusers' ``add_noise`` when ``noise`` is given).

    Args:
        x0: ``[B, ...]`` clean samples.
        t: ``[B]`` integer timesteps in ``[0, T)``.
        alphas_cumprod: ``[T]`` cumulative products of the noise schedule's alphas, in ``(0, 1]``.
        noise: optional ``eps`` of ``x0``'s shape; drawn from the Philox stream for ``seed`` when None.
        seed: key of the noise stream.
        return_noise: also return ``eps``.

    Returns:
        ``x_t`` in ``x0``'s dtype (math in float32, float64 for float64), and ``eps`` when ``return_noise``.
    """
    dt = compute_dtype(x0)
    if noise is None:
        noise = philox_normal(x0.numel(), seed, dt, x0.device).view(x0.shape)
    abar = alphas_cumprod.to(device=x0.device, dtype=dt)[t.to(x0.device).long()]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    out = (abar.sqrt().view(shape) * x0.to(dt) + (1.0 - abar).sqrt().view(shape) * noise.to(dt)).to(x0.dtype)
    return (out, noise.to(x0.dtype)) if return_noise else out


def q_sample_op(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None,
                seed: int, return_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``dtkernels::q_sample``: ``(x_t, eps)``; ``eps`` is an empty ``[0]`` tensor unless
    ``return_noise`` (when ``noise`` is given it is not returned again). ``x_t`` has the layout of
    ``torch.empty_like(x0)``."""
    with torch.no_grad():
        out, eps = q_sample(x0, t, alphas_cumprod, noise, seed, return_noise=True)
        x_t = torch.empty_like(x0)
        x_t.copy_(out)
        if not return_noise or noise is not None:
            return x_t, x0.new_empty((0,))
        e = torch.empty_like(x0)
        e.copy_(eps.view(x0.shape))
        return x_t, e


# --------------------------------------------------------------------------------------------------------------
# group_norm_act: the teacher's GroupNorm + scale/shift + SiLU (inference only)
# --------------------------------------------------------------------------------------------------------------
#
# out = act(GN(x) * (1 + scale[b, c]) + shift[b, c]), GN(x) = (x - mean_bg) / sqrt(var_bg + eps) * weight_c + bias_c,
# with mean and biased variance over the channels of group g = c // (C / G) and every spatial position of sample b.
# This is ADM's ResBlock out_layers with use_scale_shift_norm (diffusers: ResnetBlock2D, time_embedding_norm=
# "scale_shift") and, without scale / shift, every GroupNorm + SiLU pair of the UNet. Statistics in float32 (float64
# for float64 input), the output rounded once to x's dtype.


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, *, eps: float = 1e-5, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None, act: str | None = "silu") -> torch.Tensor:
    """``act(group_norm(x) * (1 + scale) + shift)``, written with ``F.group_norm`` and ``F.silu``.

    Args:
        x: ``[B, C, *spatial]``.
        num_groups: ``G``, dividing ``C``.
        weight, bias: optional ``[C]`` affine parameters of the GroupNorm.
        eps: added to the biased variance inside the square root.
        scale, shift: optional ``[B, C]`` (broadcast over the spatial positions).
        act: ``"silu"`` or None.

    Returns:
        ``[B, C, *spatial]`` in x's dtype (math in float32, float64 for float64 input).
    """
    dt = compute_dtype(x)
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    y = F.group_norm(x.to(dt), num_groups, w, b, eps)
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale is not None:
        y = y * (1.0 + scale.to(dt).reshape(view))
    if shift is not None:
        y = y + shift.to(dt).reshape(view)
    mode = Activation.from_arg(act)
    if mode is Activation.SILU:
        y = F.silu(y)
    return y.to(x.dtype)


def group_norm_act_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float, act: int) -> torch.Tensor:
    """Reference of ``dtkernels::group_norm_act`` (``act`` an :class:`~dtkernels.modes.Activation` value): the
    output has the layout of ``torch.empty_like(x)``."""
    with torch.no_grad():
        y = group_norm_act(x, num_groups, weight, bias, eps=eps, scale=scale, shift=shift, act=Activation(act).arg)
        out = torch.empty_like(x)
        out.copy_(y)
        return out
