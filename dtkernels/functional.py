"""Public functions: argument checks with clear errors, then the ``dtkernels`` ops.

Every function here is safe to call inside ``torch.compile(fullgraph=True)``: the checks only read shapes, dtypes
and devices, and the work is one registered op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _dispatch, reference
from .modes import Activation, AtMode, Reduction, Whitening
from .ops import feat_loss as _feat_loss_op
from .ops import group_norm_act as _group_norm_act_op
from .ops import q_sample as _q_sample_op
from .ops import soft_ce as _soft_ce_op

__all__ = ["FeatLossParts", "fused_feat_loss", "ln_mse_loss", "at_loss", "attention_map", "soft_ce", "q_sample",
           "group_norm_act"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class FeatLossParts(NamedTuple):
    """Result of ``fused_feat_loss(..., return_parts=True)``.

    Attributes:
        loss: the weighted scalar loss (differentiable w.r.t. the student).
        mse: ``[L]`` per-level whitened MSE, detached.
        at: ``[L]`` per-level attention-transfer loss, detached.
    """

    loss: torch.Tensor
    mse: torch.Tensor
    at: torch.Tensor


def _as_levels(x: Sequence[torch.Tensor] | torch.Tensor, name: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of tensors [B, C, H, W], got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name}: expected at least one level, got an empty sequence")
    return list(x)


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [B, C, H, W], got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, float16, bfloat16 or float64), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(x.shape)}")
    return x


def _check_pair(s: object, t: object, s_name: str, t_name: str) -> None:
    _check_tensor(s, s_name)
    _check_tensor(t, t_name)
    if s.shape != t.shape:
        raise ValueError(f"{t_name}: expected the shape of {s_name} {tuple(s.shape)}, got {tuple(t.shape)}")
    if s.device != t.device:
        raise ValueError(f"{t_name}: expected the device of {s_name} ({s.device}), got {t.device}")
    if s.dtype != t.dtype:
        raise TypeError(f"{t_name}: expected the dtype of {s_name} ({s.dtype}), got {t.dtype}")


def _check_number(value: object, name: str, *, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name}: expected a number {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _whiten_code(whiten: str | None) -> Whitening:
    return Whitening.from_arg(whiten)


def _at_code(at_mode: str) -> AtMode:
    return AtMode.from_arg(at_mode)


def _level_coefficients(level_weights: Sequence[float] | torch.Tensor | None, n: int) -> list[float]:
    if level_weights is None:
        return [1.0 / n] * n
    if isinstance(level_weights, torch.Tensor):
        level_weights = level_weights.tolist()
    if not isinstance(level_weights, (list, tuple)):
        raise TypeError(f"level_weights: expected a sequence of {n} numbers, got {type(level_weights).__name__}")
    if len(level_weights) != n:
        raise ValueError(f"level_weights: expected {n} weights (one per level), got {len(level_weights)}")
    weights = [_check_number(w, f"level_weights[{i}]", minimum=0.0) for i, w in enumerate(level_weights)]
    total = sum(weights)
    if total <= 0.0:
        raise ValueError(f"level_weights: expected a positive sum, got {list(weights)}")
    return [w / total for w in weights]


def _needs_grad(student: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(s.requires_grad for s in student)


def fused_feat_loss(student: Sequence[torch.Tensor] | torch.Tensor, teacher: Sequence[torch.Tensor] | torch.Tensor,
                    *, mse_weight: float = 1.0, at_weight: float = 10.0, at_p: float = 2.0, at_mode: str = "paper",
                    whiten: str | None = "channel", eps: float = 1e-5,
                    level_weights: Sequence[float] | None = None,
                    return_parts: bool = False) -> torch.Tensor | FeatLossParts:
    """DreamTeacher feature-distillation loss over L feature levels, in one fused call.

    ``loss = sum_l w_l * (mse_weight * mse_l + at_weight * at_l) / sum_l w_l`` with, per level,
    ``mse_l = mean((s - W(t))**2)`` (``W`` a LayerNorm without affine parameters selected by ``whiten``) and
    ``at_l`` the attention-transfer loss between the unit-norm maps ``sum_c |x_c|**at_p`` of the student and of the
    raw teacher. See :mod:`dtkernels.reference` for the exact definition and its gradient.

    Args:
        student: L tensors ``[B_l, C_l, H_l, W_l]`` (float32, float16, bfloat16 or float64; NCHW or channels_last);
            the only inputs that receive a gradient. A single tensor counts as one level.
        teacher: L tensors of the same shapes, dtypes and device, pairwise. Never receives a gradient.
        mse_weight: weight of the whitened MSE term, ``>= 0``.
        at_weight: weight of the attention-transfer term, ``>= 0`` (the paper uses 10 with ``at_mode="paper"``).
        at_p: exponent of the attention map, ``>= 1``.
        at_mode: ``"paper"``: ``mean_b ||q(s_b) - q(t_b)||_2``; ``"mean_sq"``: ``mean_{b,hw} (q(s) - q(t))**2``.
        whiten: ``"channel"`` (LayerNorm over C at each position), ``"sample"`` (over C, H, W) or ``None``.
        eps: LayerNorm epsilon, ``> 0``.
        level_weights: L non-negative weights with a positive sum; default all 1.
        return_parts: also return the detached per-level ``mse`` and ``at`` values ``[L]`` (same pass).

    Returns:
        The 0-dim loss (float32; float64 for float64 inputs), or :class:`FeatLossParts` when ``return_parts``.
    """
    student = _as_levels(student, "student")
    teacher = _as_levels(teacher, "teacher")
    if len(student) != len(teacher):
        raise ValueError(f"teacher: expected as many levels as student ({len(student)}), got {len(teacher)}")
    for i, (s, t) in enumerate(zip(student, teacher)):
        _check_pair(s, t, f"student[{i}]", f"teacher[{i}]")
        if s.device != student[0].device:
            raise ValueError(f"student[{i}]: expected the device of student[0] ({student[0].device}), got {s.device}")
    mse_weight = _check_number(mse_weight, "mse_weight", minimum=0.0)
    at_weight = _check_number(at_weight, "at_weight", minimum=0.0)
    at_p = _check_number(at_p, "at_p", minimum=1.0)
    eps = _check_number(eps, "eps", minimum=0.0, strict=True)
    coef = _level_coefficients(level_weights, len(student))
    loss, mse, at = _feat_loss_op.feat_loss(student, [t.detach() for t in teacher], coef, mse_weight, at_weight,
                                            at_p, _at_code(at_mode), _whiten_code(whiten), eps, _needs_grad(student))
    if return_parts:
        return FeatLossParts(loss, mse.detach(), at.detach())
    return loss


def ln_mse_loss(student: torch.Tensor, teacher: torch.Tensor, *, whiten: str | None = "channel",
                eps: float = 1e-5) -> torch.Tensor:
    """``mean((student - W(teacher))**2)`` for one level ``[B, C, H, W]``; gradient w.r.t. the student only."""
    return fused_feat_loss([student], [teacher], mse_weight=1.0, at_weight=0.0, whiten=whiten, eps=eps)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, *, p: float = 2.0, mode: str = "paper") -> torch.Tensor:
    """Attention-transfer loss for one level ``[B, C, H, W]``; gradient w.r.t. the student only."""
    return fused_feat_loss([student], [teacher], mse_weight=0.0, at_weight=1.0, at_p=p, at_mode=mode, whiten=None)


def attention_map(x: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Unit-L2-norm spatial attention map ``sum_c |x_c|**p`` per sample, ``[B, C, H, W]`` -> ``[B, H, W]``.

    Composite PyTorch (differentiable, any device); the losses compute the same maps inside their kernels.
    The result is float32 (float64 for float64 input).
    """
    _check_tensor(x, "x")
    p = _check_number(p, "p", minimum=1.0)
    return reference.attention_map(x, p)


def soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, tau: float = 4.0, dim: int = 1,
            scale_by_tau_sq: bool = False, reduction: str = "mean", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature-scaled soft cross-entropy ``H(softmax(t/tau), softmax(s/tau))`` per position, for dense logits.

    One pass over both inputs with an online softmax; math in fp32 (fp64 for float64) from the raw logits.

    Args:
        student_logits: ``[B, K, H, W]`` (NCHW or channels_last) or ``[N, K]``, class axis ``dim``; float32,
            float16, bfloat16 or float64. Receives the gradient.
        teacher_logits: same shape; any floating dtype (may differ from the student's). Never receives a gradient.
        tau: temperature, ``> 0`` (DreamTeacher uses 4).
        dim: the class axis.
        scale_by_tau_sq: multiply the loss by ``tau**2`` (Hinton's convention); the paper states no such factor.
        reduction: ``"mean"`` over positions (over valid positions with ``mask``; 0 with a zero gradient when none
            is valid), ``"sum"``, or ``"none"`` for the per-position map (the input's shape without ``dim``).
        mask: optional bool or float weights of shape ``[B, H, W]`` (``[N]`` for 2-D logits). Positions where it is
            0 are skipped entirely: they contribute nothing and NaN logits there do not propagate.

    Returns:
        float32 loss (float64 for float64 student logits): 0-dim, or the per-position map for ``"none"``.
    """
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype (float32, float16, bfloat16 or float64), "
                            f"got {x.dtype}")
        if x.dim() not in (2, 4):
            raise ValueError(f"{name}: expected [B, K, H, W] or [N, K], got {x.dim()}-D with shape {tuple(x.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits: expected the shape of student_logits {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits: expected the device of student_logits ({student_logits.device}), "
                         f"got {teacher_logits.device}")
    ndim = student_logits.dim()
    if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
        raise ValueError(f"dim: expected an integer in [{-ndim}, {ndim - 1}] for {ndim}-D logits, got {dim!r}")
    dim = dim % ndim
    tau = _check_number(tau, "tau", minimum=0.0, strict=True)
    reduction_mode = Reduction.from_arg(reduction)
    if student_logits.numel() == 0:
        raise ValueError(f"student_logits: expected a non-empty tensor, got shape {tuple(student_logits.shape)}")

    # Canonical [B, K, P] views (no copy for NCHW, channels_last or [N, K] row-major inputs).
    def canonical(x: torch.Tensor) -> torch.Tensor:
        if ndim == 2:
            return x.movedim(dim, 0).unsqueeze(0)
        return x.movedim(dim, 1).reshape(x.shape[0] if dim != 0 else x.shape[1], x.shape[dim], -1)

    s, t = canonical(student_logits), canonical(teacher_logits.detach())
    pos_shape = tuple(n for i, n in enumerate(student_logits.shape) if i != dim)
    m = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != pos_shape:
            raise ValueError(f"mask: expected shape {pos_shape} (the logits without the class axis), "
                             f"got {tuple(mask.shape)}")
        if mask.device != student_logits.device:
            raise ValueError(f"mask: expected the device of student_logits ({student_logits.device}), "
                             f"got {mask.device}")
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"mask: expected a bool or floating dtype, got {mask.dtype}")
        m = mask.reshape(s.shape[0], s.shape[2]).to(reference.compute_dtype(student_logits))
    scale = tau * tau if scale_by_tau_sq else 1.0
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss = _soft_ce_op.soft_ce(s, t, m, tau, scale, reduction_mode, compute_grad)
    if reduction_mode == Reduction.NONE:
        return loss.reshape(pos_shape)
    return loss


def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None, *,
             seed: int | None = None, return_noise: bool = False):
    """One-step forward diffusion ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` with one timestep per sample.

    With ``noise`` given this equals diffusers' ``DDPMScheduler.add_noise(x0, noise, t)`` within float rounding.
    Without it, ``eps`` is drawn inside the kernel from a counter-based Philox4x32-10 stream keyed by ``seed`` (the
    stream of ``tl.randn4x``; see :mod:`dtkernels.reference`), so no noise tensor exists unless ``return_noise``.
    The same seed gives the same noise on every backend (within libm rounding of log/sin/cos).

    Args:
        x0: ``[B, ...]`` clean samples (floating; NCHW or channels_last; the output keeps the layout).
        t: ``[B]`` integer timesteps, each in ``[0, T)``.
        alphas_cumprod: ``[T]`` floating, values in ``(0, 1]`` (e.g. ``scheduler.alphas_cumprod``; any device).
        noise: optional ``eps`` with ``x0``'s shape.
        seed: 64-bit key of the noise stream; when None one is drawn from torch's default CPU generator, so
            ``torch.manual_seed`` makes runs repeatable. Ignored when ``noise`` is given.
        return_noise: also return ``eps`` (materialized only then).

    Returns:
        ``x_t`` (dtype and layout of ``x0``), or ``(x_t, eps)`` when ``return_noise``.
    """
    if not isinstance(x0, torch.Tensor) or x0.dtype not in _FLOAT_DTYPES:
        raise TypeError("x0: expected a floating tensor (float32, float16, bfloat16 or float64), got "
                        f"{x0.dtype if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    if x0.dim() < 1 or x0.numel() == 0:
        raise ValueError(f"x0: expected a non-empty tensor [B, ...], got shape {tuple(x0.shape)}")
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError("t: expected an integer tensor [B] of timesteps, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t: expected shape ({x0.shape[0]},) (one timestep per sample of x0), got {tuple(t.shape)}")
    if not isinstance(alphas_cumprod, torch.Tensor) or not alphas_cumprod.is_floating_point():
        raise TypeError("alphas_cumprod: expected a floating tensor [T]")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError("alphas_cumprod: expected a non-empty 1-D tensor [T], got shape "
                         f"{tuple(alphas_cumprod.shape)}")
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError("noise: expected a floating tensor with the shape of x0")
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        if noise.device != x0.device:
            raise ValueError(f"noise: expected the device of x0 ({x0.device}), got {noise.device}")
    if t.device != x0.device and t.device.type != "cpu":
        raise ValueError(f"t: expected the device of x0 ({x0.device}) or the CPU, got {t.device}")
    if _dispatch.is_plain_eager(t) and _dispatch.is_plain_eager(alphas_cumprod):
        # Value checks read the data (a sync on CUDA); skipped while tracing, where they cannot run.
        n_steps = alphas_cumprod.numel()
        t_min, t_max = int(t.min()), int(t.max())
        if t_min < 0 or t_max >= n_steps:
            raise ValueError(f"t: expected timesteps in [0, {n_steps}) (len(alphas_cumprod)), got values in "
                             f"[{t_min}, {t_max}]")
        if not bool(((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all()):
            raise ValueError("alphas_cumprod: expected every value in (0, 1], got "
                             f"[{float(alphas_cumprod.min())}, {float(alphas_cumprod.max())}]")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item()) if noise is None else 0
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
    if seed >= 2**63:
        seed -= 2**64  # the op's int is signed 64-bit; kernels reinterpret it as unsigned
    alphas = alphas_cumprod.to(x0.device)
    x_t, eps = _q_sample_op.q_sample(x0, t.to(x0.device), alphas, noise, seed, bool(return_noise))
    if return_noise:
        return x_t, (noise if noise is not None else eps)
    return x_t


def _check_per_channel(t: object, name: str, shape: tuple[int, ...], what: str, x: torch.Tensor) -> None:
    """An optional parameter of group_norm_act: a floating tensor of ``shape`` on x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {what} or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} {what}, got {tuple(t.shape)}")
    allowed = (x.dtype, reference.compute_dtype(x))
    if t.dtype not in allowed:
        names = " or ".join(dict.fromkeys(str(d).removeprefix("torch.") for d in allowed))
        raise TypeError(f"{name}: expected the dtype of x or its compute dtype ({names}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected the device of x ({x.device}), got {t.device}")


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, *, eps: float = 1e-5, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None, act: str | None = "silu") -> torch.Tensor:
    """``act(group_norm(x, num_groups, weight, bias, eps) * (1 + scale) + shift)`` in one inference-only op.

    The normalization + conditioning + activation of a diffusion UNet's residual block (ADM's ``out_layers`` with
    ``use_scale_shift_norm``; diffusers' ``ResnetBlock2D`` with ``time_embedding_norm="scale_shift"``; without
    ``scale`` / ``shift``, any ``GroupNorm`` followed by ``SiLU``), reading ``x`` from memory once. Statistics (mean,
    biased variance, ``eps`` inside the square root) are in float32 (float64 for float64 ``x``) whatever x's dtype.

    Inference only: no gradient is defined. An input that requires grad while grad mode is on is refused (use
    ``torch.no_grad()`` / ``torch.inference_mode()``, or ``torch.nn.functional.group_norm`` when training).

    Args:
        x: ``[B, C, *spatial]`` (at least 2-D; NCHW, channels_last or a strided view: the output keeps the layout of
            ``torch.empty_like(x)``), float32 / bfloat16 / float16 / float64.
        num_groups: ``G``, a positive divisor of ``C``.
        weight, bias: optional ``[C]`` GroupNorm affine parameters, in x's dtype or float32 (float64 for float64).
        eps: ``> 0``.
        scale, shift: optional ``[B, C]`` per-sample, per-channel conditioning (dtypes as ``weight``).
        act: ``"silu"`` or None.

    Returns:
        ``[B, C, *spatial]`` in x's dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor [B, C, *spatial], got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype (float32, float16, bfloat16 or float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor [B, C, *spatial] with at least 2 dimensions, got {x.dim()}-D with "
                         f"shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")
    batch, channels = x.shape[0], x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups: expected a positive integer, got {num_groups!r}")
    if channels % num_groups != 0:
        raise ValueError(f"num_groups: expected a divisor of the {channels} channels of x, got {num_groups}")
    _check_per_channel(weight, "weight", (channels,), "[C]", x)
    _check_per_channel(bias, "bias", (channels,), "[C]", x)
    _check_per_channel(scale, "scale", (batch, channels), "[B, C]", x)
    _check_per_channel(shift, "shift", (batch, channels), "[B, C]", x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
    mode = Activation.from_arg(act)
    if torch.is_grad_enabled():
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"group_norm_act: {name} requires grad, but the op is inference-only (no "
                                   "gradient is defined); call it under torch.no_grad() / torch.inference_mode(), "
                                   "or use torch.nn.functional.group_norm when training")
    return _group_norm_act_op.group_norm_act(x, num_groups, weight, bias, scale, shift, float(eps), int(mode))
