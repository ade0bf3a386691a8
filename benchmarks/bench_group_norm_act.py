"""Benchmarks of ``dtkernels.group_norm_act`` (the teacher's GroupNorm + scale/shift + SiLU) on CPU, float32.

Run: ``pytest benchmarks/bench_group_norm_act.py --benchmark-only --benchmark-json=.benchmarks/gna.json``, then
``python benchmarks/bench_group_norm_act.py run1.json [run2.json ...] [median|mean|min]`` prints the Markdown table of
benchmarks/README.md (several runs: the median over runs of each cell).

Groups ``group_norm_act-{shape}``. Providers, side by side:

* ``eager``: ``F.silu(F.group_norm(x, 32, w, b) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])``, ADM's
  ResBlock ``out_layers`` with ``use_scale_shift_norm`` (diffusers: ``time_embedding_norm="scale_shift"``) as
  written in PyTorch;
* ``compile``: ``torch.compile`` of that function (static shapes, compiled in the untimed check call);
* ``dtkernels``: ``dtkernels.group_norm_act(x, 32, w, b, scale=scale, shift=shift)`` (the C++ kernel when built);
* ``copy``: ``torch.empty_like(x).copy_(x)`` on the same tensor: the yardstick an op that allocates its output and
  moves the same bytes can be compared with (it pays the same first-touch page faults).

Shapes (batch 2, 32 groups): ADM-256's residual blocks at 128x128 and 256x256 (256 channels), 128 channels at
256x256 and 512 channels at 32x32; Stable Diffusion 1.5's latent UNet at 64x64 (320 channels) and its 8x8 level
(1280 channels). ``-cl`` rows: the same tensor in channels_last. NCHW contiguous otherwise.

``extra_info``: ``min_bytes`` (read x once, write the output once: a two-pass kernel reads x twice, the second time
from cache where it fits), ``gbps`` = min_bytes / mean time, ``frac_copy_bw`` against the session's preallocated
256 MiB ``copy_`` (``copy_bandwidth`` fixture, benchmarks/conftest.py), and for the dtkernels rows
``alloc_copy_gbps`` / ``frac_alloc_copy_bw`` against this shape's ``empty_like(x).copy_(x)`` measured right before.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from throughput import record_throughput

import dtkernels

DTYPE = torch.float32
GROUPS = 32
SEED = 0

#: name -> (shape, channels_last)
SHAPES: dict[str, tuple[tuple[int, int, int, int], bool]] = {
    "2x256x128x128": ((2, 256, 128, 128), False),
    "2x256x128x128-cl": ((2, 256, 128, 128), True),
    "2x256x256x256": ((2, 256, 256, 256), False),
    "2x128x256x256": ((2, 128, 256, 256), False),
    "2x512x32x32": ((2, 512, 32, 32), False),
    "2x320x64x64": ((2, 320, 64, 64), False),
    "2x1280x8x8": ((2, 1280, 8, 8), False),
}
PROVIDERS = ("eager", "compile", "dtkernels", "copy")
#: (warm-up rounds, timed rounds) by tensor size; eager at 2x256x256x256 is ~0.5 s a call.
SMALL_ROUNDS, LARGE_ROUNDS, HUGE_ROUNDS = (10, 100), (3, 20), (2, 8)
#: The shape the smoke run (no --benchmark-only) uses.
SMOKE_SHAPE = "2x320x64x64"


def rounds_for(numel: int) -> tuple[int, int]:
    if numel >= 64 * 2**20:
        return HUGE_ROUNDS
    if numel >= 4 * 2**20:
        return LARGE_ROUNDS
    return SMALL_ROUNDS


def eager_group_norm_act(x, weight, bias, scale, shift):
    """The block as a user writes it."""
    return F.silu(F.group_norm(x, GROUPS, weight, bias) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


@functools.cache
def compiled_group_norm_act(shape: str):
    """One ``torch.compile`` wrapper per shape (static shapes)."""
    del shape  # only the cache key
    return torch.compile(eager_group_norm_act, dynamic=False)


def dtkernels_group_norm_act(x, weight, bias, scale, shift):
    return dtkernels.group_norm_act(x, GROUPS, weight, bias, scale=scale, shift=shift)


def copy_like(x, weight, bias, scale, shift):
    return torch.empty_like(x).copy_(x)


def provider_fn(provider: str, shape: str):
    if provider == "compile":
        return compiled_group_norm_act(shape)
    return {"eager": eager_group_norm_act, "dtkernels": dtkernels_group_norm_act, "copy": copy_like}[provider]


@functools.lru_cache(maxsize=1)
def inputs(shape: str):
    """x with a non-zero mean and per-channel spread, GroupNorm affine parameters, ADM-like scale (around 0) and
    shift."""
    dims, channels_last = SHAPES[shape]
    gen = torch.Generator().manual_seed(SEED)
    b, c = dims[:2]
    x = torch.randn(dims, generator=gen, dtype=DTYPE) * (torch.rand(1, c, 1, 1, generator=gen) + 0.5) + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, generator=gen) * 0.2 + 1
    bias = torch.randn(c, generator=gen) * 0.1
    scale = torch.randn(b, c, generator=gen) * 0.2
    shift = torch.randn(b, c, generator=gen) * 0.2
    return x, weight, bias, scale, shift


@functools.lru_cache(maxsize=1)
def expected(shape: str) -> torch.Tensor:
    with torch.no_grad():
        return eager_group_norm_act(*inputs(shape))


def min_bytes(x: torch.Tensor) -> int:
    """Compulsory traffic: read x once, write the output once (the parameters are negligible)."""
    return 2 * x.numel() * x.element_size()


def alloc_copy_gbps(x: torch.Tensor, repeats: int = 10) -> float:
    """GB/s of ``torch.empty_like(x).copy_(x)`` (mean of ``repeats`` after two warm-ups), as the benchmarks count."""
    for _ in range(2):
        torch.empty_like(x).copy_(x)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.empty_like(x).copy_(x)
    return min_bytes(x) * repeats / (time.perf_counter() - start) / 1e9


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_group_norm_act(benchmark, copy_bandwidth, shape: str, provider: str) -> None:
    if benchmark.disabled and shape != SMOKE_SHAPE:
        pytest.skip(f"smoke run (no --benchmark-only): only {SMOKE_SHAPE} runs, once")
    benchmark.group = f"group_norm_act-{shape}"
    args = inputs(shape)
    x = args[0]
    fn = provider_fn(provider, shape)
    with torch.no_grad():
        out = fn(*args)  # untimed; `compile` compiles here
        if provider != "copy":
            want = expected(shape)
            err = float((out - want).abs().max())
            assert err <= 1e-4 * float(want.abs().max()), f"{provider}: max error {err:.3e} against eager"
            assert out.stride() == x.stride()
    warmup, rounds = rounds_for(x.numel())
    benchmark.extra_info.update(provider=provider, shape=list(x.shape), channels_last=SHAPES[shape][1],
                                dtype=str(DTYPE).removeprefix("torch."), threads=torch.get_num_threads(),
                                torch=torch.__version__, bytes=min_bytes(x))
    if provider == "dtkernels":
        forced = dtkernels.get_backend()
        benchmark.extra_info["dtkernels_backend"] = forced if forced != "auto" else (
            "cpp" if dtkernels.backends()["cpp"]["available"] else "reference (fallback: C++ library not built)")
        benchmark.extra_info["alloc_copy_gbps"] = alloc_copy_gbps(x)
    benchmark.extra_info["loadavg_1m"] = os.getloadavg()[0]  # other work on the machine distorts every number

    def call():
        with torch.no_grad():
            return fn(*args)

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup)
    record_throughput(benchmark, min_bytes(x), copy_bandwidth)
    if provider == "dtkernels" and "gbps" in benchmark.extra_info:
        benchmark.extra_info["frac_alloc_copy_bw"] = (benchmark.extra_info["gbps"]
                                                      / benchmark.extra_info["alloc_copy_gbps"])


def _run_cells(path: str, stat: str) -> tuple[dict[str, dict[str, float]], float | None, list[float]]:
    """Per shape of one run: each provider's time (ms, ``stat`` of the rounds), dtkernels' GB/s; the session's
    preallocated copy GB/s; the load averages."""
    rows: dict[str, dict[str, dict]] = {}
    for bench in json.loads(open(path).read())["benchmarks"]:
        if str(bench.get("group", "")).startswith("group_norm_act-"):
            rows.setdefault(bench["group"].removeprefix("group_norm_act-"), {})[bench["extra_info"]["provider"]] = bench
    cells, copy_gbps, loads = {}, None, []
    for name, r in rows.items():
        if not set(PROVIDERS) <= set(r):
            continue
        ms = {p: b["stats"][stat] * 1e3 for p, b in r.items()}
        info = r["dtkernels"]["extra_info"]
        copy_gbps = info.get("copy_gbps", copy_gbps)
        cells[name] = {**ms, "gbps": info["min_bytes"] / ms["dtkernels"] / 1e6}
        loads += [b["extra_info"]["loadavg_1m"] for b in r.values() if "loadavg_1m" in b["extra_info"]]
    return cells, copy_gbps, loads


def table(paths: list[str], stat: str = "median") -> str:
    """The Markdown table of one or more ``--benchmark-json`` files of this benchmark. Per run, ``stat`` (median,
    mean or min) of each provider's timed rounds and the ratios within the run; with several runs, each cell is the
    median over the runs (ratios: with their range). On a shared 2-core machine the median survives other jobs."""
    runs = [_run_cells(p, stat) for p in paths]
    med = statistics.median
    lines = ["| shape | eager ms | compile ms | dtkernels ms | × eager | × compile | dtkernels GB/s | "
             "empty_like+copy_ ms | % of empty_like+copy_ | % of preallocated copy_ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def agg(values: list[float], fmt: str, rng: bool, unit: str = "") -> str:
        text = format(med(values), fmt) + unit
        if rng and len(values) > 1:
            text += f" ({format(min(values), fmt)}–{format(max(values), fmt)})"
        return text

    for name in SHAPES:
        per_run = [(c[name], bw) for c, bw, _ in runs if name in c]
        if not per_run:
            continue
        col = {k: [c[k] for c, _ in per_run] for k in ("eager", "compile", "dtkernels", "copy", "gbps")}
        x_eager = [c["eager"] / c["dtkernels"] for c, _ in per_run]
        x_compile = [c["compile"] / c["dtkernels"] for c, _ in per_run]
        frac_alloc = [100 * c["copy"] / c["dtkernels"] for c, _ in per_run]
        frac_pre = [100 * c["gbps"] / bw for c, bw in per_run]
        lines.append(f"| {name} | {agg(col['eager'], '.2f', False)} | {agg(col['compile'], '.2f', False)} | "
                     f"{agg(col['dtkernels'], '.2f', False)} | {agg(x_eager, '.2f', True, '×')} | "
                     f"{agg(x_compile, '.2f', True, '×')} | {agg(col['gbps'], '.1f', False)} | "
                     f"{agg(col['copy'], '.2f', False)} | {agg(frac_alloc, '.0f', True, '%')} | "
                     f"{agg(frac_pre, '.0f', True, '%')} |")
    copies = [bw for _, bw, _ in runs if bw]
    loads = [v for _, _, ls in runs for v in ls]
    lines.append(f"\n{len(runs)} run(s); {stat} of each provider's timed rounds"
                 + (", median over runs (range)" if len(runs) > 1 else "")
                 + (f"; preallocated copy_ (256 MiB, conftest.py): {med(copies):.1f} GB/s" if copies else "")
                 + (f"; 1-min load average during the runs: median {med(loads):.2f}, max {max(loads):.2f}"
                    if loads else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen = args.pop() if args and args[-1] in ("median", "mean", "min") else "median"
    print(table(args, chosen))
