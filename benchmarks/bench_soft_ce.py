"""Benchmarks of the soft cross-entropy (label distillation): eager PyTorch, torch.compile and dtkernels side by side.

Run: ``.venv/bin/pytest benchmarks/bench_soft_ce.py --benchmark-only`` (see benchmarks/README.md). Groups are
``soft_ce-{shape}-{mode}``; providers are ``eager`` (the loss written by hand with ``softmax`` / ``log_softmax``,
below), ``compile`` (``torch.compile`` of that same function) and ``dtkernels`` (``dtkernels.soft_ce(s, t, tau=4.0)``).

``extra_info`` holds ``min_bytes`` (read student + teacher once; ``fwd_bwd`` also writes the gradient once), ``gbps``
(``min_bytes`` / mean time), ``frac_copy_bw`` (against ``dst.copy_(src)`` on 256 MiB, the ``copy_bandwidth``
fixture of conftest.py) and ``peak_extra_bytes``: the peak of tensor memory allocated during one step above what was
allocated before it (the student gradient included), from ``torch.profiler`` memory events of one extra, untimed
step (tensor allocations through the CPU allocator only; not RSS, not compilation).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from throughput import record_throughput
from torch.profiler import ProfilerActivity, profile

import dtkernels

DTYPE = torch.float32
SEED = 0
TAU = 4.0

#: Label-distillation logits: 19 classes (Cityscapes) at 128x128 and 150 classes (ADE20K) at 64x64, batch 8, NCHW.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "8x19x128x128": (8, 19, 128, 128),
    "8x150x64x64": (8, 150, 64, 64),
}
MODES = ("fwd", "fwd_bwd")
PROVIDERS = ("eager", "compile", "dtkernels")
#: (warm-up rounds, timed rounds). The first compilation happens in the correctness-check call before warm-up.
ROUNDS = (5, 40)


# --------------------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------------------
def eager_soft_ce(student: torch.Tensor, teacher: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """The loss as a user writes it: mean over positions of ``H(softmax(t/tau), softmax(s/tau))``."""
    return -(torch.softmax(teacher / tau, 1) * torch.log_softmax(student / tau, 1)).sum(1).mean()


@functools.cache
def compiled_soft_ce(shape: str, mode: str):
    """One ``torch.compile`` wrapper per (shape, mode); static shapes."""
    del shape, mode  # only the cache key
    return torch.compile(eager_soft_ce, dynamic=False)


def dtkernels_soft_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return dtkernels.soft_ce(student, teacher, tau=TAU)


def dtkernels_backend() -> str:
    """What ``dtkernels.soft_ce`` runs on CPU tensors in this process."""
    forced = dtkernels.get_backend()
    if forced != "auto":
        return forced
    has_kernel = dtkernels.backends()["cpp"]["available"] and torch._C._dispatch_has_kernel_for_dispatch_key(
        "dtkernels::soft_ce", "CPU")
    return "cpp" if has_kernel else "reference (fallback: C++ kernel not built)"


def get_provider(provider: str, shape: str, mode: str):
    if provider == "eager":
        return eager_soft_ce
    if provider == "compile":
        return compiled_soft_ce(shape, mode)
    if provider == "dtkernels":
        return dtkernels_soft_ce
    raise ValueError(provider)


# --------------------------------------------------------------------------------------------------------------
# Inputs, correctness check, memory
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def make_inputs(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous NCHW float32 logits with a per-class offset and different scales, fixed seed."""
    gen = torch.Generator().manual_seed(SEED)
    size = SHAPES[shape]
    offset = torch.linspace(-2.0, 2.0, size[1]).view(1, -1, 1, 1)
    student = (torch.randn(size, generator=gen, dtype=DTYPE) * 3.0 + offset).contiguous()
    teacher = (torch.randn(size, generator=gen, dtype=DTYPE) * 5.0 - offset).contiguous()
    return student, teacher


@functools.lru_cache(maxsize=1)
def eager_expected(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    student, teacher = make_inputs(shape)
    leaf = student.detach().clone().requires_grad_()
    loss = eager_soft_ce(leaf, teacher)
    loss.backward()
    return loss.detach(), leaf.grad


def check_against_eager(shape: str, mode: str, loss: torch.Tensor, student: torch.Tensor) -> None:
    """Fail the benchmark if a provider computes a different loss (or gradient) than the eager formulation."""
    want_loss, want_grad = eager_expected(shape)
    torch.testing.assert_close(loss.detach().float(), want_loss, rtol=1e-4, atol=1e-6)
    if mode == "fwd_bwd":
        assert student.grad is not None, "no gradient"
        err = (student.grad - want_grad).abs().max().item()
        scale = want_grad.abs().max().item()
        assert err <= 1e-3 * scale, f"max |grad - eager| = {err:.3g}, max |eager grad| = {scale:.3g}"


def peak_extra_bytes(step, args) -> int:
    """Peak tensor memory allocated during ``step(*args)`` above the level before it (torch.profiler events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*args)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


def min_bytes(student: torch.Tensor, teacher: torch.Tensor, mode: str) -> int:
    """Compulsory traffic: read student and teacher once; fwd_bwd also writes the student gradient once."""
    read = student.numel() * student.element_size() + teacher.numel() * teacher.element_size()
    return read + (student.numel() * student.element_size() if mode == "fwd_bwd" else 0)


# --------------------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_soft_ce(benchmark, copy_bandwidth, shape: str, mode: str, provider: str) -> None:
    benchmark.group = f"soft_ce-{shape}-{mode}"
    backward = mode == "fwd_bwd"
    base_student, teacher = make_inputs(shape)
    student = base_student.detach().requires_grad_(backward)  # a leaf sharing the cached storage
    fn = get_provider(provider, shape, mode)

    def setup():
        student.grad = None  # outside the timed region
        return (student, teacher), {}

    def step(student, teacher):
        loss = fn(student, teacher)
        if backward:
            loss.backward()
        return loss

    # One untimed call checked against eager (for `compile` this is where the first compilation happens).
    check_against_eager(shape, mode, step(*setup()[0]), student)
    step(*setup()[0])  # lazy compilation of anything left, before the memory measurement
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(step, setup()[0])

    warmup, rounds = ROUNDS
    benchmark.extra_info.update(provider=provider, shape=list(SHAPES[shape]), mode=mode,
                                dtype=str(DTYPE).removeprefix("torch."), threads=torch.get_num_threads(),
                                torch=torch.__version__, loadavg_1m=os.getloadavg()[0])
    if provider == "dtkernels":
        benchmark.extra_info["dtkernels_backend"] = dtkernels_backend()
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=warmup)
    record_throughput(benchmark, min_bytes(student, teacher, mode), copy_bandwidth)
