"""Benchmarks of the frozen-teacher side of DreamTeacher on CPU.

Run: ``pytest benchmarks/bench_teacher.py --benchmark-only`` (see benchmarks/README.md).

q_sample (issue 4), groups ``q_sample-{shape}``: the one-step forward diffusion that noises the images (or latents)
before the teacher's forward pass, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with fresh Gaussian noise.
Providers: ``eager`` (``torch.randn_like`` plus the arithmetic, as a user writes it), ``compile`` (``torch.compile``
of that same function, warmed up) and ``dtkernels`` (``dtkernels.q_sample(x0, t, alphas_cumprod)``: noise drawn
inside the kernel from a counter-based Philox stream, never materialized). float32, contiguous NCHW, batch 8.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from throughput import record_throughput

import dtkernels

DTYPE = torch.float32
SEED = 0
T_STEPS = 1000


# ==============================================================================================================
# q_sample
# ==============================================================================================================
#: DreamTeacher inputs: RGB images at 256x256 (pixel-space DDPM teacher) and the 4-channel 64x64 latents of a
#: latent-diffusion teacher (256 / 8), batch 8.
Q_SAMPLE_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "8x3x256x256": (8, 3, 256, 256),
    "8x4x64x64": (8, 4, 64, 64),
}
Q_SAMPLE_PROVIDERS = ("eager", "compile", "dtkernels")
#: (warm-up rounds, timed rounds) per shape; the first compile happens in the untimed check call before warm-up.
Q_SAMPLE_ROUNDS = {"8x3x256x256": (5, 60), "8x4x64x64": (20, 400)}


def eager_q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion as a user writes it (diffusers' ``add_noise`` with ``torch.randn_like`` noise)."""
    noise = torch.randn_like(x0)
    abar = alphas_cumprod[t]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return abar.sqrt().view(shape) * x0 + (1 - abar).sqrt().view(shape) * noise


@functools.cache
def compiled_q_sample(shape: str):
    """One ``torch.compile`` wrapper per shape (static shapes)."""
    del shape  # only the cache key
    return torch.compile(eager_q_sample, dynamic=False)


def dtkernels_q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    # seed=None: a fresh key from torch's generator per call, as a training loop calls it
    return dtkernels.q_sample(x0, t, alphas_cumprod)


def q_sample_provider(provider: str, shape: str):
    if provider == "eager":
        return eager_q_sample
    if provider == "compile":
        return compiled_q_sample(shape)
    if provider == "dtkernels":
        return dtkernels_q_sample
    raise ValueError(provider)


@functools.lru_cache(maxsize=2)
def q_sample_inputs(shape: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 in [-1, 1]-ish like normalized images, timesteps over the whole schedule, a linear DDPM schedule."""
    gen = torch.Generator().manual_seed(SEED)
    x0 = (torch.rand(Q_SAMPLE_SHAPES[shape], generator=gen, dtype=DTYPE) * 2 - 1).contiguous()
    t = torch.randint(0, T_STEPS, (x0.shape[0],), generator=gen)
    betas = torch.linspace(1e-4, 0.02, T_STEPS, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).to(DTYPE)
    return x0, t, alphas_cumprod


def check_q_sample(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
    """Fail the benchmark if a provider does not compute forward diffusion: the noise recovered from ``x_t`` must
    look standard normal (the providers use different generators, so values cannot be compared)."""
    abar = alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    eps = (x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()
    n = eps.numel()
    assert x_t.shape == x0.shape and x_t.dtype == x0.dtype
    assert abs(float(eps.mean())) < 6 / math.sqrt(n), float(eps.mean())
    # six standard errors each (the sample variance of n normals has standard error sqrt(2 / n)): a fixed 0.01 was
    # 2.6 errors at the latent shape and failed about one call in a hundred on a correct kernel
    assert abs(float(eps.var()) - 1) < 6 * math.sqrt(2 / n), float(eps.var())


def q_sample_min_bytes(x0: torch.Tensor) -> int:
    """Compulsory traffic: read x0 once, write x_t once (the noise is never stored by dtkernels)."""
    return 2 * x0.numel() * x0.element_size()


@pytest.mark.parametrize("provider", Q_SAMPLE_PROVIDERS)
@pytest.mark.parametrize("shape", list(Q_SAMPLE_SHAPES))
def test_q_sample(benchmark, copy_bandwidth, shape: str, provider: str) -> None:
    if benchmark.disabled and shape != "8x4x64x64":
        pytest.skip("smoke run (no --benchmark-only): only the latent shape runs, once")
    benchmark.group = f"q_sample-{shape}"
    x0, t, alphas_cumprod = q_sample_inputs(shape)
    fn = q_sample_provider(provider, shape)
    # One untimed checked call (for `compile` this is where the compilation happens).
    check_q_sample(fn(x0, t, alphas_cumprod), x0, t, alphas_cumprod)
    warmup, rounds = Q_SAMPLE_ROUNDS[shape]
    benchmark.extra_info.update(provider=provider, shape=list(Q_SAMPLE_SHAPES[shape]),
                                dtype=str(DTYPE).removeprefix("torch."), threads=torch.get_num_threads(),
                                torch=torch.__version__, bytes=q_sample_min_bytes(x0))
    if provider == "dtkernels":
        forced = dtkernels.get_backend()
        benchmark.extra_info["dtkernels_backend"] = forced if forced != "auto" else (
            "cpp" if dtkernels.backends()["cpp"]["available"] else "reference (fallback: C++ library not built)")
    benchmark.extra_info["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine distorts every number
    benchmark.pedantic(fn, args=(x0, t, alphas_cumprod), rounds=rounds, warmup_rounds=warmup)
    record_throughput(benchmark, q_sample_min_bytes(x0), copy_bandwidth)
