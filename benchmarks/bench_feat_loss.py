"""Benchmarks of the DreamTeacher feature-distillation loss: eager PyTorch, torch.compile and dtkernels side by side.

Run: ``pytest benchmarks --benchmark-only`` (see benchmarks/README.md). Groups are ``feat_loss-{shapes}-{mode}``
and ``copy``; providers are ``eager`` (the loss written by hand in plain PyTorch, below), ``compile``
(``torch.compile`` of that same function) and ``dtkernels`` (``dtkernels.fused_feat_loss`` with default arguments).
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F
from throughput import record_throughput

import dtkernels

DTYPE = torch.float32
SEED = 0

#: DreamTeacher ResNet-50 student at 256x256, batch 8: levels at strides 4, 8, 16, 32 (teacher channel counts).
SHAPE_SETS: dict[str, list[tuple[int, int, int, int]]] = {
    "r50": [(8, 256, 64, 64), (8, 512, 32, 32), (8, 1024, 16, 16), (8, 2048, 8, 8)],
    "small": [(8, 64, 32, 32), (8, 128, 16, 16), (8, 256, 8, 8), (8, 512, 4, 4)],
}
MODES = ("fwd", "fwd_bwd")
PROVIDERS = ("eager", "compile", "dtkernels")

#: (warm-up rounds, timed rounds) per shape set. The first compile happens in the correctness-check call that
#: precedes warm-up; the warm-up rounds cover any lazy (backward) compilation and bring caches and allocator to
#: steady state. Sized so the whole run stays within a few minutes on 2 CPU cores.
ROUNDS = {"r50": (3, 30), "small": (10, 200)}

#: Copy benchmarks: 256 MiB (the bandwidth yardstick) and the size of the r50 student set.
COPY_SIZES = {
    "256MiB": 256 * 1024 * 1024 // 4,
    "r50_student": sum(math.prod(s) for s in SHAPE_SETS["r50"]),
}
COPY_ROUNDS = (3, 30)


# --------------------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------------------
def eager_feat_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], eps: float = 1e-5,
                    at_weight: float = 10.0) -> torch.Tensor:
    """The loss as a user writes it by hand; same function as ``dtkernels.fused_feat_loss`` with its defaults.

    Per level: teacher whitened by a non-affine LayerNorm over channels (``whiten="channel"``, ``eps``), MSE against
    the student; attention maps ``sum_c x**2`` (``at_p=2``) of the student and of the raw teacher, L2-normalized per
    sample; AT term ``mean_b ||q_s - q_t||_2`` (``at_mode="paper"``). Loss = mean over levels of
    ``mse + at_weight * at`` (``mse_weight=1``, equal level weights).
    """
    total = 0.0
    for s, t in zip(student, teacher):
        t = t.detach()
        target = F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), eps=eps).permute(0, 3, 1, 2)
        mse = F.mse_loss(s, target)
        q_s = F.normalize(s.pow(2).sum(1).flatten(1), dim=1)
        q_t = F.normalize(t.pow(2).sum(1).flatten(1), dim=1)
        at = (q_s - q_t).norm(dim=1).mean()
        total = total + mse + at_weight * at
    return total / len(student)


@functools.cache
def compiled_feat_loss(shapes: str, mode: str):
    """One ``torch.compile`` wrapper per (shape set, mode); static shapes so no provider sees a dynamic graph."""
    del shapes, mode  # only the cache key
    return torch.compile(eager_feat_loss, dynamic=False)


def dtkernels_feat_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    return dtkernels.fused_feat_loss(student, teacher)


def dtkernels_backend() -> str:
    """What ``dtkernels.fused_feat_loss`` runs on CPU tensors in this process."""
    forced = dtkernels.get_backend()
    if forced != "auto":
        return forced
    return "cpp" if dtkernels.backends()["cpp"]["available"] else "reference (fallback: C++ library not built)"


def get_provider(provider: str, shapes: str, mode: str):
    if provider == "eager":
        return eager_feat_loss
    if provider == "compile":
        return compiled_feat_loss(shapes, mode)
    if provider == "dtkernels":
        return dtkernels_feat_loss
    raise ValueError(provider)


# --------------------------------------------------------------------------------------------------------------
# Inputs and the correctness check
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def make_inputs(shapes: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Contiguous NCHW float32 student/teacher levels with non-zero mean and different scales, fixed seed."""
    gen = torch.Generator().manual_seed(SEED)
    student = [torch.randn(s, generator=gen, dtype=DTYPE) * 0.5 + 0.1 for s in SHAPE_SETS[shapes]]
    teacher = [torch.randn(s, generator=gen, dtype=DTYPE) * 2.0 + 0.3 for s in SHAPE_SETS[shapes]]
    return student, teacher


@functools.lru_cache(maxsize=2)
def eager_expected(shapes: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and student gradients of the eager provider, the yardstick of the correctness check."""
    student, teacher = make_inputs(shapes)
    leaves = [s.detach().clone().requires_grad_() for s in student]
    loss = eager_feat_loss(leaves, teacher)
    loss.backward()
    return loss.detach(), [s.grad for s in leaves]


def check_against_eager(shapes: str, mode: str, loss: torch.Tensor, student: list[torch.Tensor]) -> None:
    """Fail the benchmark if a provider computes a different loss (or gradient) than the eager formulation."""
    want_loss, want_grads = eager_expected(shapes)
    torch.testing.assert_close(loss.detach().float(), want_loss, rtol=1e-4, atol=1e-6)
    if mode == "fwd_bwd":
        for i, (s, want) in enumerate(zip(student, want_grads)):
            assert s.grad is not None, f"level {i}: no gradient"
            err = (s.grad - want).abs().max().item()
            scale = want.abs().max().item()
            assert err <= 1e-3 * scale, f"level {i}: max |grad - eager| = {err:.3g}, max |eager grad| = {scale:.3g}"


def min_bytes(student: list[torch.Tensor], teacher: list[torch.Tensor], mode: str) -> int:
    """Compulsory traffic: read student and teacher once; fwd_bwd also writes the student gradient once."""
    read = sum(t.numel() * t.element_size() for t in (*student, *teacher))
    write = sum(s.numel() * s.element_size() for s in student) if mode == "fwd_bwd" else 0
    return read + write


# --------------------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shapes", list(SHAPE_SETS))
def test_feat_loss(benchmark, copy_bandwidth, shapes: str, mode: str, provider: str) -> None:
    if benchmark.disabled and shapes != "small":
        pytest.skip("smoke run (no --benchmark-only): only the 'small' shape set runs, once")
    benchmark.group = f"feat_loss-{shapes}-{mode}"
    backward = mode == "fwd_bwd"
    base_student, teacher = make_inputs(shapes)
    student = [s.detach().requires_grad_(backward) for s in base_student]  # leaves sharing the cached storage
    fn = get_provider(provider, shapes, mode)

    def setup():
        for s in student:  # outside the timed region
            s.grad = None
        return (student, teacher), {}

    def step(student, teacher):
        loss = fn(student, teacher)
        if backward:
            loss.backward()
        return loss

    # One untimed call checked against eager (for `compile` this is where the first compilation happens).
    check_against_eager(shapes, mode, step(*setup()[0]), student)

    warmup, rounds = ROUNDS[shapes]
    benchmark.extra_info.update(provider=provider, shapes=shapes, mode=mode, dtype=str(DTYPE).removeprefix("torch."),
                                levels=[list(s) for s in SHAPE_SETS[shapes]], threads=torch.get_num_threads(),
                                torch=torch.__version__)
    if provider == "dtkernels":
        benchmark.extra_info["dtkernels_backend"] = dtkernels_backend()
    benchmark.extra_info["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine distorts every number
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=warmup)
    record_throughput(benchmark, min_bytes(student, teacher, mode), copy_bandwidth)


@pytest.mark.parametrize("size", list(COPY_SIZES))
def test_copy(benchmark, size: str) -> None:
    benchmark.group = "copy"
    src = torch.rand(COPY_SIZES[size], dtype=DTYPE)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    benchmark.extra_info.update(provider="copy", size=size, bytes=nbytes, threads=torch.get_num_threads())
    warmup, rounds = COPY_ROUNDS
    benchmark.pedantic(dst.copy_, args=(src,), rounds=rounds, warmup_rounds=warmup)
    if benchmark.stats is not None:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.mean / 1e9
