"""``dtkernels::q_sample``: one-step forward diffusion ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

Kernels: ``csrc/q_sample.cpp`` (CPU), :mod:`dtkernels.triton.q_sample` (CUDA), reference
:func:`dtkernels.reference.q_sample_op`. ``x_t`` is linear in ``x0`` and ``noise``, so the backward is two
per-sample scales, written here once in PyTorch for every backend.
"""

from __future__ import annotations

import torch

from .. import _dispatch, reference

__all__ = ["SCHEMA", "OP", "q_sample"]

SCHEMA = ("q_sample(Tensor x0, Tensor t, Tensor alphas_cumprod, Tensor? noise, int seed, bool return_noise)"
          " -> (Tensor, Tensor)")


def _fake(x0, t, alphas_cumprod, noise, seed, return_noise):
    eps = torch.empty_like(x0) if (return_noise and noise is None) else x0.new_empty((0,))
    return torch.empty_like(x0), eps


def _coefficients(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor):
    """``sqrt(abar_t)`` and ``sqrt(1 - abar_t)`` per sample, shaped to broadcast against ``x0`` ``[B, ...]``."""
    dt = reference.compute_dtype(x0)
    abar = alphas_cumprod.to(device=x0.device, dtype=dt)[t.to(x0.device).long()]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)


def _setup_context(ctx, inputs, output):
    x0, t, alphas_cumprod, noise, seed, return_noise = inputs
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])  # eps is a draw, not a function of x0
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.x0_dtype = x0.dtype
    ctx.has_noise = noise is not None


def _backward(ctx, grad_xt, grad_eps):
    if grad_xt is None:
        return None, None, None, None, None, None
    t, alphas_cumprod = ctx.saved_tensors
    a, b = _coefficients(grad_xt, t, alphas_cumprod)
    grad_x0 = (grad_xt * a).to(ctx.x0_dtype)
    grad_noise = (grad_xt * b).to(grad_xt.dtype) if ctx.has_noise else None
    return grad_x0, None, None, grad_noise, None, None


OP = _dispatch.Op(SCHEMA, reference=reference.q_sample_op, triton=("q_sample", "q_sample"), fake=_fake,
                  setup_context=_setup_context, backward=_backward)


def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None, seed: int,
             return_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``dtkernels::q_sample`` (arguments checked by :func:`dtkernels.q_sample`).

    Returns:
        ``(x_t, eps)``; ``eps`` is an empty ``[0]`` tensor unless generated and asked for.
    """
    return OP(x0, t, alphas_cumprod, noise, int(seed), bool(return_noise))
